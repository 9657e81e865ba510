"""INT4 fully quantized linear: the math (pure quantizers and products), the autograd Function, the
functional API ``int4_linear``. Xi, Li, Chen, Zhu 2023, "Training Transformers with 4-bit Integers".

For X (N tokens × K = D_in), W (M = D_out × K) and H = BlockDiag(H_b, ..., H_b) along K (normalized
Sylvester blocks: H = Hᵀ, H·Hᵀ = I, so X·Wᵀ = (X·H)(W·H)ᵀ):

Forward (Hadamard quantizer, Sec. 4.1)::

    V_x = X·H, V_w = W·H;   q_x = clamp(round(V_x / s_x), -7, 7), q_w = clamp(round(V_w / s_w), -7, 7)
    Y = s_x · s_wᵀ ⊙ (q_x · q_wᵀ) + bias                    (the product on the INT4 codes, exact)

Backward (Sec. 5): ∇Y is quantized to H halves of INT4 codes with scales, ∇Y ≈ Σ_h s_h ⊙ G_h
(bit splitting: H = 2, G_hi by round to nearest, G_lo stochastic rounding of the residual; "rtn": H = 1)::

    ∇V_x = Σ_h s_h ⊙ (G_h · q_w) · s_w                      (integer products; every row keeps its own)
    ∇V_w = Σ_h (G_h ⊙ s_h ⊙ w_h)ᵀ · (q_x · s_x)             w_h = m_h / p_h with leverage-score sampling
                                                             (Bernoulli keep m ~ p), else 1
    ∇X = ∇V_x · H,  ∇W = ∇V_w · H                           (H symmetric and orthogonal)

Straight-through estimator through the rounding: with "absmax" scales nothing is clipped, so ∇V = ∇V̂; with
a learned LSQ scale (Esser et al. 2020) the clip mask |V / s| <= 7 applies and s gets
∇s = Σ ∇V̂ ⊙ (round(z) - z inside, ±7 outside) / sqrt(numel · 7), z = V / s.

Leverage-score sampling (Sec. 5.2): the 2N stacked rows of [G_hi·s_hi ; G_lo·s_lo] and [X̂ ; X̂] get scores
c_i = ‖half row i‖·‖X̂ row i‖, probabilities p_i = min(1, c·c_i) with Σ p_i = keep_ratio·2N, Bernoulli keep
with probability p_i and kept rows scaled by 1/p_i: E[∇V_w] = the unsampled product (unbiased). Only the ∇W
product is sampled: it sums over tokens, while each row of ∇X needs its own row of ∇Y.

Exactness of the emulation: codes are small integers held in fp32. An INT4×INT4 product over K terms is an
integer of magnitude <= 49·K, and every partial sum of an fp32 accumulation is exact while it stays below
2^24, i.e. for K <= 342,392 (``_EXACT_FP32_K``); longer inner dimensions fall back to float64 (exact up to
2^53). TF32 inputs are exact for these integers too (|code| <= 7 needs 3 bits of the 10-bit mantissa). So
``q_x·q_wᵀ``, and ``G_h·q_w`` with per-tensor weight scales, are bit-exact on CPU and CUDA: the only
rounding is in applying the scales afterwards. Where a scale sits on the inner dimension of a product
(the per-token scales s_h, the sampling weights 1/p_h and per-token X scales in ∇W; per-channel W scales in
∇X), it is applied to the codes before an fp32 product: that product is rounded like any fp32 GEMM. An INT4
GEMM on hardware would need those operands re-quantized; the emulation keeps the paper's math instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..quant import (
    bit_split,
    compute_scale,
    hadamard_matrix,
    leverage_score_probabilities,
    qmax,
    quantize,
    quantize_with_scale,
)
from .config import TRITON_MAX_BLOCK, Int4TrainingConfig

__all__ = [
    "GradCodes",
    "Int4Spec",
    "block_size_candidates",
    "forward_product",
    "hadamard_rotate",
    "hq_quantize",
    "input_grad_product",
    "int4_linear",
    "int_matmul",
    "lsq_grad",
    "lsq_init_scale",
    "lss_row_weights",
    "quantize_grad_for_input",
    "quantize_grad_output",
    "resolve_backend",
    "select_block_size",
    "triton_device_reason",
    "triton_unsupported_reason",
    "weight_grad_product",
]

INT4_QMAX = qmax(4)  # 7: symmetric INT4 codes lie in [-7, 7]
# Largest inner dimension K with K · 7 · 7 <= 2^24: fp32 sums of INT4 products stay exact.
_EXACT_FP32_K = 2**24 // (INT4_QMAX * INT4_QMAX)


# ---------------------------------------------------------------------------------------------- forward


_H_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _hadamard_block(b: int, device: torch.device) -> torch.Tensor:
    key = (b, str(device))
    h = _H_CACHE.get(key)
    if h is None:
        h = _H_CACHE[key] = hadamard_matrix(b, dtype=torch.float32, device=device)
    return h


def hadamard_rotate(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """V = x · BlockDiag(H_b, ..., H_b) along the last dim, in fp32 (``block_size`` None: no rotation).

    Computed as one fp32 product of the (rows · K/b, b) view with H_b (``lowbit.quant.hadamard_matrix``): the
    same map as ``lowbit.quant.hadamard_transform`` (within fp32 rounding, b·2^-24 relative), several times
    faster than its butterflies on CPUs and GPUs alike (FACTS.md: 0.1 ms against 5.4 ms on an H100). With
    TF32 enabled globally on CUDA the inputs are rounded to TF32 (2^-11 relative): harmless for INT4 codes,
    but then codes can differ from the CPU's at rounding ties.
    """
    x32 = x.detach().float()
    if block_size is None:
        return x32
    k = x32.shape[-1]
    h = _hadamard_block(block_size, x32.device)
    return (x32.reshape(-1, k // block_size, block_size) @ h).reshape(x32.shape)


def _quant_granularity(granularity: str, operand: str) -> str:
    # Config "row" is one scale per token for X and per output channel for W (both: rows of a 2-D tensor).
    if granularity == "tensor":
        return "tensor"
    return "token" if operand == "x" else "channel"


def hq_quantize(
    x: torch.Tensor,
    block_size: int | None,
    *,
    scale: torch.Tensor | None = None,
    granularity: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hadamard quantizer: codes = clamp(round(x·H_b / s), -7, 7).

    Args:
        x: 2-D floating tensor (rows × K), any float dtype (computed in fp32); K divisible by block_size.
        block_size: Hadamard block b (power of two), or None for plain round to nearest (no rotation).
        scale: a given positive scale (e.g. a learned LSQ scale, broadcastable to x); None: the dynamic absmax
            scale s = absmax / 7 of the rotated tensor over ``granularity``.
        granularity: of the absmax scale: "tensor" ((1, 1)), "token" or "channel" (one per row: (rows, 1)).

    Returns:
        (codes int8 of x's shape in [-7, 7], scale fp32 in keepdim layout). With absmax nothing clips
        (|v / s| <= 7); a given scale clips values beyond ±7·s. A Triton kernel must equal this bit for bit.
    """
    v = hadamard_rotate(x, block_size)
    s = compute_scale(v, 4, granularity) if scale is None else scale.detach().float().reshape(-1, 1)
    return quantize_with_scale(v, s, 4), s


_CUDA_MM_OUT_DTYPE: list[bool] = []  # [supported?], probed on first CUDA use


def _cuda_bf16_mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a · b on bf16 tensor cores with fp32 accumulation and output (``torch.mm(..., out_dtype=)``), or None
    where this PyTorch lacks it. Exact for integer codes: bf16 holds |code| <= 256 exactly."""
    if _CUDA_MM_OUT_DTYPE == [False]:
        return None
    try:
        out = torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        _CUDA_MM_OUT_DTYPE[:] = [False]
        return None
    _CUDA_MM_OUT_DTYPE[:] = [True]
    return out


def int_matmul(a_codes: torch.Tensor, b_codes: torch.Tensor) -> torch.Tensor:
    """a · b of integer codes (|code| <= 7), exact.

    a (N, K), b (K, M), any integer or float dtype holding integers. Returns fp32 (float64 when
    K > 342,392, where fp32 partial sums could pass 2^24). CPU: an fp32 product. CUDA: bf16 operands with
    fp32 accumulation and output (tensor cores; the integers are exact in bf16), else fp32. Exact on CPU
    and CUDA (module docstring).
    """
    if a_codes.shape[-1] > _EXACT_FP32_K:
        return a_codes.double() @ b_codes.double()
    if a_codes.is_cuda:
        out = _cuda_bf16_mm_fp32_out(a_codes, b_codes)
        if out is not None:
            return out
    return a_codes.float() @ b_codes.float()


def forward_product(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """Y = s_x ⊙ s_wᵀ ⊙ (q_x · q_wᵀ): x_codes (N, K), w_codes (M, K), scales (N or 1, 1) / (M or 1, 1).

    The integer product is exact; the result (N, M) fp32 carries two roundings from the scales.
    """
    return (int_matmul(x_codes, w_codes.t()) * x_scale * w_scale.t()).float()


# ---------------------------------------------------------------------------------------------- backward


class GradCodes(NamedTuple):
    """A quantized output gradient: ∇Y ≈ Σ_h scales[h] ⊙ codes[h].

    codes: int8 (H, N, M) in [-7, 7]; H = 2 for bit splitting (hi, lo), 1 for round to nearest.
    scales: fp32 (H, N, 1) per token or (H, 1, 1) per tensor.
    """

    codes: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """Σ_h scales[h] · codes[h], fp32 (N, M)."""
        return (self.codes.float() * self.scales).sum(0)


def quantize_grad_output(
    grad_y: torch.Tensor,
    method: str = "bit_split",
    granularity: str = "token",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> GradCodes:
    """Quantize ∇Y (N, M) for the backward products.

    ``method``: "bit_split" (``lowbit.quant.bit_split``: hi by round to nearest, lo by stochastic rounding
    of the residual drawn from ``generator``, or with the given uniform ``noise``; E[result] = ∇Y) or "rtn"
    (one INT4 round to nearest, no randomness). ``granularity``: "token" (one scale per row) or "tensor".
    """
    if method == "bit_split":
        bs = bit_split(grad_y, generator, granularity=granularity, noise=noise)
        return GradCodes(torch.stack((bs.hi, bs.lo)), torch.stack((bs.scale_hi, bs.scale_lo)))
    if method == "rtn":
        qt = quantize(grad_y, 4, granularity=granularity)
        return GradCodes(qt.codes.unsqueeze(0), qt.scale.unsqueeze(0))
    raise ValueError(f"method must be 'bit_split' or 'rtn', got {method!r}")


def input_grad_product(gq: GradCodes, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """∇V_x = Σ_h s_h ⊙ (G_h · q_w) · s_w, fp32 (N, K).

    w_codes (M, K); w_scale (1, 1) per tensor (then G_h · q_w is one exact integer product of the stacked
    (H·N, M) codes) or (M, 1) per channel (it sits on the inner dimension M, so it is applied to the weight
    codes before an fp32 product). The backward of a per-channel weight does not call the second form: it
    folds s_w into the gradient before quantizing (:func:`quantize_grad_for_input`), so that its product
    is exact as well.
    """
    H, N, M = gq.codes.shape
    stacked = gq.codes.reshape(H * N, M)
    if w_scale.numel() == 1:
        prod = int_matmul(stacked, w_codes).float().reshape(H, N, w_codes.shape[1])
        return _sum_halves(prod, gq.scales) * w_scale.reshape(())
    prod = (stacked.float() @ (w_codes.float() * w_scale)).reshape(H, N, w_codes.shape[1])
    return _sum_halves(prod, gq.scales)


def quantize_grad_for_input(
    grad_y: torch.Tensor,
    gq: GradCodes,
    w_scale: torch.Tensor,
    method: str = "bit_split",
    granularity: str = "token",
    noise: torch.Tensor | None = None,
) -> tuple[GradCodes, torch.Tensor]:
    """The quantized gradient of the ∇X product and the weight scale left for it: (codes, scale).

    Per-tensor weight scale: ``gq`` itself and s_w (∇V_x = s_w · Σ_h s_h ⊙ (G_h · q_w)). Per-channel s_w
    (M, 1): s_w lies on the product's inner dimension M, so it is folded into the gradient before
    quantizing: Q(∇Y ⊙ s_wᵀ) with the same ``method`` and the same uniform ``noise`` as ``gq`` (bit
    splitting), and scale 1: ∇V_x = Σ_h s'_h ⊙ (G'_h · q_w) is again an exact integer product, and
    E[∇V_x] = ∇Y · (s_w ⊙ q_w) as before. ``gq`` (of ∇Y itself) still serves the ∇W product, whose inner
    dimension is the tokens. ``grad_y`` fp32 (N, M).
    """
    if w_scale.numel() == 1:
        return gq, w_scale
    folded = quantize_grad_output(grad_y * w_scale.reshape(1, -1).float(), method, granularity, noise=noise)
    return folded, torch.ones(1, 1, dtype=torch.float32, device=grad_y.device)


def _sum_halves(prod: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # Σ_h scales[h] ⊙ prod[h], in order h = 0, 1, ... (no (H, N, K) temporary).
    out = prod[0] * scales[0]
    for h in range(1, prod.shape[0]):
        out = out + prod[h] * scales[h]
    return out


def lss_row_weights(
    gq: GradCodes,
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    keep_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Leverage-score sampling of the H·N stacked rows for the ∇W product.

    Scores c_i = ‖row i of s_h ⊙ G_h‖ · ‖row i of X̂‖ (``lowbit.quant.leverage_scores``), probabilities
    ``leverage_score_probabilities(c, keep_ratio · H·N)``, then one uniform draw u per row from
    ``generator`` (the same draw as ``lowbit.quant.leverage_score_sample``, so the same rows are kept), but
    as a mask: no device sync, no data-dependent shapes.

    Returns:
        fp32 (H, N, 1): 1/p_i for kept rows, 0 for dropped ones; E[weight_i] = 1 where c_i > 0.
    """
    H, N, _ = gq.codes.shape
    # lowbit.quant.leverage_scores of (s_h ⊙ G_h, X̂), from the codes without dequantized copies: the norm of
    # a row times its (positive) scale.
    x_norm = torch.linalg.vector_norm(x_codes.float(), dim=-1) * x_scale.reshape(-1)
    g_norm = torch.linalg.vector_norm(gq.codes.float(), dim=-1) * gq.scales.reshape(H, -1)  # (H, N)
    scores = (g_norm * x_norm).reshape(-1)
    p = leverage_score_probabilities(scores, keep_ratio * H * N, validate=False)
    u = torch.rand(p.shape, generator=generator, dtype=torch.float32, device=p.device)
    keep = u < p
    weights = torch.where(keep, 1.0 / torch.where(keep, p, torch.ones_like(p)), torch.zeros_like(p))
    return weights.reshape(H, N, 1)


def weight_grad_product(
    gq: GradCodes,
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """∇V_w = Σ_h (G_h ⊙ s_h ⊙ w_h)ᵀ · (q_x ⊙ s_x), fp32 (M, K).

    x_codes (N, K), x_scale (1, 1) or (N, 1); row_weights (H, N, 1) from :func:`lss_row_weights` or None.
    When every factor on the inner dimension N is one number per half (per-tensor scales, no sampling), the
    H products G_hᵀ · q_x are exact integer products; otherwise the row factors are applied to the codes and
    one fp32 product (N summed once for both halves) follows.
    """
    coef = gq.scales
    if row_weights is not None:
        coef = coef * row_weights
    per_row_x = x_scale.numel() != 1
    if per_row_x:
        coef = coef * x_scale.unsqueeze(0)
    if coef.shape[1] == 1:  # (H, 1, 1): integer products, scaled afterwards
        out = None
        for h in range(gq.codes.shape[0]):
            term = int_matmul(gq.codes[h].t(), x_codes).float() * coef[h].reshape(())
            out = term if out is None else out + term
        return out * x_scale.reshape(())
    a = _sum_halves(gq.codes.float(), coef)  # (N, M)
    out = a.t() @ x_codes.float()
    return out if per_row_x else out * x_scale.reshape(())


# ---------------------------------------------------------------------------------------------- LSQ


def lsq_init_scale(v: torch.Tensor) -> torch.Tensor:
    """LSQ's initial step size 2·mean(|v|)/sqrt(7) (Esser et al. 2020), fp32 0-dim; 1.0 for an all-zero v."""
    s = 2.0 * v.detach().float().abs().mean() / math.sqrt(INT4_QMAX)
    return torch.where(s > 0, s, torch.ones_like(s))


def lsq_grad(
    grad_hat: torch.Tensor, v: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of v̂ = s · clamp(round(v / s), -7, 7) for a given ∇v̂ (LSQ).

    With z = v / s, returns (∇v = ∇v̂ ⊙ [|z| <= 7],
    ∇s = Σ ∇v̂ ⊙ (round(z) - z inside, -7 / +7 below / above) / sqrt(numel · 7)); ∇s is 0-dim. All in fp32.
    """
    z = v.float() / scale.float()
    below, above = z < -INT4_QMAX, z > INT4_QMAX
    inside = ~(below | above)
    grad_v = grad_hat * inside
    dz = torch.where(inside, torch.round(z) - z, torch.where(above, float(INT4_QMAX), -float(INT4_QMAX)))
    grad_s = (grad_hat * dz).sum() / math.sqrt(max(v.numel(), 1) * INT4_QMAX)
    return grad_v, grad_s


# ---------------------------------------------------------------------------------------------- block size


def block_size_candidates(d_in: int) -> list[int]:
    """Powers of two >= 2 that divide ``d_in``, ascending (empty for odd d_in)."""
    out, b = [], 2
    while b <= d_in and d_in % b == 0:
        out.append(b)
        b *= 2
    return out


def select_block_size(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale_mode: str = "absmax",
    granularity: str = "tensor",
    max_rows: int = 4096,
    max_block: int | None = None,
) -> int:
    """The Hadamard block with the smallest output error ‖Q(X·H)·Q(W·H)ᵀ - X·Wᵀ‖_F (the paper picks the block
    that minimizes the quantization error), among :func:`block_size_candidates` of D_in; ties go to the
    smaller block. ``x`` (N, K): the first ``max_rows`` rows are used. ``scale_mode`` "lsq" scores each block
    with LSQ's initial scale, "absmax" with the absmax scale. ``max_block``: only blocks up to it (the Triton
    kernels rotate blocks of at most 128). One device sync (the comparison).
    """
    k = x.shape[-1]
    cands = [b for b in block_size_candidates(k) if max_block is None or b <= max_block]
    if not cands:
        raise ValueError(f"D_in={k} has no power-of-two block size >= 2 for the Hadamard transform")
    x32 = x.detach().reshape(-1, k)[:max_rows].float()
    w32 = weight.detach().float()
    y_ref = x32 @ w32.t()
    errs = []
    for b in cands:
        vx, vw = hadamard_rotate(x32, b), hadamard_rotate(w32, b)
        if scale_mode == "lsq":
            sx, sw = lsq_init_scale(vx).reshape(1, 1), lsq_init_scale(vw).reshape(1, 1)
        else:
            sx = compute_scale(vx, 4, _quant_granularity(granularity, "x"))
            sw = compute_scale(vw, 4, _quant_granularity(granularity, "w"))
        y = forward_product(quantize_with_scale(vx, sx, 4), sx, quantize_with_scale(vw, sw, 4), sw)
        errs.append(torch.linalg.vector_norm(y - y_ref))
    return cands[int(torch.argmin(torch.stack(errs)))]


# ---------------------------------------------------------------------------------------------- Function


@dataclass(frozen=True)
class Int4Spec:
    """The static part of one INT4 linear call (hashable; what torch.compile guards on).

    block_size: resolved Hadamard block (int) or None (no rotation). granularity: "tensor" | "row".
    lsq: scales are given (learned) instead of absmax. grad_quantizer: "bit_split" | "rtn".
    grad_granularity: "token" | "tensor". lss_keep_ratio: None (no sampling) or a ratio in (0, 1].
    """

    block_size: int | None
    granularity: str = "tensor"
    lsq: bool = False
    grad_quantizer: str = "bit_split"
    grad_granularity: str = "token"
    lss_keep_ratio: float | None = None

    @classmethod
    def from_config(cls, config: Int4TrainingConfig, block_size: int | None) -> Int4Spec:
        """Spec for ``config`` with the layer's resolved ``block_size`` (None for recipe "rtn")."""
        return cls(
            block_size=block_size if config.hadamard else None,
            granularity=config.granularity,
            lsq=config.uses_lsq,
            grad_quantizer=config.grad_quantizer,
            grad_granularity=config.grad_granularity,
            lss_keep_ratio=config.lss_keep_ratio if config.lss else None,
        )


class _Int4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, x_scale, w_scale, spec: Int4Spec, generator, out_dtype):
        with torch.autocast(x2d.device.type, enabled=False):
            v_x = hadamard_rotate(x2d, spec.block_size)
            v_w = hadamard_rotate(weight, spec.block_size)
            if spec.lsq:
                s_x = x_scale.detach().float().abs().clamp_min(1e-12).reshape(1, 1)
                s_w = w_scale.detach().float().abs().clamp_min(1e-12).reshape(1, 1)
            else:
                s_x = compute_scale(v_x, 4, _quant_granularity(spec.granularity, "x"))
                s_w = compute_scale(v_w, 4, _quant_granularity(spec.granularity, "w"))
            q_x = quantize_with_scale(v_x, s_x, 4)
            q_w = quantize_with_scale(v_w, s_w, 4)
            y = forward_product(q_x, s_x, q_w, s_w)
            if bias is not None:
                y = y + bias.float()
        # Only INT4 codes (int8 storage) and scales are kept; LSQ also needs the rotated input for its clip
        # mask and rounding residual (kept in the input's dtype) and the weight (a parameter: no copy).
        if spec.lsq:
            ctx.save_for_backward(q_x, s_x, q_w, s_w, v_x.to(x2d.dtype), weight)
        else:
            ctx.save_for_backward(q_x, s_x, q_w, s_w)
        ctx.spec, ctx.generator = spec, generator
        ctx.dtypes = (x2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        spec: Int4Spec = ctx.spec
        q_x, s_x, q_w, s_w, *lsq_saved = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b, need_sx, need_sw = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_sx = grad_sw = None
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.float()
            noise = None
            if s_w.numel() != 1 and spec.grad_quantizer == "bit_split" and (need_x or need_sx):
                # one draw shared by the split of ∇Y and of ∇Y ⊙ s_w (the numbers bit_split would draw)
                noise = torch.rand(g.shape, generator=ctx.generator, dtype=torch.float32, device=g.device)
            gq = quantize_grad_output(g, spec.grad_quantizer, spec.grad_granularity, ctx.generator, noise)
            if need_x or need_sx:
                gq_x, s_wx = quantize_grad_for_input(g, gq, s_w, spec.grad_quantizer, spec.grad_granularity,
                                                     noise)
                grad_vx = input_grad_product(gq_x, q_w, s_wx)
                if spec.lsq:
                    grad_vx, grad_sx = lsq_grad(grad_vx, lsq_saved[0], s_x)
                grad_x = hadamard_rotate(grad_vx, spec.block_size).to(x_dtype) if need_x else None
            if need_w or need_sw:
                qx_f = q_x.float()  # converted once for the scores and the product
                row_w = None
                if spec.lss_keep_ratio is not None and g.shape[0] > 0:
                    row_w = lss_row_weights(gq, qx_f, s_x, spec.lss_keep_ratio, ctx.generator)
                grad_vw = weight_grad_product(gq, qx_f, s_x, row_w)
                if spec.lsq:
                    v_w = hadamard_rotate(lsq_saved[1], spec.block_size)
                    grad_vw, grad_sw = lsq_grad(grad_vw, v_w, s_w)
                grad_w = hadamard_rotate(grad_vw, spec.block_size).to(w_dtype) if need_w else None
            if need_b:
                grad_b = g.sum(0).to(b_dtype)
        if not need_sx:
            grad_sx = None
        if not need_sw:
            grad_sw = None
        return grad_x, grad_w, grad_b, grad_sx, grad_sw, None, None, None


# -------------------------------------------------------------------------------------------- Triton backend

#: cuBLAS FP8 products need every dimension a multiple of 16: D_in and D_out are checked, the token count is
#: padded with zero rows (zero codes; they add nothing to the products and have zero leverage scores).
_TRITON_ALIGN = 16


def _triton_kernels():
    """``lowbit.kernels.int4_linear`` (imported on first use: importing Triton must wait until a test has set
    TRITON_INTERPRET), or None where Triton is not installed."""
    try:
        from ..kernels import int4_linear as kernels
    except ImportError:  # pragma: no cover - exercised where Triton is absent
        return None
    from ..kernels.hadamard_quant import HAS_TRITON

    return kernels if HAS_TRITON else None


def triton_unsupported_reason(
    config: Int4TrainingConfig, in_features: int, out_features: int, block_size: int | None = None
) -> str | None:
    """Why the Triton kernels cannot run a layer of this config and shape (naming the field), or None.

    ``block_size``: the layer's resolved block (None: ``config.block_size``, or not chosen yet for "auto").
    The kernels need D_in and D_out multiples of 16 (cuBLAS FP8), a Hadamard block of at most 128 and, with a
    rotation, D_in < 128 or a multiple of 128 (the ∇X product rotates 128-column tiles in its epilogue).
    """
    block = block_size if block_size is not None else config.block_size
    block = block if config.hadamard and isinstance(block, int) else None
    return _triton_shape_reason(block, in_features, out_features, config.hadamard, "Int4TrainingConfig.")


def _triton_shape_reason(
    block: int | None, d_in: int, d_out: int, rotated: bool, prefix: str = ""
) -> str | None:
    if block is not None and block > TRITON_MAX_BLOCK:
        return (f"{prefix}block_size={block}: the Triton kernels rotate Hadamard blocks of at most "
                f"{TRITON_MAX_BLOCK}")
    if d_in % _TRITON_ALIGN:
        return f"in_features={d_in} is not a multiple of {_TRITON_ALIGN} (cuBLAS FP8 products)"
    if d_out % _TRITON_ALIGN:
        return f"out_features={d_out} is not a multiple of {_TRITON_ALIGN} (cuBLAS FP8 products)"
    if rotated and d_in > TRITON_MAX_BLOCK and d_in % TRITON_MAX_BLOCK:
        return (f"in_features={d_in} is not a multiple of {TRITON_MAX_BLOCK} (the Triton ∇X product rotates "
                f"{TRITON_MAX_BLOCK}-column tiles)")
    return None


def triton_device_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (no Triton; not CUDA and no TRITON_INTERPRET=1)."""
    kernels = _triton_kernels()
    if kernels is None:
        return "Triton is not installed (pip install 'lowbit[triton]')"
    device = torch.device(device)
    if device.type != "cuda":
        from ..kernels.hadamard_quant import interpreting

        if not interpreting():
            return f"the Triton kernels run on CUDA (or on the CPU with TRITON_INTERPRET=1), got {device}"
    return None


def resolve_backend(
    backend: str, device: torch.device | str | None = None, unsupported: str | None = None
) -> str:
    """The backend that runs: "emulate" or "triton".

    "emulate" as is. "triton": ``unsupported`` (a reason from :func:`triton_unsupported_reason`) raises
    ValueError, a missing Triton or a device it cannot run on (``device`` given) raises RuntimeError.
    "auto": "triton" when ``device`` is CUDA, Triton is installed and ``unsupported`` is None, else
    "emulate" (:func:`auto_backend_reason` says why). An unknown name raises ValueError.
    """
    if backend == "emulate":
        return "emulate"
    if backend == "triton":
        if unsupported is not None:
            raise ValueError(f"backend='triton': {unsupported}; use backend='auto' or 'emulate'")
        if _triton_kernels() is None:
            raise RuntimeError("backend='triton' needs Triton: pip install 'lowbit[triton]'")
        if device is not None:
            reason = triton_device_reason(device)
            if reason is not None:
                raise RuntimeError(f"backend='triton': {reason}")
        return "triton"
    if backend == "auto":
        return "triton" if auto_backend_reason(device, unsupported) is None else "emulate"
    raise ValueError(f"backend must be one of ('auto', 'emulate', 'triton'), got {backend!r}")


def auto_backend_reason(device: torch.device | str | None, unsupported: str | None = None) -> str | None:
    """Why backend "auto" emulates on ``device`` (None: it runs the Triton kernels)."""
    if device is None or torch.device(device).type != "cuda":
        return f"not on CUDA ({device})"
    if unsupported is not None:
        return unsupported
    return triton_device_reason(device)


class _Int4LinearTriton(torch.autograd.Function):
    """The autograd Function of :func:`int4_linear` on the Triton / FP8 path (``lowbit.kernels.int4_linear``),
    the same math as :class:`_Int4Linear`; LSQ runs the kernels' backward without the rotation back
    (``rotate_back=False``), applies the clip mask and the step-size gradient, then rotates."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, x_scale, w_scale, spec: Int4Spec, generator, out_dtype, ref_draws):
        kernels = _triton_kernels()
        n = x2d.shape[0]
        pad = -n % _TRITON_ALIGN
        with torch.autocast(x2d.device.type, enabled=False):
            x_in = x2d if x2d.stride(-1) == 1 or x2d.shape[-1] <= 1 else x2d.contiguous()
            if pad:
                x_in = torch.nn.functional.pad(x_in, (0, 0, 0, pad))
            s_x = s_w = None
            if spec.lsq:
                s_x = x_scale.detach().float().abs().clamp_min(1e-12).reshape(1, 1)
                s_w = w_scale.detach().float().abs().clamp_min(1e-12).reshape(1, 1)
            # As lowbit.kernels.int4_linear.Int4LinearTriton: a per-tensor "rtn" gradient runs all three
            # products on FP8 (X's codes also saved transposed, W's as FP8); bit splitting wants int8 W codes.
            rtn = spec.grad_quantizer == "rtn"
            y, saved = kernels.int4_linear_fwd(
                x_in, weight.contiguous(), bias, block_size=spec.block_size, granularity=spec.granularity,
                x_scale=s_x, w_scale=s_w, out_dtype=out_dtype,
                save_x_codes_t=rtn and spec.grad_granularity == "tensor" and spec.granularity == "tensor",
                w_codes_t_dtype=torch.float8_e4m3fn if rtn else torch.int8,
            )
        tensors = [*saved[:5], saved.x_codes_t]
        if spec.lsq:  # the clip masks need the rotated input (kept in its dtype) and the weight
            tensors += [hadamard_rotate(x2d, spec.block_size).to(x2d.dtype), weight]
        ctx.save_for_backward(*tensors)
        ctx.spec, ctx.generator, ctx.n, ctx.reference_draws = spec, generator, n, ref_draws
        ctx.dtypes = (x2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y[:n] if pad else y

    @staticmethod
    def backward(ctx, grad_y):
        kernels = _triton_kernels()
        spec: Int4Spec = ctx.spec
        saved_t = ctx.saved_tensors
        saved = kernels.Int4LinearSaved(*saved_t[:5], spec.block_size, x_codes_t=saved_t[5])
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b, need_sx, need_sw = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_sx = grad_sw = None
        n = ctx.n
        n_pad = saved.x_codes.shape[0]
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.contiguous()
            noise = row_weights = None
            if ctx.reference_draws:
                noise, row_weights = _reference_draws(g, saved, spec, ctx.generator)
            if n_pad != n:
                g_in = torch.nn.functional.pad(g, (0, 0, 0, n_pad - n))
                if noise is not None:
                    noise = torch.nn.functional.pad(noise, (0, 0, 0, n_pad - n))
                if row_weights is not None:
                    row_weights = torch.nn.functional.pad(row_weights, (0, n_pad - n))
            else:
                g_in = g
            keep = None
            if spec.lss_keep_ratio is not None and row_weights is None and n > 0:
                keep = spec.lss_keep_ratio * n / n_pad  # the same expected number of rows as without padding
            gx, gw = kernels.int4_linear_bwd(
                g_in, saved, grad_quantizer=spec.grad_quantizer, grad_granularity=spec.grad_granularity,
                lss_keep_ratio=keep, generator=ctx.generator, need_grad_x=need_x or need_sx,
                need_grad_w=need_w or need_sw, x_dtype=x_dtype, w_dtype=w_dtype, rotate_back=not spec.lsq,
                noise=noise, row_weights=row_weights,
            )
            if gx is not None and n_pad != n:
                gx = gx[:n]
            if spec.lsq:
                v_x, weight = saved_t[6], saved_t[7]
                if gx is not None:
                    gx, grad_sx = lsq_grad(gx, v_x, saved.x_scale)
                    gx = hadamard_rotate(gx, spec.block_size).to(x_dtype)
                if gw is not None:
                    v_w = hadamard_rotate(weight, spec.block_size)
                    gw, grad_sw = lsq_grad(gw, v_w, saved.w_scale)
                    gw = hadamard_rotate(gw, spec.block_size).to(w_dtype)
            grad_x = gx if need_x else None
            grad_w = gw if need_w else None
            if need_b:
                grad_b = g.float().sum(0).to(b_dtype)
        if not need_sx:
            grad_sx = None
        if not need_sw:
            grad_sw = None
        return grad_x, grad_w, grad_b, grad_sx, grad_sw, None, None, None, None


def _reference_draws(g: torch.Tensor, saved, spec: Int4Spec, generator: torch.Generator | None):
    """The random draws of the emulated backward, from ``generator`` in the same order: the (N, M) uniform
    noise of bit splitting's lo rounding and, with sampling, the (2, N) weights 1/p or 0 of
    :func:`lss_row_weights` (scored on the kernels' codes). (None, None) for "rtn" (no randomness)."""
    if spec.grad_quantizer != "bit_split":
        return None, None
    n = g.shape[0]
    state = None if generator is None else generator.get_state()
    noise = torch.rand(g.shape, generator=generator, dtype=torch.float32, device=g.device)
    if spec.lss_keep_ratio is None or n == 0:
        return noise, None
    if generator is None:
        raise ValueError("reference draws with leverage-score sampling need a generator")
    generator.set_state(state)  # draw the same noise again inside the emulated bit split
    gq = quantize_grad_output(g.float(), "bit_split", spec.grad_granularity, generator)
    x_codes = saved.x_codes[:n].float()
    x_scale = saved.x_scale[:n] if saved.x_scale.numel() != 1 else saved.x_scale
    weights = lss_row_weights(gq, x_codes, x_scale, spec.lss_keep_ratio, generator)
    return noise, weights.reshape(2, n)


@torch.compiler.disable
def _apply_triton(*args):
    # An opaque call for torch.compile (LSQ, reference draws, generator seeds): the launchers pick tile
    # shapes and sync for the number of kept rows.
    return _Int4LinearTriton.apply(*args)


def _apply_triton_ops(x2d, weight, bias, spec: Int4Spec, seed: torch.Tensor, out_dtype: torch.dtype):
    """The absmax recipes on the kernels' custom ops (``lowbit.kernels.int4_linear.int4_linear_triton``):
    traced by torch.compile as two nodes, no host sync (CUDA graphs). Rows padded to a multiple of 16."""
    kernels = _triton_kernels()
    n = x2d.shape[0]
    pad = -n % _TRITON_ALIGN
    x_in = x2d if x2d.stride(-1) == 1 or x2d.shape[-1] <= 1 else x2d.contiguous()
    if pad:
        x_in = torch.nn.functional.pad(x_in, (0, 0, 0, pad))
    keep = None
    if spec.lss_keep_ratio is not None and n > 0:
        keep = spec.lss_keep_ratio * n / (n + pad)  # the same expected number of rows as without padding
    y = kernels.int4_linear_triton(
        x_in, weight.contiguous(), bias, block_size=spec.block_size, granularity=spec.granularity,
        grad_quantizer=spec.grad_quantizer, grad_granularity=spec.grad_granularity, lss_keep_ratio=keep,
        seed=seed, out_dtype=out_dtype,
    )
    return y[:n] if pad else y


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    spec: Int4Spec,
    input_scale: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "emulate",
    reference_draws: bool = False,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """INT4 fully quantized ``x · weightᵀ + bias`` (module docstring), differentiable in x, weight, bias and
    the LSQ scales.

    Args:
        x: floating tensor (..., K), any leading shape; fp32, bf16 or fp16 (codes computed in fp32).
        weight: floating (M, K), the full-precision master weight. bias: (M,) or None.
        spec: :class:`Int4Spec` (K must be divisible by ``spec.block_size``).
        input_scale, weight_scale: learned positive 0-dim scales, required when ``spec.lsq`` (else unused).
        generator: random source of the backward pass (stochastic rounding, sampling), on x's device;
            None uses the global generator.
        backend: "emulate" (PyTorch, this module's math) or "triton" (``lowbit.kernels.int4_linear``: FP8 /
            int8 tensor cores, fused quantizers; CUDA, or the CPU under TRITON_INTERPRET=1). The Triton
            path equals the emulation up to rounding (docs/int4.md); its random numbers come from Triton's
            Philox seeded from ``generator``, unless ``reference_draws``.
        reference_draws: Triton backend only: draw the backward's randomness from ``generator`` exactly as
            the emulation does (the lo-rounding noise with ``torch.rand``; the sampling weights with
            :func:`lss_row_weights`), so that both backends follow the same trajectory up to rounding.
            Slower (one more bit split in PyTorch with sampling); for tests and debugging.
        seed: Triton backend, absmax scales, no reference draws: a one-element int64 tensor on x's device
            in [0, 2^31 - 1) seeding the backward's in-kernel randomness instead of ``generator``; then the
            call runs on the kernels' custom ops, which torch.compile traces without a graph break and which
            never sync with the host (``Int4Linear`` passes a per-call seed from a device counter).

    Returns:
        (..., M) in x's dtype, or in the autocast dtype when autocast is enabled for x's device (as
        ``F.linear`` would return).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"int4_linear: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
        )
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        raise TypeError("int4_linear: weight must be a 2-D floating-point tensor (D_out, D_in)")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"int4_linear: x's last dim ({x.shape[-1] if x.ndim else None}) must equal "
            f"D_in = {weight.shape[1]}"
        )
    k = weight.shape[1]
    if spec.block_size is not None and k % spec.block_size != 0:
        raise ValueError(f"int4_linear: D_in={k} is not a multiple of the Hadamard block {spec.block_size}")
    if spec.lsq and (input_scale is None or weight_scale is None):
        raise ValueError("int4_linear: spec.lsq needs input_scale and weight_scale (learned LSQ scales)")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type)
    else:
        out_dtype = x.dtype
    x2d = x.reshape(-1, k)
    if out_dtype != x2d.dtype and torch.is_autocast_enabled(device_type):
        # As F.linear under autocast: both backends quantize the input in the autocast dtype (the kernels
        # read half the bytes of fp32; under torch.compile the cast fuses into the producer, e.g. the
        # LayerNorm). The same input on both sides: the backends differ only by their roundings.
        x2d = x2d.to(out_dtype)
    if backend == "triton":
        reason = _triton_shape_reason(spec.block_size, k, weight.shape[0], spec.block_size is not None)
        if reason is None:
            reason = triton_device_reason(x.device)
        if reason is not None:
            raise ValueError(f"int4_linear(backend='triton'): {reason}")
        if seed is not None and not spec.lsq and not reference_draws:
            y = _apply_triton_ops(x2d, weight, bias, spec, seed, out_dtype)
        else:
            y = _apply_triton(x2d, weight, bias, input_scale, weight_scale, spec, generator, out_dtype,
                              bool(reference_draws))
    elif backend == "emulate":
        y = _Int4Linear.apply(x2d, weight, bias, input_scale, weight_scale, spec, generator, out_dtype)
    else:
        raise ValueError(f"int4_linear: backend must be 'emulate' or 'triton', got {backend!r}")
    return y.reshape(*x.shape[:-1], weight.shape[0])
