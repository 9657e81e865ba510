"""Hooks that gather per-layer statistics while a model runs a few batches.

Every ``nn.Linear`` (subclasses included) gets a forward pre-hook that sees its input x (any leading shape,
flattened to (N, K) tokens × features) and updates the accumulators of :mod:`lowbit.inspect.stats`; ReLU
modules get a forward hook (dead units), Sigmoid and Tanh modules a pre-hook (saturated inputs). ReLU,
sigmoid or tanh called as functions inside a forward are not seen.

Costs are bounded: SQNR uses at most ``max_tokens`` rows of x per batch and ``max_out_features`` rows of W
(evenly spaced, the same rows every batch), so inspecting SmolLM2-135M's 211 linear layers costs a few
GFLOP per batch. Absmax, kurtosis and per-channel absmax use every element.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..models.outputs import output_head_ids
from ..quant import GRANULARITIES, is_power_of_two
from .stats import Moments, SqnrSum, can_rotate, fake_quant, kurtosis, rotate

__all__ = [
    "ActivationStats",
    "Collected",
    "InspectSettings",
    "LinearStats",
    "capture_input",
    "collect_stats",
    "variant_key",
]


def variant_key(bits: int, block: int | None) -> str:
    """ "int4" (no rotation) or "int4_h32" (Hadamard blocks of 32) etc."""
    return f"int{bits}" if block is None else f"int{bits}_h{block}"


@dataclass(frozen=True)
class InspectSettings:
    """What :func:`collect_stats` measures. Checked when built.

    Attributes:
        bits: integer widths to quantize to (each in 2..8). Default (8, 4).
        blocks: Hadamard block sizes (powers of two); a block that does not divide a layer's in_features is
            reported as not applicable. Default (32, 128).
        max_batches: batches to run (>= 1). Default 4.
        max_tokens: rows of x per batch used for SQNR (>= 1). Default 1024.
        max_out_features: rows of W used for SQNR (>= 1). Default 256.
        outlier_ratio: a feature is an outlier when its absmax exceeds this × the median feature absmax.
        act_granularity, weight_granularity: quantization granularity of x and W ("token" and "channel").
        head_names: last name components marking the output head (also ``model.get_output_embeddings()``).
        sigmoid_limit, tanh_limit: |input| beyond which sigmoid / tanh count as saturated (6 and 3).
    """

    bits: tuple[int, ...] = (8, 4)
    blocks: tuple[int, ...] = (32, 128)
    max_batches: int = 4
    max_tokens: int = 1024
    max_out_features: int = 256
    outlier_ratio: float = 6.0
    act_granularity: str = "token"
    weight_granularity: str = "channel"
    head_names: tuple[str, ...] = ("lm_head",)
    sigmoid_limit: float = 6.0
    tanh_limit: float = 3.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "head_names", tuple(self.head_names))
        if not self.bits or not all(
            isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in self.bits
        ):
            raise ValueError(f"bits must be ints in [2, 8], got {self.bits!r}")
        if not all(is_power_of_two(b) for b in self.blocks):
            raise ValueError(f"blocks must be powers of two, got {self.blocks!r}")
        for name in ("max_batches", "max_tokens", "max_out_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("outlier_ratio", "sigmoid_limit", "tanh_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        for name in ("act_granularity", "weight_granularity"):
            if getattr(self, name) not in GRANULARITIES or getattr(self, name) == "group":
                raise ValueError(
                    f"{name} must be 'tensor', 'channel' or 'token', got {getattr(self, name)!r}"
                )

    @property
    def variants(self) -> list[tuple[int, int | None]]:
        """(bits, block) pairs, block None first."""
        return [(b, blk) for b in self.bits for blk in (None, *self.blocks)]


@dataclass
class LinearStats:
    """Accumulated statistics of one linear layer (see :mod:`lowbit.inspect.stats` for the definitions).

    ``output_sqnr`` / ``input_sqnr`` / ``weight_sqnr`` map :func:`variant_key` to an accumulator (dB for
    the weight), for the variants whose block divides ``in_features``. ``channel_absmax``: (K,) fp32, CPU.
    """

    name: str
    in_features: int
    out_features: int
    is_head: bool
    weight_absmax: float
    weight_kurtosis: float | None
    weight_sqnr: dict[str, float | None]
    input_moments: Moments = field(default_factory=Moments)
    input_absmax: float = 0.0
    channel_absmax: torch.Tensor | None = None
    output_sqnr: dict[str, SqnrSum] = field(default_factory=dict)
    input_sqnr: dict[str, SqnrSum] = field(default_factory=dict)
    tokens: int = 0
    calls: int = 0


@dataclass
class ActivationStats:
    """ReLU: ``alive`` marks units (last dim) that were ever > 0. Sigmoid / tanh: ``saturated`` of
    ``elements`` inputs were beyond the limit."""

    name: str
    kind: str
    elements: int = 0
    saturated: int = 0
    alive: torch.Tensor | None = None

    @property
    def dead_share(self) -> float | None:
        if self.kind != "relu" or self.alive is None or self.alive.numel() == 0:
            return None
        return 1.0 - float(self.alive.float().mean())

    @property
    def saturated_share(self) -> float | None:
        if self.kind == "relu" or self.elements == 0:
            return None
        return self.saturated / self.elements


@dataclass
class Collected:
    """Result of :func:`collect_stats`: ``layers`` in model order, ``activations``, batches and tokens run."""

    layers: list[LinearStats]
    activations: list[ActivationStats]
    batches: int
    tokens: int
    settings: InspectSettings


def _rows(n: int, limit: int, device) -> torch.Tensor | None:
    """Evenly spaced row indices (limit of n), or None for all rows."""
    if n <= limit:
        return None
    return torch.arange(limit, device=device) * n // limit


class _LinearProbe:
    def __init__(self, name: str, module: nn.Linear, is_head: bool, settings: InspectSettings):
        self.settings = settings
        w = module.weight.detach().float()
        k = w.shape[1]
        self.variants = [(b, blk) for b, blk in settings.variants if can_rotate(k, blk)]
        rows = _rows(w.shape[0], settings.max_out_features, w.device)
        self.w_sub = w if rows is None else w[rows]  # (M', K)
        self.wq: dict[str, torch.Tensor] = {}
        weight_sqnr: dict[str, float | None] = {}
        for bits, blk in self.variants:
            key = variant_key(bits, blk)
            # per-row scales: quantizing the row subset equals quantizing W and taking those rows; a
            # per-tensor scale needs all of W. The weight's own SQNR is measured on the same rows.
            w_full = settings.weight_granularity == "tensor"
            w_in = w if w_full or rows is None else self.w_sub
            w_basis = w_in if blk is None else rotate(w_in, blk)
            w_deq = fake_quant(w_basis, bits, settings.weight_granularity)
            if w_full and rows is not None:
                w_basis, w_deq = w_basis[rows], w_deq[rows]
            acc = SqnrSum()
            acc.update(w_basis, w_deq)
            weight_sqnr[key] = acc.db
            self.wq[key] = w_deq
        self.stats = LinearStats(
            name=name,
            in_features=k,
            out_features=w.shape[0],
            is_head=is_head,
            weight_absmax=float(w.abs().max()) if w.numel() else 0.0,
            weight_kurtosis=kurtosis(w),
            weight_sqnr=weight_sqnr,
            output_sqnr={variant_key(b, blk): SqnrSum() for b, blk in self.variants},
            input_sqnr={variant_key(b, blk): SqnrSum() for b, blk in self.variants},
        )

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        s = self.stats
        x = args[0].detach().float().reshape(-1, s.in_features)  # (N, K)
        s.calls += 1
        s.tokens += x.shape[0]
        if x.shape[0] == 0:
            return
        s.input_moments.update(x)
        ch = x.abs().amax(dim=0).cpu()
        s.channel_absmax = ch if s.channel_absmax is None else torch.maximum(s.channel_absmax, ch)
        s.input_absmax = max(s.input_absmax, float(ch.max()))
        rows = _rows(x.shape[0], self.settings.max_tokens, x.device)
        x = x if rows is None else x[rows]
        w_sub = self.w_sub.to(x.device)
        y_ref = x @ w_sub.t()  # (N', M'); the bias adds the same to y and ŷ, so it is left out
        rotated: dict[int | None, torch.Tensor] = {}
        for bits, blk in self.variants:
            key = variant_key(bits, blk)
            if blk not in rotated:
                rotated[blk] = x if blk is None else rotate(x, blk)
            x_basis = rotated[blk]
            x_deq = fake_quant(x_basis, bits, self.settings.act_granularity)
            s.input_sqnr[key].update(x_basis, x_deq)
            s.output_sqnr[key].update(y_ref, x_deq @ self.wq[key].to(x.device).t())


def _activation_kind(module: nn.Module) -> str | None:
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return "relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    return None


def _first_param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batch_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"each batch must be an input tensor or an (x, y) pair, got {type(batch).__name__}")


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable[Any],
    settings: InspectSettings | None = None,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    device: str | torch.device | None = None,
) -> Collected:
    """Run up to ``settings.max_batches`` batches through ``model`` and gather per-layer statistics.

    Args:
        model: any module whose ``model(x)`` runs (lowbit GPT, Hugging Face causal LMs, ...); run in eval
            mode under ``torch.no_grad`` (its mode is restored afterwards).
        batches: iterable of input tensors or ``(x, y)`` pairs (only x is used), moved to ``device``.
        settings: :class:`InspectSettings` (defaults when None).
        module_filter_fn: ``fn(module, name) -> bool`` choosing which ``nn.Linear`` layers to measure.
        device: default: the device of the model's first parameter.

    Returns:
        :class:`Collected`. ValueError when no batch ran or no linear layer was found.
    """
    settings = InspectSettings() if settings is None else settings
    if not isinstance(settings, InspectSettings):
        raise TypeError(f"settings must be an InspectSettings, got {type(settings).__name__}")
    device = _first_param_device(model) if device is None else torch.device(device)
    heads = output_head_ids(model, settings.head_names)
    probes: list[_LinearProbe] = []
    acts: list[ActivationStats] = []
    handles = []

    def act_hook(stats: ActivationStats, limit: float):
        def pre(module, args):
            x = args[0].detach()
            stats.elements += x.numel()
            stats.saturated += int((x.abs() > limit).sum())

        def post(module, args, out):
            alive = (out.detach() > 0).reshape(-1, out.shape[-1]).any(dim=0).cpu()
            stats.alive = alive if stats.alive is None else stats.alive | alive

        return pre, post

    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                if module_filter_fn is not None and not module_filter_fn(module, name):
                    continue
                probe = _LinearProbe(name, module, id(module) in heads, settings)
                probes.append(probe)
                handles.append(module.register_forward_pre_hook(probe))
                continue
            kind = _activation_kind(module)
            if kind is not None:
                stats = ActivationStats(name, kind)
                acts.append(stats)
                limit = settings.sigmoid_limit if kind == "sigmoid" else settings.tanh_limit
                pre, post = act_hook(stats, limit)
                if kind == "relu":
                    handles.append(module.register_forward_hook(post))
                else:
                    handles.append(module.register_forward_pre_hook(pre))
        if not probes:
            raise ValueError("the model has no nn.Linear layer to inspect (or module_filter_fn excluded all)")
        was_training = model.training
        model.eval()
        n_batches = n_tokens = 0
        try:
            for batch in batches:
                if n_batches >= settings.max_batches:
                    break
                x = _batch_input(batch).to(device)
                model(x)
                n_batches += 1
                n_tokens += x.numel()
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("batches is empty: nothing ran through the model")
    return Collected([p.stats for p in probes], acts, n_batches, n_tokens, settings)


@torch.no_grad()
def capture_input(
    model: nn.Module, layer_name: str, batch: Any, *, max_tokens: int | None = None, device=None
) -> torch.Tensor:
    """The input of the module ``layer_name`` for one batch, as (N, K) fp32 on the CPU (evenly spaced rows,
    at most ``max_tokens``). KeyError for an unknown name."""
    module = dict(model.named_modules())[layer_name]
    device = _first_param_device(model) if device is None else torch.device(device)
    captured: list[torch.Tensor] = []

    def pre(mod, args):
        if not captured:
            captured.append(args[0].detach().float())

    handle = module.register_forward_pre_hook(pre)
    was_training = model.training
    model.eval()
    try:
        model(_batch_input(batch).to(device))
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise ValueError(f"layer {layer_name!r} did not run for this batch")
    x = captured[0].reshape(-1, captured[0].shape[-1])
    if max_tokens is not None:
        rows = _rows(x.shape[0], max_tokens, x.device)
        x = x if rows is None else x[rows]
    return x.cpu()
