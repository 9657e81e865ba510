"""Sign-Value-Independent Decomposition (SVID, Xu et al. 2024, section 3.3).

    W ≈ S ⊙ (h · gᵀ),    S = sign(W) ∈ {-1, +1}^(m×n) (sign(0) = +1),    |W| ≈ h · gᵀ (rank 1, h, g >= 0)

h (length m = out_features) is the output-side scale and g (length n = in_features) the input-side scale of
``OneBitLinear``. Because S ⊙ · is an isometry entry by entry, ‖W − S ⊙ h·gᵀ‖_F = ‖ |W| − h·gᵀ ‖_F: the SVID
error is the error of the rank-1 approximation of |W|.

Two ways to find the rank-1 factor of A = |W|:

- ``"svd"``: the leading singular triple of A through ``torch.linalg.svd`` (the best rank-1 approximation in
  the Frobenius norm, Eckart–Young). A is nonnegative, so by Perron–Frobenius its leading singular vectors
  can be taken nonnegative; the sign is fixed so they are, and round-off negatives are clamped to 0.
- ``"nmf"``: rank-1 nonnegative matrix factorization by alternating nonnegative least squares. For rank 1
  each half-step has a closed form that is already nonnegative, h = A g / ‖g‖², g = Aᵀ h / ‖h‖² (it is also
  what the multiplicative updates of Lee & Seung reduce to at rank 1), so the iteration is a power
  iteration on AᵀA that converges to the same optimum as the SVD at the rate (σ₂/σ₁)² per sweep. It needs
  only matrix–vector products and runs wherever A lives (GPU included). Stopping test: the relative change
  of ‖h‖·‖g‖ (the estimate of σ₁) falls to ``tol`` or below, or ``max_iter`` sweeps.

Both return balanced factors, ‖h‖ = ‖g‖ = sqrt(σ₁), so neither vector under- or overflows in fp16/bf16.
Computation runs in fp32 (float64 for float64 input) on the weight's device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..quant.binary import sign_pm1

__all__ = ["METHODS", "SVID", "rank1_nmf", "rank1_svd", "svid", "svid_error"]

METHODS = ("nmf", "svd")


class SVID(NamedTuple):
    """Result of :func:`svid`: ``signs`` int8 ±1 (m, n); ``g`` (n,) and ``h`` (m,) nonnegative, fp32 (float64
    for float64 input), on the weight's device. The approximation is ``signs * h[:, None] * g[None, :]``."""

    signs: torch.Tensor
    g: torch.Tensor
    h: torch.Tensor


def _check_weight(w: object, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (out_features, in_features) weight matrix, got shape {tuple(w.shape)}"
        )
    if w.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(w.shape)}")
    return w


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _balance(h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nh, ng = h.norm(), g.norm()
    if nh == 0 or ng == 0:
        return torch.zeros_like(h), torch.zeros_like(g)
    c = torch.sqrt(ng / nh)
    return h * c, g / c


def rank1_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation ``a ≈ h gᵀ`` of a nonnegative (m, n) matrix from its leading singular triple.

    Returns balanced nonnegative ``(h, g)`` in ``a``'s dtype (sign fixed so the vectors sum positive, then
    round-off negatives clamped to 0). An all-zero matrix gives zero vectors.
    """
    _check_weight(a, "a")
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    u0, v0 = u[:, 0], vh[0]
    flip = torch.where(u0.sum() + v0.sum() < 0, -1.0, 1.0).to(a.dtype)
    root = torch.sqrt(s[0])
    return _balance((u0 * flip * root).clamp_min(0), (v0 * flip * root).clamp_min(0))


def rank1_nmf(
    a: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rank-1 NMF ``a ≈ h gᵀ`` (h, g >= 0) of a nonnegative (m, n) matrix by alternating least squares.

    Starts from g = column means of ``a``; each sweep sets h = a g / ‖g‖² then g = aᵀ h / ‖h‖². Stops when
    |σ_k − σ_(k−1)| <= tol · σ_k with σ_k = ‖h‖·‖g‖, or after ``max_iter`` sweeps.

    Returns:
        ``(h, g, sweeps)``: balanced nonnegative vectors in ``a``'s dtype and the sweeps run. An all-zero
        matrix gives zero vectors after 0 sweeps.
    """
    _check_weight(a, "a")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    g = a.mean(dim=0)  # (n,) nonnegative; nonzero unless a == 0, and it overlaps the Perron vector
    if not bool(g.any()):
        return torch.zeros(a.shape[0], dtype=a.dtype, device=a.device), torch.zeros_like(g), 0
    h = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    sigma_prev = math.inf
    sweeps = 0
    for sweeps in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        h = torch.mv(a, g) / torch.dot(g, g)  # (m,)
        g = torch.mv(a.t(), h) / torch.dot(h, h)  # (n,)
        sigma = float(h.norm() * g.norm())  # one sync per sweep: the stopping test needs it
        if abs(sigma - sigma_prev) <= tol * sigma:
            break
        sigma_prev = sigma
    h, g = _balance(h, g)
    return h, g, sweeps


def svid(w: torch.Tensor, method: str = "nmf", *, max_iter: int = 200, tol: float = 1e-6) -> SVID:
    """Decompose a weight into signs and a rank-1 magnitude: ``w ≈ signs ⊙ (h gᵀ)``.

    Args:
        w: (out_features m, in_features n) floating weight, finite (ValueError otherwise), any device.
        method: "nmf" (default, alternating least squares, GPU-friendly) or "svd" (``torch.linalg.svd``).
        max_iter, tol: NMF stopping rule (see :func:`rank1_nmf`); ignored by "svd".

    Returns:
        :class:`SVID` ``(signs, g, h)``: signs int8 ±1 with sign(0) = +1; g (n,), h (m,) nonnegative and
        balanced (‖h‖ = ‖g‖), fp32 (float64 for float64 ``w``). An all-zero ``w`` gives zero vectors.
    """
    _check_weight(w)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    wc = w.detach().to(_compute_dtype(w))
    if not bool(torch.isfinite(wc).all()):
        raise ValueError("w has non-finite values (NaN or Inf); SVID needs a finite weight")
    a = wc.abs()
    if method == "svd":
        h, g = rank1_svd(a)
    else:
        h, g, _ = rank1_nmf(a, max_iter=max_iter, tol=tol)
    return SVID(signs=sign_pm1(wc).to(torch.int8), g=g, h=h)


def svid_error(w: torch.Tensor, signs: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> float:
    """Relative reconstruction error ‖w − signs ⊙ h gᵀ‖_F / ‖w‖_F, computed in float64 on w's device
    (fp32 on devices without float64). A zero ``w`` gives 0.0 when the approximation is zero too, else inf."""
    _check_weight(w)
    if tuple(signs.shape) != tuple(w.shape) or g.shape != (w.shape[1],) or h.shape != (w.shape[0],):
        raise ValueError(
            f"shapes disagree: w {tuple(w.shape)}, signs {tuple(signs.shape)}, g {tuple(g.shape)}, "
            f"h {tuple(h.shape)}; expected signs (m, n), g (n,), h (m,)"
        )
    dt = torch.float32 if w.device.type == "mps" else torch.float64
    wd = w.detach().to(dt)
    approx = signs.detach().to(dt) * h.detach().to(dt)[:, None] * g.detach().to(dt)[None, :]
    num = float(torch.linalg.norm(wd - approx))
    den = float(torch.linalg.norm(wd))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
