"""Linear (uniform) quantization: scale / zero point, round-to-nearest or stochastic rounding.

Symmetric:   codes = clamp(round(x / s), -qmax, qmax),     x ≈ codes · s,        s = absmax / qmax
Asymmetric:  codes = clamp(round(x / s) + z, 0, 2^b - 1),  x ≈ (codes - z) · s,  s = (max - min) / (2^b - 1)

with qmax = 2^(b-1) - 1 (INT4: 7, so symmetric INT4 codes lie in [-7, 7]) and z = round(-min / s) an integer
in [0, 2^b - 1]. The asymmetric range is widened to contain 0 (min <= 0 <= max), so 0 is represented exactly.

Granularity decides over which elements one scale is shared. Scales keep the reduced dimensions with size 1
(keepdim layout), so ``codes * scale`` broadcasts:

=============  ==========================================  =================================================
granularity    one scale per                               scale shape (x of shape (d0, ..., dn))
=============  ==========================================  =================================================
"tensor"       the whole tensor                            (1, ..., 1)  (``()`` for a 0-dim x)
"channel"      row of a weight: dim 0 kept, others reduced (d0, 1, ..., 1); needs x.ndim >= 2
"token"        row of an activation: last dim reduced      (d0, ..., d(n-1), 1); any leading shape
"group"        ``group_size`` contiguous elements of the   (d0, ..., d(n-1), dn / group_size, 1)
               last dim                                    codes have shape (..., dn / group_size, group_size)
=============  ==========================================  =================================================

For "group" the codes are stored grouped, shape ``(..., dn // group_size, group_size)``, so that
``codes * scale`` broadcasts; ``QuantizedTensor.dequantize()`` reshapes back to the input shape
(``qt.codes.reshape(qt.shape)`` gives the codes in the input layout).

A group whose elements are all zero (absmax 0, or a scale that underflows to 0 in fp32) gets scale 1.0 and
codes 0: it dequantizes to exact zeros, never NaN/Inf. All arithmetic runs in fp32 whatever the input
dtype (fp32, bf16, fp16; fp64 inputs are computed in fp32 as well), with correctly rounded divisions, so
CPU and CUDA give the same bits. Non-finite inputs are not checked
(checking would force a device synchronization) and give meaningless codes.

Error bounds (exact arithmetic; fp32 adds a relative error of a few 2^-24):
- round-to-nearest: |x - dequantize(x)| <= s / 2 for every x of the tensor (the range is set from the data,
  so nothing clamps; asymmetric: x / s + z lies in [-1/2, 2^b - 1/2], so the clamp moves nothing by more
  than the rounding would).
- stochastic rounding, codes = floor(v + u) with u ~ U[0, 1): E[codes] = v for v inside the code range, so
  the dequantized value is unbiased. Symmetric: always (|v| <= qmax). Asymmetric: for x inside the grid
  range [-z·s, (2^b - 1 - z)·s], which may miss up to s / 2 at one end of [min, max] because z is rounded;
  values there are clamped to the end of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "GRANULARITIES",
    "QuantizedTensor",
    "compute_scale",
    "qmax",
    "quantize",
    "quantize_with_scale",
    "round_to_int",
    "true_div",
]

GRANULARITIES = ("tensor", "channel", "token", "group")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")


def qmax(bits: int) -> int:
    """Largest symmetric code, 2^(bits-1) - 1 (INT4: 7, INT8: 127). ``bits`` in [2, 8]."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def _grouped_view(x: torch.Tensor, granularity: str, group_size: int | None) -> tuple[torch.Tensor, tuple]:
    """Return (x in the layout the scales broadcast against, dims reduced for one scale)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity != "group" and group_size is not None:
        raise ValueError(f"group_size is only used with granularity='group', got group_size={group_size!r}")
    if granularity == "tensor":
        return x, tuple(range(x.ndim))
    if granularity == "channel":
        if x.ndim < 2:
            raise ValueError(
                f"granularity='channel' needs x with at least 2 dims (rows), got shape {tuple(x.shape)}"
            )
        return x, tuple(range(1, x.ndim))
    if x.ndim < 1:
        raise ValueError(f"granularity={granularity!r} needs x with at least 1 dim, got a 0-dim tensor")
    if granularity == "token":
        return x, (x.ndim - 1,)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int with granularity='group', got {group_size!r}")
    n = x.shape[-1]
    if n % group_size != 0:
        raise ValueError(f"last dim of x ({n}) must be divisible by group_size ({group_size})")
    return x.reshape(*x.shape[:-1], n // group_size, group_size), (x.ndim,)


def _amax_keepdim(t: torch.Tensor, dims: tuple) -> torch.Tensor:
    if t.numel() == 0:
        shape = [1 if d in dims else s for d, s in enumerate(t.shape)]
        return torch.zeros(shape, dtype=t.dtype, device=t.device)
    if len(dims) == 0:
        return t.clone()
    return t.amax(dim=dims, keepdim=True)


def _amin_keepdim(t: torch.Tensor, dims: tuple) -> torch.Tensor:
    return -_amax_keepdim(-t, dims)


def true_div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor, correctly rounded on every device.

    PyTorch's CUDA division by a Python scalar multiplies by the rounded reciprocal (off by one ulp at
    times); dividing by a 0-dim tensor on t's device is IEEE division there as on the CPU, so scales and
    codes are the same bits on CPU and CUDA, and kernels can be held to them exactly.
    """
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group (or one whose scale underflows in fp32) gets scale 1.0: its codes are 0.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def compute_scale(
    x: torch.Tensor, bits: int, granularity: str = "tensor", group_size: int | None = None
) -> torch.Tensor:
    """Symmetric absmax scale s = absmax / qmax(bits) over ``granularity``.

    Args:
        x: floating tensor, any shape (see the module table for what each granularity needs).
        bits: 2..8.
        granularity: "tensor" | "channel" | "token" | "group".
        group_size: only for "group"; must divide x.shape[-1].

    Returns:
        fp32 scale in keepdim layout (module table); 1.0 where the absmax is 0.
    """
    q = qmax(bits)
    x_view, dims = _grouped_view(x, granularity, group_size)
    absmax = _amax_keepdim(x_view.detach().float().abs(), dims)
    return _safe_scale(true_div(absmax, q))


def round_to_int(
    v: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round to integers, same float dtype as ``v`` (fp32 recommended).

    Round-to-nearest (ties to even) when ``stochastic`` is False: |round(v) - v| <= 1/2.
    Stochastic: floor(v + u), u ~ U[0, 1) drawn from ``generator`` (which must live on v's device; None
    uses the global generator), so E[result] = v.
    """
    if not stochastic:
        return torch.round(v)
    u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    return torch.floor(v + u)


def quantize_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    bits: int,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Symmetric codes for a given scale: clamp(round(x / scale), -qmax, qmax) as int8.

    ``scale`` (a tensor broadcastable to x, or a float; e.g. a learned LSQ scale) must be positive; it is
    not checked here. Computed in fp32; returns int8 codes of x's shape (no gradient flows through).
    """
    q = qmax(bits)
    x32 = x.detach().float()
    v = x32 / scale.detach().float() if isinstance(scale, torch.Tensor) else true_div(x32, float(scale))
    return round_to_int(v, stochastic, generator).clamp_(-q, q).to(torch.int8)


@dataclass(frozen=True)
class QuantizedTensor:
    """Result of :func:`quantize`.

    Attributes:
        codes: int8 (symmetric, in [-qmax, qmax]) or uint8 (asymmetric, in [0, 2^bits - 1]); x's shape,
            or (..., n // group_size, group_size) for granularity "group".
        scale: fp32, keepdim layout broadcastable against ``codes``.
        zero_point: None when symmetric; else int32, integer in [0, 2^bits - 1], same shape as ``scale``.
        bits, granularity, group_size: as passed to :func:`quantize`.
        shape: shape of the original tensor.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    granularity: str
    group_size: int | None
    shape: torch.Size

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """codes · scale (symmetric) or (codes - zero_point) · scale, in ``shape``, cast to ``dtype``."""
        c = self.codes.float()
        if self.zero_point is not None:
            c = c - self.zero_point.float()
        return (c * self.scale).reshape(self.shape).to(dtype)


def quantize(
    x: torch.Tensor,
    bits: int,
    *,
    granularity: str = "tensor",
    group_size: int | None = None,
    symmetric: bool = True,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` to ``bits``-bit integer codes with scales (and zero points) per ``granularity``.

    Args:
        x: floating tensor (fp32, bf16, fp16, ...), any device; computed in fp32.
        bits: 2..8 (ValueError otherwise).
        granularity: "tensor" | "channel" | "token" | "group" (module docstring table).
        group_size: required with "group"; must divide x.shape[-1].
        symmetric: absmax scaling, int8 codes in [-qmax, qmax]; else min/max with an integer zero point,
            uint8 codes in [0, 2^bits - 1].
        stochastic: stochastic rounding floor(v + u) (unbiased) instead of round-to-nearest.
        generator: random source for stochastic rounding, on x's device.

    Returns:
        :class:`QuantizedTensor`; ``.dequantize()`` gives fp32 of x's shape.
    """
    _check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}".rstrip())
    x_view, dims = _grouped_view(x.detach().float(), granularity, group_size)
    if symmetric:
        q = qmax(bits)
        scale = _safe_scale(true_div(_amax_keepdim(x_view.abs(), dims), q))
        codes = round_to_int(x_view / scale, stochastic, generator).clamp_(-q, q).to(torch.int8)
        zero_point = None
    else:
        q_hi = 2**bits - 1
        lo = _amin_keepdim(x_view, dims).clamp(max=0.0)
        hi = _amax_keepdim(x_view, dims).clamp(min=0.0)
        scale = _safe_scale(true_div(hi - lo, q_hi))
        zero_point_f = torch.round(-lo / scale).clamp_(0, q_hi)
        v = (x_view / scale + zero_point_f).clamp_(0, q_hi)
        codes = round_to_int(v, stochastic, generator).clamp_(0, q_hi).to(torch.uint8)
        zero_point = zero_point_f.to(torch.int32)
    return QuantizedTensor(
        codes=codes,
        scale=scale,
        zero_point=zero_point,
        bits=bits,
        granularity=granularity,
        group_size=group_size,
        shape=x.shape,
    )
