"""1-bit weights: signs with sign(0) = +1, per-row absmean binarization, and the reference OneBit product.

- ``sign_pm1(w)``: +1 where w >= 0 (zeros and -0.0 included), -1 where w < 0, in w's dtype. NaN maps to -1
  (NaN >= 0 is false); callers that care check finiteness first.
- ``binarize_absmean(w)``: the 1-bit round-to-nearest baseline, W ≈ sign(W) · mean_j |W_ij| per row i. For
  fixed signs the row scale mean|W_i| is the least-squares optimum, so this is the best 1-bit code with one
  scale per output row.
- ``onebit_matmul_reference(x, signs_packed, g, h, n)``: the OneBit linear product (Xu et al. 2024, eq. 6
  without the LayerNorm) computed from packed signs in fp32,

      y = h ⊙ ((x ⊙ g) · Sᵀ),    S ∈ {-1, +1}^(m×n),

  the specification a fused 1-bit kernel must equal. Signs are packed along the input dimension n as
  :func:`lowbit.quant.pack_bits` (uint8, 8 per byte) or :func:`lowbit.quant.pack_bits_int32` (int32, 32 per
  word) lays them out; the dtype of ``signs_packed`` says which.
"""

from __future__ import annotations

import torch

from .packing import unpack_bits, unpack_bits_int32

__all__ = ["binarize_absmean", "onebit_matmul_reference", "sign_pm1"]


def _check_float(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def sign_pm1(w: torch.Tensor) -> torch.Tensor:
    """±1 of the same dtype and shape as ``w``: +1 where ``w >= 0`` (so sign(0) = +1), else -1.

    Args:
        w: any floating or signed integer tensor (bool is rejected).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a tensor, got {type(w).__name__}")
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"w must be a real floating or integer tensor, got {w.dtype}")
    one = torch.ones((), dtype=w.dtype, device=w.device)
    return torch.where(w >= 0, one, -one)


def binarize_absmean(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit round-to-nearest of a weight matrix: ``w ≈ signs * scale``.

    Args:
        w: (m, n) floating weight, n >= 1.

    Returns:
        ``(signs, scale)``: signs int8 ±1 of shape (m, n) (sign(0) = +1); scale fp32 (m, 1) holding
        mean_j |w_ij| computed in fp32 (a zero row gets scale 0 and dequantizes to zeros).
    """
    _check_float("w", w)
    if w.ndim != 2 or w.shape[1] == 0:
        raise ValueError(
            f"w must be a 2-D (out_features, in_features) matrix with n >= 1, got {tuple(w.shape)}"
        )
    signs = sign_pm1(w).to(torch.int8)
    scale = w.float().abs().mean(dim=1, keepdim=True)
    return signs, scale


def onebit_matmul_reference(
    x: torch.Tensor, signs_packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, n: int
) -> torch.Tensor:
    """y = h ⊙ ((x ⊙ g) · Sᵀ) in fp32, with the sign matrix S read from packed bits.

    Args:
        x: (..., n) floating activations (any float dtype; converted to fp32).
        signs_packed: packed rows of S, shape (m, ceil(n / 8)) uint8 (``pack_bits``: bit j of byte i is
            element 8i + j, 1 = +1) or (m, ceil(n / 32)) int32 (``pack_bits_int32``). Padding bits are
            ignored.
        g: (n,) floating input-side scale.
        h: (m,) floating output-side scale.
        n: in_features, the true (unpadded) length of each sign row.

    Returns:
        fp32 (..., m) on x's device. Every operand must be on the same device. The products and sums run in
        fp32 (``torch.matmul`` at fp32 precision: TF32 is used only if the caller enabled it globally).
    """
    _check_float("x", x)
    _check_float("g", g)
    _check_float("h", h)
    if not isinstance(signs_packed, torch.Tensor) or signs_packed.dtype not in (torch.uint8, torch.int32):
        got = getattr(signs_packed, "dtype", type(signs_packed).__name__)
        raise TypeError(f"signs_packed must be a uint8 (8 per byte) or int32 (32 per word) tensor, got {got}")
    if signs_packed.ndim != 2:
        raise ValueError(f"signs_packed must be 2-D (m, packed_n), got shape {tuple(signs_packed.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (in_features), got {n!r}")
    m = signs_packed.shape[0]
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"x must have shape (..., n={n}), got {tuple(x.shape)}")
    if g.shape != (n,):
        raise ValueError(f"g must have shape (n,) = ({n},), got {tuple(g.shape)}")
    if h.shape != (m,):
        raise ValueError(f"h must have shape (m,) = ({m},) (rows of signs_packed), got {tuple(h.shape)}")
    devices = {t.device for t in (x, signs_packed, g, h)}
    if len(devices) != 1:
        raise ValueError(f"x, signs_packed, g and h must be on one device, got {sorted(map(str, devices))}")
    if signs_packed.dtype == torch.uint8:
        s = unpack_bits(signs_packed, n, dtype=torch.float32)  # (m, n) ±1, checks ceil(n / 8)
    else:
        s = unpack_bits_int32(signs_packed, n, dtype=torch.float32)
    xg = x.float() * g.float()  # (..., n)
    return torch.matmul(xg, s.t()) * h.float()  # (..., m)
