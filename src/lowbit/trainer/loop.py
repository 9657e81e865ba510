"""The training loop: gradient accumulation, warmup + cosine LR, clipping, bf16 autocast, periodic evaluation,
metrics, plots and resumable checkpoints.

One step (``step`` counts completed optimizer steps, 1-based):

1. ``grad_accum`` micro-batches: ``batch = train_batcher.sample()``, ``loss = loss_fn(model, batch)`` under
   ``torch.autocast`` when ``precision == "bf16"``, ``(loss / grad_accum).backward()`` outside autocast.
2. ``grad_norm = clip_grad_norm_(params, grad_clip)`` (the norm before clipping; no clipping when
   ``grad_clip == 0``).
3. ``callback.before_optimizer_step(...)`` for each callback; any ``False`` skips ``optimizer.step()``.
4. ``scheduler.step()`` (always, so the schedule follows the step count), ``optimizer.zero_grad()``.
5. ``callback.on_step_end(...)``; a metrics line every ``log_every`` steps; evaluation every ``eval_every``
   steps and at the last step; a checkpoint every ``save_every`` steps and at the last step.

Resuming (``resume=PATH`` or ``"auto"``) restores the model, optimizer, scheduler, step, the global generators
(torch CPU and CUDA, Python ``random``, numpy) and the train batcher's generator, so a run that stops after N
steps and resumes continues the exact trajectory of an uninterrupted run (bit for bit on CPU, given the same
configuration).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..amp import (
    PRECISIONS,
    SpikeGuard,
    apply_precision_policy,
    autocast_context,
    make_grad_scaler,
    rollback_from_checkpoint,
    shrink_embedding_grad,
)
from ..eval.perplexity import perplexity
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .metrics import MetricsWriter, plot_loss_curve, read_metrics, truncate_metrics
from .schedule import warmup_cosine_scheduler

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "Callback",
    "TrainConfig",
    "TrainResult",
    "default_loss",
    "make_optimizer",
    "param_groups",
    "register_optimizer",
    "resolve_device",
    "train",
]

SPIKE_GUARD_ACTIONS = ("off", "skip", "lower_lr", "rollback")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
SPIKES_NAME = "spikes.jsonl"
PLOT_NAME = "loss.png"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (the CLI only parses into this).

    Attributes:
        steps: optimizer steps in the run (> 0); the LR schedule spans them.
        batch_size, block_size: shape (B, T) of one micro-batch; they describe the batchers (the CLI builds
            the batchers from them and ``lowbit eval ppl`` rebuilds the validation windows from them).
        grad_accum: micro-batches per optimizer step (>= 1); tokens per step = B * T * grad_accum.
        lr: peak learning rate (> 0). min_lr: floor of the cosine decay, in [0, lr]; None -> lr / 10.
        warmup_steps: linear warmup steps, in [0, steps]; None -> min(100, steps // 10).
        weight_decay: decoupled weight decay (>= 0), applied to parameters with ndim >= 2 only.
        betas: Adam betas, each in [0, 1).
        grad_clip: max global gradient norm (> 0), or 0 for no clipping.
        eval_every: evaluate every this many steps (0: only at the end). eval_batches: validation batches per
            evaluation (>= 1), from ``val_batcher.eval_batches(eval_batches)``.
        log_every: write a metrics line every this many steps (>= 1; the last step is always logged).
        save_every: write a checkpoint every this many steps (0: only at the end; needs out_dir).
        precision: "fp32", "bf16" or "fp16": the ``lowbit.amp`` policy, i.e. ``torch.autocast`` in that dtype
            with norms, embeddings, the head, softmax and cross-entropy in fp32; fp16 adds a GradScaler.
        embedding_grad_scale: multiply the gradient reaching the embeddings by this, in (0, 1] (GLM-130B's
            shrink, ``lowbit.amp.shrink_embedding_grad``); 1.0 = off.
        spike_guard: "off", or a ``lowbit.amp.SpikeGuard`` skipping steps whose loss or gradient norm is
            non-finite or spikes; after 3 spikes in a row it does nothing more ("skip"), halves the learning
            rate ("lower_lr") or reloads out_dir/checkpoint.pt ("rollback", needs out_dir).
        seed: seeds torch, Python ``random`` and numpy at the start of a fresh (not resumed) run.
        out_dir: folder for checkpoint.pt, metrics.jsonl and loss.png; None writes nothing.
        progress: show a tqdm bar (only when stderr is a terminal).
        device: "auto" (CUDA when available, else CPU) or a torch device string ("cpu", "cuda", "cuda:1").
        optimizer: name in ``OPTIMIZERS`` used when ``train`` is given no optimizer.
    """

    steps: int = 1000
    batch_size: int = 32
    block_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 1000
    precision: str = "fp32"
    embedding_grad_scale: float = 1.0
    spike_guard: str = "off"
    seed: int = 1337
    out_dir: str | None = None
    progress: bool = True
    device: str = "auto"
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "grad_accum", "eval_batches", "log_every"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be an int > 0, got {value!r}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: only at the end), got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not _is_real(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        if not _is_real(min_lr) or not 0 <= min_lr <= self.lr:
            raise ValueError(f"min_lr must be a number in [0, lr={self.lr}], got {self.min_lr!r}")
        object.__setattr__(self, "min_lr", float(min_lr))
        object.__setattr__(self, "lr", float(self.lr))
        warmup = min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps
        if not _is_int(warmup) or not 0 <= warmup <= self.steps:
            raise ValueError(
                f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}"
            )
        object.__setattr__(self, "warmup_steps", warmup)
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if not _is_real(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"grad_clip must be a number >= 0 (0: no clipping), got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not _is_real(self.embedding_grad_scale) or not 0 < self.embedding_grad_scale <= 1:
            raise ValueError(
                f"embedding_grad_scale must be in (0, 1] (1 = off), got {self.embedding_grad_scale!r}"
            )
        object.__setattr__(self, "embedding_grad_scale", float(self.embedding_grad_scale))
        if self.spike_guard not in SPIKE_GUARD_ACTIONS:
            raise ValueError(f"spike_guard must be one of {SPIKE_GUARD_ACTIONS}, got {self.spike_guard!r}")
        if self.spike_guard == "rollback" and self.out_dir is None:
            raise ValueError("spike_guard='rollback' reloads out_dir/checkpoint.pt: it needs out_dir")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)):
                raise ValueError(f"out_dir must be a path or None, got {self.out_dir!r}")
            object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be a bool, got {self.progress!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string ('auto', 'cpu', 'cuda', ...), got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(
                    f"device must be 'auto' or a torch device string, got {self.device!r}"
                ) from exc
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise ValueError(f"optimizer must be a non-empty name, got {self.optimizer!r}")

    @property
    def tokens_per_step(self) -> int:
        """batch_size * block_size * grad_accum."""
        return self.batch_size * self.block_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (as stored in checkpoints); ``TrainConfig(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`.

    ``step``: optimizer steps completed (== config.steps after a full run); ``train_loss``: mean train loss of
    the last logging interval; ``val_loss`` / ``val_ppl``: last evaluation (None without a val batcher);
    ``best_val_loss``: lowest evaluation over the run, resumed part included; ``tokens``: tokens trained on,
    resumed part included; ``tokens_per_s``: throughput of this call's steps (evaluation and checkpoint time
    excluded); ``elapsed_s``: wall time of this call; paths are None when out_dir is None.
    """

    step: int
    train_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    best_val_loss: float | None
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    metrics_path: Path | None
    plot_path: Path | None
    checkpoint_path: Path | None


class Callback:
    """Hooks into :func:`train`. Subclass and override what you need; every method is a no-op here.

    Duck-typed objects work as well: the loop calls only the methods an object has, by keyword, passing only
    the keywords the method's signature names (or all of them to a method taking ``**kwargs``).
    """

    def on_train_start(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        start_step: int,
    ) -> None:
        """Once, after the optimizer is built and any checkpoint is restored."""

    def before_optimizer_step(
        self,
        *,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: float,
        grad_norm: float,
    ) -> bool | None:
        """After backward and clipping, before ``optimizer.step()``; return False to skip this update."""
        return None

    def on_step_end(self, *, step: int, loss: float, grad_norm: float, lr: float, skipped: bool) -> None:
        """After each step (``loss``: mean over the micro-batches; ``grad_norm``: before clipping)."""

    def on_eval(self, *, step: int, val_loss: float, val_ppl: float) -> None:
        """After each evaluation."""

    def on_train_end(self, *, result: TrainResult) -> None:
        """Once, after the final checkpoint and plot."""


# ---------------------------------------------------------------------------------------------- optimizers

OptimizerFactory = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Register ``factory(param_groups, *, lr, betas) -> Optimizer`` under ``name`` (for ``make_optimizer``,
    ``TrainConfig.optimizer`` and the CLI's ``--optimizer``). Re-registering a name replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"optimizer name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    OPTIMIZERS[name] = factory


def _adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


register_optimizer("adamw", _adamw)


def _adamw8bit(
    groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    from lowbit.optim import AdamW8bit  # the trainer sits above the capabilities; imported when chosen

    return AdamW8bit(groups, lr=lr, betas=betas)


register_optimizer("adamw8bit", _adamw8bit)


def param_groups(
    model: torch.nn.Module, weight_decay: float, *, lr: float | None = None
) -> list[dict[str, Any]]:
    """Two groups of the trainable parameters: ndim >= 2 (matrices, embeddings) with ``weight_decay``, the
    rest (biases, norm gains) without. Shared (tied) parameters appear once. Empty groups are dropped; when
    ``lr`` is given every group carries it."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("model has no trainable parameters")
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return groups


def make_optimizer(
    name: str,
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over :func:`param_groups` (decay on ndim >= 2 only)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](param_groups(model, weight_decay), lr=lr, betas=tuple(betas))


# ---------------------------------------------------------------------------------------------- helpers


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else -> ``torch.device(device)`` (CUDA checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """``model(x, y)[1]``: the mean next-token cross-entropy returned by ``lowbit.models.GPT``."""
    x, y = batch
    return model(x, y)[1]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_tokens(batch: Any, fallback: int) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return first.numel() if isinstance(first, torch.Tensor) else fallback


def _batcher_state(batcher: Any) -> dict[str, Any] | None:
    if hasattr(batcher, "state_dict"):
        return batcher.state_dict()
    generator = getattr(batcher, "generator", None)
    if isinstance(generator, torch.Generator):
        return {"generator": generator.get_state()}
    return None


def _restore_batcher(batcher: Any, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    if hasattr(batcher, "load_state_dict"):
        batcher.load_state_dict(state)
        return
    generator = getattr(batcher, "generator", None)
    if isinstance(generator, torch.Generator) and "generator" in state:
        generator.set_state(state["generator"])
        return
    warnings.warn(
        "the train batcher has no load_state_dict/generator: the resumed data order will differ", stacklevel=3
    )


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` accepts by name (all of them when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def _call(callbacks: Sequence[Any], method: str, **kwargs: Any) -> list[Any]:
    """Call ``method`` on every callback that has it, with the keywords it accepts (so a hook written as
    ``before_optimizer_step(self, step, model, optimizer)`` works without the newer keywords)."""
    results = []
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if fn is not None:
            results.append(fn(**_accepted(fn, kwargs)))
    return results


# Fields whose change on resume alters the trajectory (others: logging, output, device).
_TRAJECTORY_FIELDS = (
    "batch_size",
    "block_size",
    "grad_accum",
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "betas",
    "grad_clip",
    "precision",
    "embedding_grad_scale",
    "spike_guard",
    "steps",
    "optimizer",
)


def _resolve_resume(resume: str | os.PathLike | None, ckpt_path: Path | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        if ckpt_path is None:
            raise ValueError("resume='auto' needs config.out_dir (it looks for out_dir/checkpoint.pt)")
        return ckpt_path if ckpt_path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint not found: {str(path)!r}")
    return path


# ---------------------------------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    train_batcher: Any,
    val_batcher: Any | None,
    config: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    callbacks: Iterable[Any] = (),
    resume: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps (see the module docstring for one step).

    Args:
        model: moved to the run's device. Its forward must suit ``loss_fn``; for evaluation ``model(x)`` must
            give logits as ``lowbit.eval.perplexity`` accepts.
        train_batcher: ``.sample()`` -> a batch (by default an ``(x, y)`` pair of (B, T) long tensors); its
            ``state_dict``/``load_state_dict`` (or a ``.generator`` attribute) make resuming exact.
        val_batcher: ``.eval_batches(n)`` -> deterministic ``(x, y)`` batches, or None (no evaluation).
        config: a :class:`TrainConfig`.
        optimizer: None (``make_optimizer(config.optimizer, ...)``: AdamW, decay on ndim >= 2), an optimizer
            built over the model's parameters (its learning rates are the peaks the schedule scales), or a
            factory called with :func:`param_groups` (each group carrying ``lr=config.lr``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default :func:`default_loss` (``model(x, y)[1]``).
        callbacks: objects with any of the :class:`Callback` methods.
        resume: None (fresh run), a checkpoint path, or "auto" (out_dir/checkpoint.pt when it exists, else a
            fresh run). A missing explicit path raises ``FileNotFoundError``.
        extra: stored under ``"extra"`` in every checkpoint (e.g. tokenizer state, model name and config).

    Returns:
        :class:`TrainResult`.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    callbacks = list(callbacks)
    loss_fn = default_loss if loss_fn is None else loss_fn
    device = resolve_device(config.device)
    model.to(device)
    # Before the optimizer: the policy casts the fp32 islands' parameters (in place, same Parameter objects).
    policy = apply_precision_policy(model, config.precision)
    shrink = None
    if config.embedding_grad_scale != 1.0:
        shrink = shrink_embedding_grad(model, config.embedding_grad_scale)
    scaler = make_grad_scaler(config.precision, device)

    if optimizer is None:
        opt = make_optimizer(config.optimizer, model, config.lr, config.weight_decay, config.betas)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(param_groups(model, config.weight_decay, lr=config.lr))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
    else:
        raise TypeError(f"optimizer must be None, an Optimizer or a factory, got {type(optimizer).__name__}")
    scheduler = warmup_cosine_scheduler(
        opt, warmup_steps=config.warmup_steps, total_steps=config.steps, min_ratio=config.min_lr / config.lr
    )

    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    metrics_path = out_dir / METRICS_NAME if out_dir is not None else None
    plot_path = out_dir / PLOT_NAME if out_dir is not None else None
    guard = None
    if config.spike_guard != "off":
        guard = SpikeGuard(
            action={"skip": "none", "lower_lr": "lower_lr", "rollback": "rollback"}[config.spike_guard],
            rollback_fn=rollback_from_checkpoint(ckpt_path) if ckpt_path is not None else None,
            count_grad_overflow=config.precision != "fp16",  # fp16 overflows are the GradScaler's to skip
            log_path=out_dir / SPIKES_NAME if out_dir is not None else None,
        )
        callbacks.insert(0, guard)

    start_step, best_val, train_loss, resumed_tokens = 0, math.inf, None, None
    resume_path = _resolve_resume(resume, ckpt_path)
    if resume_path is not None:
        payload = load_checkpoint(resume_path, map_location="cpu")
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        start_step = int(payload["step"])
        best_val = payload.get("best_val_loss")
        best_val = math.inf if best_val is None else best_val
        train_loss = payload.get("train_loss")
        resumed_tokens = payload.get("tokens")
        old = payload.get("config", {})
        changed = [k for k in _TRAJECTORY_FIELDS if k in old and old[k] != config.to_dict()[k]]
        if changed:
            warnings.warn(
                f"resuming with changed settings {changed}: the run will not follow the original trajectory",
                stacklevel=2,
            )
        restore_rng_state(payload["rng"])
        _restore_batcher(train_batcher, payload.get("batcher"))
        if payload.get("grad_scaler"):
            scaler.load_state_dict(payload["grad_scaler"])
        if guard is not None and payload.get("spike_guard"):
            guard.load_state_dict(payload["spike_guard"])
    else:
        _seed_everything(config.seed)

    if metrics_path is not None:
        if resume_path is not None:
            truncate_metrics(metrics_path, start_step)
        elif metrics_path.exists():
            metrics_path.unlink()
    writer = MetricsWriter(metrics_path) if metrics_path is not None else None
    _call(callbacks, "on_train_start", model=model, optimizer=opt, config=config, start_step=start_step)

    autocast = autocast_context(config.precision, device)
    params = [p for group in opt.param_groups for p in group["params"]]
    show_bar = config.progress and sys.stderr.isatty()
    val_loss = val_ppl = None
    last_eval_step = -1
    tokens = resumed_tokens if resumed_tokens is not None else start_step * config.tokens_per_step
    run_tokens, run_time = 0, 0.0
    # A data-parallel batcher (lowbit.trainer.distributed.RankSlicedBatcher) hands this rank 1/world_size of
    # each global batch; tokens and tokens/s count the global batch.
    data_parallel = int(getattr(train_batcher, "world_size", 1) or 1)
    interval_losses: list[float] = []
    interval_tokens, interval_time = 0, 0.0
    t_call = time.perf_counter()

    def evaluate(step: int, *, log: bool = True) -> None:
        nonlocal val_loss, val_ppl, best_val, last_eval_step
        result = perplexity(
            model, val_batcher.eval_batches(config.eval_batches), device=device, precision=config.precision
        )
        val_loss, val_ppl, last_eval_step = result.loss, result.ppl, step
        best_val = min(best_val, val_loss)
        if writer is not None and log:
            writer.write({"step": step, "val_loss": val_loss, "val_ppl": val_ppl})
        _call(callbacks, "on_eval", step=step, val_loss=val_loss, val_ppl=val_ppl)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": capture_rng_state(),
                "batcher": _batcher_state(train_batcher),
                "config": config.to_dict(),
                "train_loss": train_loss,
                "tokens": tokens,
                "best_val_loss": None if math.isinf(best_val) else best_val,
                "grad_scaler": scaler.state_dict(),
                "spike_guard": guard.state_dict() if guard is not None else None,
                "extra": dict(extra or {}),
            },
        )

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start_step, disable=not show_bar, desc="train", dynamic_ncols=True)
    model.train()
    try:
        for step in range(start_step + 1, config.steps + 1):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            step_tokens = 0
            for _ in range(config.grad_accum):
                batch = _to_device(train_batcher.sample(), device)
                step_tokens += _batch_tokens(batch, config.batch_size * config.block_size) * data_parallel
                with autocast:
                    loss = loss_fn(model, batch)
                scaler.scale(loss / config.grad_accum).backward()
                loss_sum += loss.detach().float()
            step_loss = (loss_sum / config.grad_accum).item()
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
            scaler.unscale_(opt)  # fp16: clip and report the true gradient norm (no-op otherwise)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr = opt.param_groups[0]["lr"]
            votes = _call(
                callbacks,
                "before_optimizer_step",
                step=step,
                model=model,
                optimizer=opt,
                loss=step_loss,
                grad_norm=grad_norm,
            )
            skipped = any(v is False for v in votes)
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            if not skipped:
                scaler.step(opt)  # opt.step(), unless fp16 gradients overflowed
            scaler.update()
            if scale_before is not None and scaler.get_scale() < scale_before:
                skipped = True  # the GradScaler found inf/NaN gradients and skipped the step
            with warnings.catch_warnings():  # a skipped first update makes LambdaLR warn about the call order
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0

            tokens += step_tokens
            run_tokens += step_tokens
            run_time += dt
            interval_losses.append(step_loss)
            interval_tokens += step_tokens
            interval_time += dt
            bar.update(1)
            _call(
                callbacks,
                "on_step_end",
                step=step,
                loss=step_loss,
                grad_norm=grad_norm,
                lr=lr,
                skipped=skipped,
            )

            if step % config.log_every == 0 or step == config.steps:
                train_loss = sum(interval_losses) / len(interval_losses)
                tok_s = interval_tokens / interval_time if interval_time > 0 else math.inf
                if writer is not None:
                    writer.write(
                        {
                            "step": step,
                            "loss": train_loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_s": tok_s,
                            "tokens": tokens,
                            **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
                            **(guard.metrics() if guard is not None else {}),
                        }
                    )
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                interval_losses, interval_tokens, interval_time = [], 0, 0.0
            if val_batcher is not None and (
                (config.eval_every and step % config.eval_every == 0) or step == config.steps
            ):
                evaluate(step)
            if ckpt_path is not None and (
                (config.save_every and step % config.save_every == 0) or step == config.steps
            ):
                checkpoint(step)
        final_step = max(start_step, config.steps)
        if val_batcher is not None and last_eval_step != final_step:
            # Resumed from a checkpoint at or past the last step: nothing to train; report the validation
            # loss without logging it again.
            evaluate(final_step, log=False)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        policy.remove()
        if shrink is not None:
            shrink.remove()
    if plot_path is not None:
        plot_loss_curve(read_metrics(metrics_path), plot_path, title=f"{out_dir.name}: loss")
    result = TrainResult(
        step=final_step,
        train_loss=train_loss,
        val_loss=val_loss,
        val_ppl=val_ppl,
        best_val_loss=None if math.isinf(best_val) else best_val,
        tokens=tokens,
        tokens_per_s=run_tokens / run_time if run_time > 0 else 0.0,
        elapsed_s=time.perf_counter() - t_call,
        metrics_path=metrics_path,
        plot_path=plot_path,
        checkpoint_path=ckpt_path if ckpt_path is not None and ckpt_path.is_file() else None,
    )
    _call(callbacks, "on_train_end", result=result)
    return result
