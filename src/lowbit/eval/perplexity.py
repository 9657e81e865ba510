"""Perplexity: mean next-token cross-entropy over deterministic windows, and its exponential.

    loss = (1 / N) * sum_i -log softmax(logits_i)[y_i]      over the N scored target tokens
    ppl  = exp(loss)

The mean is over tokens (not over batches), computed in fp32 with a float64 running sum, so the result does
not depend on how the windows are grouped into batches beyond fp32 rounding of the per-token terms.

Models: the forward of ``lowbit.models.GPT`` returns ``(logits, loss)``; Hugging Face causal LMs return an
object with ``.logits``; a bare logits tensor works as well. Only ``model(x)`` is called, so targets never
reach the model and HF models never shift labels themselves.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.models.outputs import logits_of

__all__ = ["IGNORE_INDEX", "PerplexityResult", "perplexity", "sliding_windows"]

IGNORE_INDEX = -100
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PerplexityResult:
    """``loss``: mean cross-entropy in nats per token; ``ppl`` = exp(loss); ``tokens``: targets scored."""

    loss: float
    ppl: float
    tokens: int


def sliding_windows(
    tokens: torch.Tensor, block_size: int, stride: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token sequence into windows scoring every target exactly once.

    Args:
        tokens: (N,) integer tensor, N >= 2.
        block_size: window length T (inputs per window).
        stride: new targets per window, 1 <= stride <= T; default T (non-overlapping windows). With
            stride < T each window after the first sees T - stride tokens of extra context.

    Returns:
        ``(x, y)``, both (W, T') long with T' = min(T, N - 1): window w holds inputs
        ``tokens[s_w : s_w + T']`` and targets shifted by one; targets already scored by an earlier window are
        set to ``IGNORE_INDEX`` (-100). The last window is aligned to the end of the sequence, so all N - 1
        targets are scored once and every window has the same length.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score one target, got {n}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    stride = block_size if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise ValueError(f"stride must be an int in [1, block_size={block_size}], got {stride!r}")
    t = min(block_size, n - 1)
    stride = min(stride, t)
    tokens = tokens.long()
    starts = list(range(0, n - 1 - t + 1, stride))
    if starts[-1] + t < n - 1:  # tail: align a last window with the end of the sequence
        starts.append(n - 1 - t)
    xs, ys = [], []
    scored_until = 0  # targets tokens[1 : scored_until + 1] are scored already (target index = position + 1)
    for s in starts:
        x = tokens[s : s + t]
        y = tokens[s + 1 : s + t + 1].clone()
        already = max(0, scored_until - s)  # positions of this window whose targets were scored before
        y[:already] = IGNORE_INDEX
        scored_until = s + t
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _model_block_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("block_size", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _batches_from_windows(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    data: torch.Tensor | Iterable,
    *,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> PerplexityResult:
    """Mean token cross-entropy of ``model`` on ``data`` and its exponential.

    Args:
        model: a causal LM; ``model(x)`` with x (B, T) long returns logits (B, T, V), a tuple whose first item
            is the logits (lowbit GPT), or an object with ``.logits`` (Hugging Face).
        data: either a 1-D integer tensor of token ids, cut by :func:`sliding_windows` into windows of
            ``block_size`` (default: the model's ``config.block_size`` / ``n_positions`` /
            ``max_position_embeddings``) with ``stride``; or an iterable of ``(x, y)`` pairs of (B, T) long
            tensors, y the next-token targets (``IGNORE_INDEX`` entries are not scored), e.g.
            ``TokenBatcher.eval_batches(n)``.
        batch_size: windows per forward pass (token input only).
        max_batches: stop after this many batches (None: all).
        device: where to run; default the device of the model's first parameter (CPU for a parameterless
            model). Batches are moved there.
        precision: "fp32", "bf16" or "fp16" (``torch.autocast`` around the forward; cross-entropy in fp32).

    Returns:
        :class:`PerplexityResult`. The model is put in eval mode and restored to its previous mode afterwards.
        Raises ``ValueError`` when no target is scored (empty data) or shapes disagree.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    if isinstance(data, torch.Tensor):
        if block_size is None:
            block_size = _model_block_size(model)
            if block_size is None:
                raise ValueError("block_size is required: the model has no config.block_size/n_positions")
        x_all, y_all = sliding_windows(data, block_size, stride)
        batches: Iterable = _batches_from_windows(x_all, y_all, batch_size)
    else:
        batches = data

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device_type=device.type, dtype=low) if low else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError("each batch must be an (x, y) pair of (B, T) tensors")
            x, y = (t.to(device, non_blocking=True) for t in batch)
            if x.shape != y.shape or x.ndim != 2:
                raise ValueError(f"x and y must both be (B, T); got {tuple(x.shape)} and {tuple(y.shape)}")
            with autocast:
                logits = logits_of(model(x))
            if logits.shape[:2] != x.shape:
                raise ValueError(
                    f"model returned logits of shape {tuple(logits.shape)} for input {tuple(x.shape)}; "
                    "expected (B, T, vocab)"
                )
            nll = F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_nll += nll.double()
            total_tokens += (y != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    tokens = int(total_tokens.item())
    if tokens == 0:
        raise ValueError("no target tokens were scored (empty data?)")
    loss = float(total_nll.item()) / tokens
    ppl = math.exp(loss) if loss < 700.0 else math.inf  # exp overflows a float near 709.8
    return PerplexityResult(loss=loss, ppl=ppl, tokens=tokens)
