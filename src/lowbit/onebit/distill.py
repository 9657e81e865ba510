"""Knowledge distillation of a OneBit student from its full-precision teacher (Xu et al. 2024, section 3.4).

    L = L_KD + α · L_HS
    L_KD = τ² · (1 / N) Σ_tokens KL( softmax(z_T / τ) ‖ softmax(z_S / τ) )                           (eq. 7)
    L_HS = Σ_layers (1 / N) Σ_tokens ‖ h_T / ‖h_T‖ − h_S / ‖h_S‖ ‖²                                  (eq. 8)

z are the logits, h the output of each transformer block (the residual stream after the block), N the
number of tokens. τ = 1 and α = 1 by default, as in the paper; the τ² factor (Hinton et al.) keeps the
gradient scale independent of τ and is 1 at the default. Everything is computed in fp32.

:func:`distill` runs this loss on ``lowbit.trainer.train`` (AdamW, warmup + cosine schedule, clipping, bf16
autocast, evaluation, checkpoints and resume exactly as for training). The teacher stays in eval mode without
gradients; only the student's chosen parameters train.

Under torchrun (a process group of more than one rank) the teacher is replicated on every rank (not wrapped,
no gradients) and the student is wrapped with DDP or sharded with FSDP2 (``parallel``); each rank distills on
its slice of every global batch, so the run follows the single-process one (see docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.outputs import logits_of
from .layer import OneBitLinear

__all__ = [
    "TRAINABLE",
    "DistillConfig",
    "DistillLoss",
    "TimeBudget",
    "distill",
    "find_blocks",
    "forward_with_hidden",
    "hidden_state_loss",
    "logits_of",
    "logit_kl",
    "set_trainable",
]

#: Which student parameters train: only the OneBit layers' (latent weight, g, h, bias); those plus every
#: other parameter except embeddings and the output head (norm gains); or everything.
TRAINABLE = ("onebit", "onebit+norms", "all")

# Known homes of the transformer-block list, tried before the generic search.
_BLOCK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "layers", "h")


# ---------------------------------------------------------------------------------------------- pure losses


def logit_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """τ² · mean over tokens of KL(softmax(teacher / τ) ‖ softmax(student / τ)), an fp32 scalar.

    Args:
        student_logits, teacher_logits: (..., V) of the same shape; any float dtype (computed in fp32).
        temperature: τ > 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    v = student_logits.shape[-1]
    log_p_s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)  # sum / tokens
    return kl * temperature**2


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Σ over layers of the mean over tokens of ‖ĥ_T − ĥ_S‖², ĥ = h / ‖h‖ over the last dim; fp32 scalar.

    Each entry is (..., C); student and teacher lists must have the same length and shapes. A zero vector
    normalizes to zero (``F.normalize`` with eps 1e-12).
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}; they must match"
        )
    if not student_hidden:
        raise ValueError("no hidden states to compare")
    total = torch.zeros((), dtype=torch.float32, device=student_hidden[0].device)
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden state {i}: student {tuple(hs.shape)} != teacher {tuple(ht.shape)}")
        diff = F.normalize(ht.float(), dim=-1) - F.normalize(hs.float(), dim=-1)
        total = total + diff.pow(2).sum(-1).mean()
    return total


# ---------------------------------------------------------------------------------------------- capture


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer-block list of a model: ``model.layers`` (HF LLaMA-like), ``transformer.h`` (lowbit GPT,
    GPT-2), ``model.decoder.layers``, ``gpt_neox.layers``; otherwise the longest ``nn.ModuleList``."""
    for path in _BLOCK_PATHS:
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return m
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return max(lists, key=len)


def forward_with_hidden(model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``model(idx)`` and capture each transformer block's output with forward hooks.

    Works alike for lowbit GPT and Hugging Face decoders (a block returning a tuple contributes its first
    item). HF models are called with ``use_cache=False``.

    Returns:
        ``(logits (B, T, V), [hidden (B, T, C) per block, in order])``.
    """
    blocks = find_blocks(model)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        if hasattr(model, "config") and hasattr(model.config, "use_cache"):
            out = model(idx, use_cache=False)
        else:
            out = model(idx)
    finally:
        for hd in handles:
            hd.remove()
    if len(captured) != len(blocks):
        raise RuntimeError(f"captured {len(captured)} block outputs for {len(blocks)} blocks")
    return logits_of(out), captured


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill`.

    Attributes:
        temperature: τ of the logit KL (> 0, default 1).
        alpha: weight α of the hidden-state loss (>= 0, default 1; 0 = logits only).
        trainable: one of ``TRAINABLE`` (default "onebit": the OneBit layers' parameters only; embeddings,
            norms and the head frozen, as the official code freezes the norm gains).
        time_budget_s: stop after this many seconds of training (None: run ``train.steps``). The run ends with
            the usual evaluation, checkpoint and metrics; the learning-rate schedule still spans
            ``train.steps``, so choose ``steps`` to fit the budget (``lowbit.onebit.compress`` measures the
            step time first) and keep this as a safety net.
        train: the ``lowbit.trainer.TrainConfig`` of the run (steps, batch, lr, schedule, precision, output).
    """

    temperature: float = 1.0
    alpha: float = 1.0
    trainable: str = "onebit"
    time_budget_s: float | None = None
    train: Any = field(default=None)

    def __post_init__(self) -> None:
        from ..trainer import TrainConfig

        for name in ("temperature", "alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.time_budget_s is not None and (
            isinstance(self.time_budget_s, bool)
            or not isinstance(self.time_budget_s, (int, float))
            or not self.time_budget_s > 0
        ):
            raise ValueError(f"time_budget_s must be None or a number > 0, got {self.time_budget_s!r}")
        train = self.train
        if train is None:
            train = TrainConfig(lr=4e-4, weight_decay=0.0)
        if not isinstance(train, TrainConfig):
            raise TypeError(f"train must be a lowbit.trainer.TrainConfig, got {type(train).__name__}")
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "alpha", float(self.alpha))

    def replace(self, **changes: Any) -> DistillConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------- loss


class DistillLoss:
    """``loss_fn(student, batch)`` for ``lowbit.trainer.train``: L_KD + α·L_HS against a fixed teacher.

    ``batch`` is an ``(x, y)`` pair (y unused) or a bare (B, T) tensor of token ids. The teacher runs under
    ``torch.no_grad`` (and under the trainer's autocast). ``last`` holds the detached parts of the latest call
    (``kd``, ``hidden``), for logging.
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 1.0, alpha: float = 1.0):
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, student: nn.Module, batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        need_hidden = self.alpha != 0
        with torch.no_grad():
            if need_hidden:
                t_logits, t_hidden = forward_with_hidden(self.teacher, x)
            else:
                t_logits, t_hidden = logits_of(self.teacher(x)), []
        if need_hidden:
            s_logits, s_hidden = forward_with_hidden(student, x)
        else:
            s_logits, s_hidden = logits_of(student(x)), []
        kd = logit_kl(s_logits, t_logits, self.temperature)
        loss = kd
        if need_hidden:
            hs = hidden_state_loss(s_hidden, t_hidden)
            loss = kd + self.alpha * hs
            self.last = {"kd": kd.detach(), "hidden": hs.detach()}
        else:
            self.last = {"kd": kd.detach()}
        return loss


# ---------------------------------------------------------------------------------------------- run


def set_trainable(student: nn.Module, trainable: str) -> int:
    """Set ``requires_grad`` of the student's parameters per ``trainable`` (see ``TRAINABLE``); returns the
    number of trainable parameters. Embeddings and whatever shares their weight (a tied head) are frozen
    except for "all"."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    layers = [m for m in student.modules() if isinstance(m, OneBitLinear)]
    if not layers:
        raise ValueError("the student has no OneBitLinear layers; call convert_to_onebit first")
    onebit_ids = {id(p) for m in layers for p in m.parameters()}
    embedding_ids = {id(p) for m in student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    head = head if head is not None else getattr(student, "lm_head", None)
    if isinstance(head, nn.Module):
        embedding_ids |= {id(p) for p in head.parameters()}
    for p in student.parameters():
        if trainable == "all":
            p.requires_grad_(True)
        elif trainable == "onebit":
            p.requires_grad_(id(p) in onebit_ids)
        else:
            p.requires_grad_(id(p) not in embedding_ids)
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


class _StopTraining(Exception):
    pass


class TimeBudget:
    """Trainer callback: raise a stop signal once ``seconds`` of training have passed (checked after each
    step). :func:`distill` catches it; used directly, the trainer's ``train`` propagates it."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start: float | None = None
        self.stopped_at: int | None = None

    def on_train_start(self, **_: Any) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, *, step: int, **_: Any) -> None:
        over = self.start is not None and time.perf_counter() - self.start > self.seconds
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank must stop after the same step (FSDP2 / DDP collectives would hang otherwise)
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([float(over)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over = bool(flag.item() > 0)
        if over:
            self.stopped_at = step
            raise _StopTraining(step)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: Any,
    config: DistillConfig | None = None,
    *,
    val_data: Any | None = None,
    resume: str | os.PathLike | None = None,
    callbacks: Iterable[Any] = (),
    optimizer: Any = None,
    extra: dict[str, Any] | None = None,
    parallel: str = "ddp",
):
    """Distill ``teacher`` into the OneBit ``student`` with ``lowbit.trainer.train``.

    Args:
        teacher: the full-precision model (any dtype; bf16 is enough and fast on CUDA). Put in eval mode,
            its parameters frozen, and moved to the run's device.
        student: the converted model (``convert_to_onebit``); trained in place, fp32 master weights.
        data: a train batcher (``.sample()`` -> ``(x, y)`` or x of (B, T) token ids), e.g. a
            ``lowbit.data.TokenBatcher`` over synthetic teacher text (``generate_synthetic_corpus``) and/or
            real text.
        config: :class:`DistillConfig` (default: τ = 1, α = 1, OneBit parameters only, ``TrainConfig(lr=4e-4,
            weight_decay=0)`` — AdamW with warmup + cosine decay; ``train.optimizer`` picks another registered
            optimizer, e.g. an 8-bit one).
        val_data: ``.eval_batches(n)`` -> ``(x, y)`` for perplexity evaluations (``train.eval_every``), or
            None.
        resume, callbacks, optimizer, extra: as ``lowbit.trainer.train``.
        parallel: under torchrun with a world size above 1 (``WORLD_SIZE`` set, or a process group already
            initialized): "ddp" (default) or "fsdp2" for the student; ignored in a single process. ``data``
            is then the GLOBAL batcher, built alike on every rank (same seed): each rank keeps its rows
            (``RankSlicedBatcher``); rank 0 alone writes ``train.out_dir``; each rank runs on
            ``cuda:LOCAL_RANK`` (or the CPU with ``train.device="cpu"``).

    Returns:
        The trainer's ``TrainResult`` (``val_ppl`` is the student's perplexity on ``val_data``). If the time
        budget stopped the run, ``result.step`` is the last step done and a final evaluation is included.
    """
    from ..trainer import resolve_device, train

    config = DistillConfig() if config is None else config
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    if teacher is student:
        raise ValueError("teacher and student must be different modules (convert a copy of the teacher)")
    from ..trainer.distributed import join_process_group

    env = join_process_group(config.train.device)
    if env is not None:
        config = config.replace(train=dataclasses.replace(config.train, device=str(env.device)))
    device = resolve_device(config.train.device)
    teacher.eval().requires_grad_(False).to(device)  # replicated on every rank, never wrapped
    n_trainable = set_trainable(student, config.trainable)
    if n_trainable == 0:
        raise ValueError("no trainable parameters")
    loss_fn = DistillLoss(teacher, temperature=config.temperature, alpha=config.alpha)
    callbacks = list(callbacks)
    budget = TimeBudget(config.time_budget_s) if config.time_budget_s is not None else None
    if budget is not None:
        callbacks.append(budget)
    extra = {
        "distill": {k: v for k, v in dataclasses.asdict(config).items() if k != "train"},
        **(extra or {}),
    }
    kwargs: dict[str, Any] = {"model": student, "train_batcher": data, "config": config.train,
                              "optimizer": optimizer, "loss_fn": loss_fn, "callbacks": callbacks,
                              "resume": resume}
    if env is not None:  # wrap AFTER set_trainable: DDP and FSDP2 record which parameters train
        from ..trainer.distributed import parallel_train_kwargs

        student.to(device)
        kwargs = parallel_train_kwargs(student, data, config.train, parallel=parallel, optimizer=optimizer,
                                       loss_fn=loss_fn, callbacks=callbacks, resume=resume)
    try:
        result = train(val_batcher=val_data, extra=extra, **kwargs)
    except _StopTraining:
        result = _finish_early(student, val_data, config, budget)
    if env is not None:  # rank 0's checkpoint and metrics are complete when any rank returns
        torch.distributed.barrier()
    student.eval()
    return result


def _finish_early(student: nn.Module, val_data: Any, config: DistillConfig, budget: TimeBudget):
    """A ``TrainResult`` for a run the time budget stopped (evaluated once more, nothing else written)."""
    from ..eval import perplexity
    from ..trainer import TrainResult, resolve_device

    step = int(budget.stopped_at or 0)
    val_loss = val_ppl = None
    if val_data is not None:
        r = perplexity(
            student,
            val_data.eval_batches(config.train.eval_batches),
            device=resolve_device(config.train.device),
            precision=config.train.precision,
        )
        val_loss, val_ppl = r.loss, r.ppl
    elapsed = time.perf_counter() - (budget.start or time.perf_counter())
    tokens = step * config.train.tokens_per_step
    return TrainResult(
        step=step,
        train_loss=None,
        val_loss=val_loss,
        val_ppl=val_ppl,
        best_val_loss=val_loss,
        tokens=tokens,
        tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        elapsed_s=elapsed,
        metrics_path=None,
        plot_path=None,
        checkpoint_path=None,
    )
