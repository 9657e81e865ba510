"""Gradient quantizers of INT4 training's backward pass (Xi et al. 2023, Sec. 5): bit splitting and
leverage-score sampling.

Bit splitting of g = ∇Y into two INT4 halves (per token, i.e. per row of ∇Y, by default):

    s_hi = absmax(g) / 7,   hi = round(g / s_hi)                          (round-to-nearest, hi in [-7, 7])
    r    = g - hi · s_hi,   |r| <= s_hi / 2
    s_lo = s_hi / 14,       lo = floor(r / s_lo + u),  u ~ U[0, 1)         (stochastic, |r / s_lo| <= 7)
    g   ≈ hi · s_hi + lo · s_lo,  |error| < s_lo = s_hi / 14 per element,  E[lo · s_lo | hi] = r (unbiased)

hi never clamps: |g / s_hi| <= 7 by the choice of s_hi, so round(g / s_hi) is already in [-7, 7] (fp32 may
land a hair above 7.0, which still rounds to 7). lo is clamped to [-7, 7]; that moves it only when fp32
rounding puts |r / s_lo| a hair above 7 and u is within that hair of 1 (a negligible bias).
Per-token scales suit ∇Y: its rows (tokens) differ in magnitude by orders, so one scale per tensor would
round the small rows to 0.

Leverage-score sampling keeps row i of ∇Y (and of X) with probability p_i and scales it by 1 / p_i, so that
Σ_kept a_i / p_i is an unbiased estimate of Σ_i a_i (e.g. ∇W = Σ_i ∇Y_iᵀ X_i). The paper's score is
c_i = ‖∇Y_i‖ · ‖X_i‖ and p_i = min(1, c · c_i) with c chosen so that Σ p_i = k rows are kept in expectation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .linear import compute_scale, round_to_int, true_div

__all__ = [
    "BitSplit",
    "bit_split",
    "bit_split_dequantize",
    "leverage_score_probabilities",
    "leverage_score_sample",
    "leverage_scores",
]

_INT4_QMAX = 7
_LO_RATIO = 14  # s_lo = s_hi / 14: |r| <= s_hi / 2 = 7 · s_lo fills the INT4 range


class BitSplit(NamedTuple):
    """Two INT4 halves of a gradient: g ≈ hi · scale_hi + lo · scale_lo.

    hi, lo: int8 codes in [-7, 7], g's shape. scale_hi, scale_lo: fp32, keepdim layout ((..., 1) per
    token, (1, ..., 1) per tensor), scale_lo = scale_hi / 14.
    """

    hi: torch.Tensor
    lo: torch.Tensor
    scale_hi: torch.Tensor
    scale_lo: torch.Tensor


def bit_split(
    g: torch.Tensor, generator: torch.Generator | None = None, *, granularity: str = "token",
    noise: torch.Tensor | None = None,
) -> BitSplit:
    """Split ``g`` into two INT4 halves (module docstring equations).

    Args:
        g: floating tensor (..., C), any dtype (computed in fp32), at least 1 dim for "token".
        generator: random source for the stochastic rounding of lo, on g's device.
        granularity: "token" (one scale per row, last dim reduced; default) or "tensor".
        noise: optional fp32 uniform draws u in [0, 1) of g's shape for the stochastic rounding of lo
            (floor(v + u)); default: drawn from ``generator`` (``torch.rand(g.shape)``, the same numbers).

    Returns:
        :class:`BitSplit`. Rows (or tensors) that are all zero get scale_hi = 1.0 and codes 0.
    """
    if granularity not in ("token", "tensor"):
        raise ValueError(f"granularity must be 'token' or 'tensor', got {granularity!r}")
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        raise TypeError(f"g must be a floating-point tensor, got {getattr(g, 'dtype', type(g).__name__)}")
    g32 = g.detach().float()
    scale_hi = compute_scale(g32, 4, granularity)
    hi = round_to_int(g32 / scale_hi).clamp_(-_INT4_QMAX, _INT4_QMAX)
    residual = g32 - hi * scale_hi
    scale_lo = true_div(scale_hi, _LO_RATIO)
    if noise is None:
        lo = round_to_int(residual / scale_lo, stochastic=True, generator=generator)
    else:
        if noise.shape != g32.shape:
            raise ValueError(f"noise must have g's shape {tuple(g32.shape)}, got {tuple(noise.shape)}")
        lo = torch.floor(residual / scale_lo + noise.float())
    lo = lo.clamp_(-_INT4_QMAX, _INT4_QMAX)
    return BitSplit(hi.to(torch.int8), lo.to(torch.int8), scale_hi, scale_lo)


def bit_split_dequantize(bs: BitSplit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruction hi · scale_hi + lo · scale_lo, cast to ``dtype``."""
    return (bs.hi.float() * bs.scale_hi + bs.lo.float() * bs.scale_lo).to(dtype)


def _check_scores(scores: torch.Tensor, k: float, validate: bool) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.ndim != 1:
        got = getattr(scores, "dtype", type(scores).__name__)
        raise ValueError(
            f"scores must be a 1-D floating-point tensor, got {got} "
            f"of shape {tuple(getattr(scores, 'shape', ()))}"
        )
    n = scores.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= n:
        raise ValueError(f"k must be a number in (0, n] with n = len(scores) = {n}, got {k!r}")
    # One device sync; validate=False skips it on hot paths.
    if validate and not bool(torch.all(torch.isfinite(scores) & (scores >= 0))):
        raise ValueError("scores must be finite and non-negative")


def leverage_score_probabilities(scores: torch.Tensor, k: float, *, validate: bool = True) -> torch.Tensor:
    """Keep probabilities p_i = min(1, c · scores_i) with Σ p_i = k.

    This is the fixed point of iterated clamp-and-rescale (clamp every p >= 1 to 1, rescale the others to
    fill the remaining budget k - #clamped, repeat). It is computed without iteration or device sync: with
    scores sorted in decreasing order s_0 >= s_1 >= ..., the number t of clamped entries is the smallest t
    with s_t · (k - t) <= Σ_{j>=t} s_j, and c = (k - t) / Σ_{j>=t} s_j.

    Args:
        scores: 1-D, finite, >= 0 (ValueError otherwise, checked with one sync unless validate=False).
        k: expected number of kept entries, 0 < k <= len(scores) (int or float).

    Returns:
        fp32 tensor of scores' shape and device. Zero scores get p = 0; when k >= the number m of nonzero
        scores every nonzero score gets p = 1 (then Σ p = m < k is possible).
    """
    _check_scores(scores, k, validate)
    s = scores.detach().double()
    n = s.shape[0]
    nonzero = s > 0
    m = nonzero.sum()
    s_sorted, _ = torch.sort(s, descending=True)
    # suffix[t] = Σ_{j>=t} s_sorted[j]
    suffix = torch.flip(torch.cumsum(torch.flip(s_sorted, (0,)), 0), (0,))
    t = torch.arange(n, device=s.device, dtype=torch.float64)
    ok = (s_sorted * (k - t) <= suffix) & (t < m)
    # First t where ok holds (it holds at t = m - 1 whenever k < m); argmax returns the first max.
    t_star = torch.argmax(ok.to(torch.int8))
    c = (k - t_star.double()) / suffix[t_star].clamp(min=torch.finfo(torch.float64).tiny)
    p = torch.clamp(c * s, max=1.0)
    p = torch.where(m <= k, nonzero.double(), p)
    return p.float()


def leverage_score_sample(
    scores: torch.Tensor, k: float, generator: torch.Generator | None = None, *, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bernoulli sampling with p = leverage_score_probabilities(scores, k).

    Args:
        scores: as in :func:`leverage_score_probabilities`.
        k: expected number of kept entries.
        generator: random source on scores' device.

    Returns:
        (kept_indices, inv_prob): kept_indices int64 sorted ascending (entries with p = 0 are never kept,
        p = 1 always); inv_prob fp32 = 1 / p of those entries. Σ_kept inv_prob_i · a_i is an unbiased
        estimate of Σ_i a_i over the entries with nonzero score. The number kept is data dependent, so this
        synchronizes with the device once.
    """
    p = leverage_score_probabilities(scores, k, validate=validate)
    u = torch.rand(p.shape, generator=generator, dtype=torch.float32, device=p.device)
    kept = torch.nonzero(u < p, as_tuple=False).squeeze(1)
    return kept, 1.0 / p[kept]


def leverage_scores(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The paper's row score c_i = ‖∇Y_i‖₂ · ‖X_i‖₂.

    Args:
        grad_y: (..., C_out); x: (..., C_in) with the same leading shape (rows = tokens).

    Returns:
        fp32 1-D tensor of length prod(leading shape) (rows flattened in order).
    """
    if grad_y.ndim < 1 or x.ndim < 1 or grad_y.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            "grad_y and x must share their leading shape (rows), "
            f"got {tuple(grad_y.shape)} and {tuple(x.shape)}"
        )
    gy = grad_y.detach().float().reshape(-1, grad_y.shape[-1])
    xx = x.detach().float().reshape(-1, x.shape[-1])
    return torch.linalg.vector_norm(gy, dim=-1) * torch.linalg.vector_norm(xx, dim=-1)
