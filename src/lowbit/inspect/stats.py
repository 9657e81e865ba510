"""Pure per-layer statistics for quantization diagnostics (no hooks, no state beyond small accumulators).

For a linear layer y = x·Wᵀ with input x (N tokens, K features) and weight W (M, K):

- absmax: max |v| (input and weight).
- kurtosis (Pearson): m4 / m2², with central moments over every element; 3 for a Gaussian, 1.8 for a
  uniform, large for heavy tails (outliers).
- outlier channels: input features whose absmax over the tokens exceeds ``ratio`` (default 6) times the
  median feature absmax.
- SQNR of quantizing the layer, in dB: ``10·log10(Σ y² / Σ (y - ŷ)²)`` with
  ŷ = deq(Q_b(x·H))·deq(Q_b(W·H))ᵀ, Q_b symmetric ``b``-bit round-to-nearest (``lowbit.quant.quantize``),
  per token for x and per output channel for W by default, and H = BlockDiag(H_blk, ...) the normalized
  Hadamard rotation (or the identity). Because H·Hᵀ = I, (x·H)(W·H)ᵀ = x·Wᵀ: the rotation changes only
  what gets quantized (Xi et al. 2023, Sec. 4.1), spreading an outlier feature over ``blk`` features.

Accumulators (:class:`Moments`, :class:`SqnrSum`) merge exactly over batches: statistics of several batches
equal the statistics of their concatenation (up to float64 rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant import hadamard_matrix, is_power_of_two, quantize

__all__ = [
    "Moments",
    "SqnrSum",
    "can_rotate",
    "fake_quant",
    "kurtosis",
    "outlier_channel_share",
    "quantized_matmul",
    "rotate",
    "sqnr_db",
]


def sqnr_db(signal_power: float, noise_power: float) -> float | None:
    """10·log10(signal_power / noise_power) in dB (sums or means of squares, both >= 0).

    Edges: noise 0 and signal > 0 -> +inf (lossless); signal 0 and noise > 0 -> -inf; both 0 -> None.
    """
    if signal_power < 0 or noise_power < 0 or math.isnan(signal_power) or math.isnan(noise_power):
        raise ValueError(f"powers must be >= 0, got signal={signal_power!r}, noise={noise_power!r}")
    if noise_power == 0:
        return None if signal_power == 0 else math.inf
    if signal_power == 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


@dataclass
class SqnrSum:
    """Running Σ ref² and Σ (ref - approx)² in float64; ``db`` is :func:`sqnr_db` of the two."""

    signal: float = 0.0
    noise: float = 0.0

    def update(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        """Add one pair of same-shape tensors (any float dtype; summed in float64)."""
        if ref.shape != approx.shape:
            raise ValueError(
                f"ref and approx must have the same shape, got {tuple(ref.shape)} and {tuple(approx.shape)}"
            )
        # fp32 with torch's pairwise summation (relative error ~2^-24·log2(n), far below any quantization
        # noise measured here); batches add up in Python floats (float64)
        r = ref.detach().float()
        self.signal += float(r.square().sum())
        self.noise += float((r - approx.detach().float()).square().sum())

    @property
    def db(self) -> float | None:
        return sqnr_db(self.signal, self.noise)


@dataclass
class Moments:
    """Count, mean and central moment sums M2, M3, M4, mergeable across batches (Pébay 2008).

    ``update(x)`` adds every element of ``x``; ``kurtosis`` is the Pearson kurtosis n·M4 / M2² (None with
    fewer than 2 elements or zero variance).
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        # per batch in fp32 (pairwise sums; central moments, so no cancellation), merged in float64
        v = x.detach().reshape(-1).float()
        if v.numel() == 0:
            return
        nb = v.numel()
        mean_b = float(v.mean())
        d = v - mean_b
        d2 = d * d
        other = Moments(nb, mean_b, float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum()))
        self.merge(other)

    def merge(self, o: Moments) -> None:
        """Combine with the moments of another set of elements (pairwise update formulas)."""
        if o.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = o.n, o.mean, o.m2, o.m3, o.m4
            return
        na, nb = self.n, o.n
        n = na + nb
        delta = o.mean - self.mean
        d_n = delta / n
        m2 = self.m2 + o.m2 + delta * d_n * na * nb
        m3 = self.m3 + o.m3 + delta * d_n * d_n * na * nb * (na - nb) + 3.0 * d_n * (na * o.m2 - nb * self.m2)
        m4 = (
            self.m4
            + o.m4
            + delta * d_n * d_n * d_n * na * nb * (na * na - na * nb + nb * nb)
            + 6.0 * d_n * d_n * (na * na * o.m2 + nb * nb * self.m2)
            + 4.0 * d_n * (na * o.m3 - nb * self.m3)
        )
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + d_n * nb, m2, m3, m4

    @property
    def variance(self) -> float | None:
        return self.m2 / self.n if self.n > 0 else None

    @property
    def kurtosis(self) -> float | None:
        if self.n < 2 or self.m2 <= 0:
            return None
        return self.n * self.m4 / (self.m2 * self.m2)


def kurtosis(x: torch.Tensor) -> float | None:
    """Pearson kurtosis E[(x-μ)⁴] / E[(x-μ)²]² over all elements of ``x`` (float64); 3 for a Gaussian.
    None for fewer than 2 elements or a constant tensor."""
    m = Moments()
    m.update(x)
    return m.kurtosis


def outlier_channel_share(channel_absmax: torch.Tensor, ratio: float = 6.0) -> tuple[float, int]:
    """(share, count) of channels whose absmax exceeds ``ratio`` × the median channel absmax.

    ``channel_absmax``: 1-D, one value per input feature (absmax over all tokens seen). A median of 0 counts
    every nonzero channel as an outlier. Returns (0.0, 0) for an empty tensor.
    """
    if channel_absmax.ndim != 1:
        raise ValueError(f"channel_absmax must be 1-D, got shape {tuple(channel_absmax.shape)}")
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    n = channel_absmax.numel()
    if n == 0:
        return 0.0, 0
    a = channel_absmax.detach().float()
    count = int((a > ratio * a.median()).sum())
    return count / n, count


def can_rotate(features: int, block: int | None) -> bool:
    """Whether a Hadamard block of size ``block`` applies to ``features`` (None: no rotation, always)."""
    return block is None or (is_power_of_two(block) and features % block == 0)


def fake_quant(x: torch.Tensor, bits: int, granularity: str, *, block: int | None = None) -> torch.Tensor:
    """deq(Q_bits(x·H_block)) in fp32, still in the rotated basis (``block`` None: no rotation).

    ``granularity`` as in ``lowbit.quant.quantize`` ("token" for activations, "channel" for weights).
    """
    x = x.detach().float()
    if block is not None:
        x = rotate(x, block)
    return quantize(x, bits, granularity=granularity).dequantize()


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x·BlockDiag(H_block, ...) along the last dim, fp32, as one dense matmul per block.

    The same map as ``lowbit.quant.hadamard_transform`` (which this equals up to fp32 rounding); a dense
    (block × block) matmul is several times faster than the butterflies on a CPU for the blocks used here.
    """
    k = x.shape[-1]
    if not can_rotate(k, block):
        raise ValueError(f"block {block} must be a power of two dividing the last dim ({k})")
    h = hadamard_matrix(block, dtype=torch.float32, device=x.device)
    return (x.float().reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def quantized_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bits: int,
    *,
    block: int | None = None,
    act_granularity: str = "token",
    weight_granularity: str = "channel",
) -> torch.Tensor:
    """ŷ = deq(Q(x·H))·deq(Q(W·H))ᵀ, fp32 (N, M), for x (N, K) and w (M, K); ``block`` None = no rotation.

    Equal to x·Wᵀ up to the quantization error, because H·Hᵀ = I. ValueError when ``block`` does not
    divide K.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be (N, K) and w (M, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if not can_rotate(x.shape[1], block):
        raise ValueError(f"block {block} must be a power of two dividing K={x.shape[1]}")
    xq = fake_quant(x, bits, act_granularity, block=block)
    wq = fake_quant(w, bits, weight_granularity, block=block)
    return xq @ wq.t()
