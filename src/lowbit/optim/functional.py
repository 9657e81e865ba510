"""The Adam / AdamW update as pure functions: fp32 state (``adam_reference_step``) and 8-bit block-wise state
(``adam8bit_reference_step``, Dettmers et al. 2021). These are the specification: the optimizer classes call
them on the CPU, and the fused Triton kernel (``lowbit.kernels.adam8bit``) must equal them bit for bit.

Update (Kingma & Ba 2015, Algorithm 1; decoupled weight decay after Loshchilov & Hutter 2019), all in fp32,
every product and sum rounded separately in this order:

    g  <- g + p * wd                                  Adam (L2 penalty), if wd != 0
    m  <- m * beta1 + g * (1 - beta1)
    v  <- v * beta2 + (g * g) * (1 - beta2)
    p  <- p * (1 - lr * wd)                           AdamW (decoupled), if wd != 0
    p  <- p - step_size * (m / (sqrt(v) * inv_bc2_sqrt + eps))
          step_size = lr / (1 - beta1^t),  inv_bc2_sqrt = 1 / sqrt(1 - beta2^t)

This is torch.optim.Adam / AdamW's update (same bias correction, eps added after the bias-corrected square
root) up to the rounding order. The scalars are formed in float64 and rounded once to fp32
(``adam_scalars``), so both implementations see identical fp32 constants; 1/sqrt(bc2) is multiplied
rather than divided because CUDA tensor-by-scalar division in torch is itself computed as a multiplication.

8-bit state: m is stored as codes of the signed 8-bit dynamic map, v of the unsigned one, each with one fp32
absmax per block of ``block_size`` elements (``lowbit.quant.codebook``). A step dequantizes, updates in fp32
(using the unrounded new m, v for the parameter update) and quantizes the new m, v with fresh block absmaxes.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch

from lowbit.quant.codebook import dequantize_blockwise, dynamic_map, quantize_blockwise

_F32 = struct.Struct("f")

__all__ = [
    "AdamScalars",
    "adam8bit_reference_step",
    "adam_reference_step",
    "adam_scalars",
    "dynamic_maps",
]


def _f32(x: float) -> float:
    """x rounded to the nearest fp32 value (returned as a Python float): the C double -> float conversion,
    round to nearest even, as torch's; about 100x cheaper than a tensor round trip (it runs every step)."""
    return _F32.unpack(_F32.pack(x))[0]


@dataclass(frozen=True)
class AdamScalars:
    """fp32 constants of one Adam step (each is an exactly representable fp32 value)."""

    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    step_size: float  # lr / (1 - beta1^step)
    inv_bc2_sqrt: float  # 1 / sqrt(1 - beta2^step)
    weight_decay: float
    decay_factor: float  # 1 - lr * weight_decay


def adam_scalars(
    step: int, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> AdamScalars:
    """The step's constants, formed in float64 and rounded once to fp32.

    Args:
        step: 1-based step count t of this update (>= 1).
        lr, beta1, beta2, eps, weight_decay: the hyper-parameters (lr >= 0, 0 <= beta < 1, eps >= 0, wd >= 0).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return AdamScalars(
        beta1=_f32(beta1),
        beta2=_f32(beta2),
        one_minus_beta1=_f32(1.0 - beta1),
        one_minus_beta2=_f32(1.0 - beta2),
        eps=_f32(eps),
        step_size=_f32(lr / bc1),
        inv_bc2_sqrt=_f32(1.0 / math.sqrt(bc2)),
        weight_decay=_f32(weight_decay),
        decay_factor=_f32(1.0 - lr * weight_decay),
    )


@functools.cache
def _maps_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return dynamic_map(True, 8).to(device), dynamic_map(False, 8).to(device)


def dynamic_maps(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(signed, unsigned) 8-bit dynamic maps on ``device`` (cached; do not modify in place)."""
    return _maps_on(torch.device(device))


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root. torch's CPU sqrt is vectorized with a 1-ulp approximation (it
    differs from the rounded exact root on ~0.7% of inputs); the root of an fp32 value taken in float64 and
    rounded to fp32 is the correctly rounded one (float64 has more than 2 * 24 + 2 bits)."""
    return torch.sqrt(x.double()).float()


def _adam_math(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: AdamScalars, decoupled: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (p, g, m, v) -> new fp32 (p, m, v), the module docstring's update."""
    if s.weight_decay != 0.0 and not decoupled:
        g = g + p * s.weight_decay
    m = m * s.beta1 + g * s.one_minus_beta1
    v = v * s.beta2 + (g * g) * s.one_minus_beta2
    if s.weight_decay != 0.0 and decoupled:
        p = p * s.decay_factor
    denom = _sqrt_rn(v) * s.inv_bc2_sqrt + s.eps
    p = p - (m / denom) * s.step_size
    return p, m, v


def _check_param_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"param must be float32, bfloat16 or float16, got {param.dtype}")
    if grad.shape != param.shape or grad.device != param.device:
        raise ValueError(
            f"grad must match param: got shape {tuple(grad.shape)} on {grad.device}, "
            f"param {tuple(param.shape)} on {param.device}"
        )


def adam_reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    scalars: AdamScalars,
    *,
    decoupled: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam(W) step with fp32 state; pure (inputs are not modified).

    Args:
        param: fp32 / bf16 / fp16, any shape. grad: same shape (any float dtype; used in fp32).
        exp_avg, exp_avg_sq: float32, param's shape.
        scalars: ``adam_scalars(step, ...)`` for this step.
        decoupled: True = AdamW (decoupled weight decay), False = Adam (L2 added to the gradient).

    Returns:
        (param_new in param's dtype, exp_avg_new fp32, exp_avg_sq_new fp32), param's shape.
    """
    _check_param_grad(param, grad)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.shape != param.shape:
            raise ValueError(
                f"{name} must be float32 of shape {tuple(param.shape)}, got {t.dtype} {tuple(t.shape)}"
            )
    p, m, v = _adam_math(param.float(), grad.float(), exp_avg, exp_avg_sq, scalars, decoupled)
    return p.to(param.dtype), m, v


def adam8bit_reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    scalars: AdamScalars,
    *,
    decoupled: bool,
    block_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam(W) step with 8-bit block-wise state; pure (inputs are not modified).

    Args:
        param: fp32 / bf16 / fp16, any shape (flattened row-major for the blocks). grad: same shape.
        exp_avg_codes: (numel,) uint8 codes of ``dynamic_map(signed=True)``; exp_avg_absmax:
            (ceil(numel / block_size),) float32.
        exp_avg_sq_codes, exp_avg_sq_absmax: the same for the second moment, ``dynamic_map(signed=False)``.
        scalars: ``adam_scalars(step, ...)``.
        decoupled: True = AdamW, False = Adam.
        block_size: elements per absmax block (positive int).

    Returns:
        (param_new in param's dtype and shape, exp_avg_codes_new, exp_avg_absmax_new, exp_avg_sq_codes_new,
        exp_avg_sq_absmax_new) with the shapes and dtypes of the inputs.
    """
    _check_param_grad(param, grad)
    code_s, code_u = dynamic_maps(param.device)
    shape = param.shape
    m = dequantize_blockwise(exp_avg_codes, exp_avg_absmax, code_s, block_size, shape)
    v = dequantize_blockwise(exp_avg_sq_codes, exp_avg_sq_absmax, code_u, block_size, shape)
    p, m, v = _adam_math(param.float(), grad.float(), m, v, scalars, decoupled)
    m_codes, m_absmax = quantize_blockwise(m, code_s, block_size)
    v_codes, v_absmax = quantize_blockwise(v, code_u, block_size)
    return p.to(param.dtype), m_codes, m_absmax, v_codes, v_absmax
