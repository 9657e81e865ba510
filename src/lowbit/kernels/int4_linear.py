"""INT4 fully quantized linear on Hopper: the kernel-level forward / backward pair and an autograd Function.

Mirrors ``lowbit.int4.function`` (the emulated math, Xi et al. 2023) with X (N tokens × K), W (M × K),
H = BlockDiag(H_b) along K:

Forward::

    q_x, s_x = HQ(X)   q_w, s_w = HQ(W)          hadamard_quantize: one fused pass each (two for a
                                                 per-tensor absmax); q_x as FP8 (N, K), q_w as FP8 (M, K)
                                                 and int8 transposed (K, M) for the backward
    Y = s_x ⊙ s_wᵀ ⊙ (q_x · q_wᵀ) (+ bias)        int4_mm: torch._scaled_mm, exact integer product

Backward (bit splitting; "rtn" uses one INT4 code matrix G with its scale instead of v and s_lo)::

    v = 14·hi + lo, s_lo = s_hi / 14             bit_split_quantize: one fused pass over ∇Y
    ∇X = (s_lo ⊙ (v · q_w) · s_w) · H             int8_scaled_mm: Triton int8 GEMM, scales and the rotation
                                                 back in the epilogue. A per-channel s_w (on the inner
                                                 dimension) is folded into ∇Y first: v' s'_lo from the split
                                                 of ∇Y ⊙ s_wᵀ, made in the same pass with the same noise
    ∇W = (Σ_rows a_jᵀ (f_j · b_j)) · H             a_j: INT4 / v codes of a row (exact in fp16), b_j: the
                                                 saved q_x row, f_j = s_j · w_j · s_x (times a power of two,
                                                 one fp16 rounding); an fp16 product with fp32 accumulation,
                                                 since every f_j sits on its inner dimension

With leverage-score sampling the rows j are the kept rows of the 2N stacked halves [hi; lo] (scores
‖s_h·G_h row‖·‖q_x·s_x row‖, p = leverage_score_probabilities(scores, keep_ratio·2N), Bernoulli keep,
w_j = 1/p_j), sampled and compacted on the GPU by ``leverage_sample_compact`` (one program) and
``gather_scaled_rows``, so the ∇W product's inner dimension is the number kept (one device sync for that
number). Without sampling the rows are the N tokens with a_j = v_j, f_j = s_lo·s_x. ``grad_weight_fp8``
puts the sampled ∇W product on FP8 tensor cores instead (unbiased power-of-two rounding of each f_j).

Where the results differ from the emulation: the products here are exact integers times scales rounded
once (the emulation rounds twice in fp32), the ∇W operand f_j·b_j is rounded to fp16 (relative 2^-11), the
in-kernel random numbers (the lo rounding, the Bernoulli draws) come from Triton's Philox seeded from
``generator`` instead of ``generator`` itself, and the keep probabilities are computed in fp32 (pass
``noise`` and ``row_weights`` to use given draws). tests/kernels/test_int4_linear.py holds both to the
emulated math.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .hadamard_quant import (
    _CODE_DTYPES,
    _bit_split,
    _check_block,
    _check_matrix,
    _check_triton,
    _gather,
    _hadamard_quantize,
    _hadamard_rows,
    _lss,
    _row_factors,
    lss_capacity,
)
from .int4_matmul import GEMM_CONFIG_DUAL, _int4_mm, _scaled_mm_triton, int8_scaled_mm

__all__ = ["Int4LinearSaved", "int4_linear_bwd", "int4_linear_fwd", "int4_linear_triton"]

_F8 = torch.float8_e4m3fn


class _SavedFields(NamedTuple):
    x_codes: torch.Tensor
    x_scale: torch.Tensor
    x_code_sumsq: torch.Tensor
    w_codes_t: torch.Tensor
    w_scale: torch.Tensor
    block_size: int | None


class Int4LinearSaved(_SavedFields):
    """What the forward keeps for the backward (INT4 codes in one byte each, no full-precision copy).

    x_codes: (N, K) FP8 E4M3 codes of X·H. x_scale: (N, 1) per token or (1, 1) fp32.
    x_code_sumsq: (N,) Σ codes² per row (for the leverage scores).
    w_codes_t: (K, M) int8 codes of W·H, transposed (the K-major operand of the ∇X product).
    w_scale: (M, 1) per channel or (1, 1) fp32. block_size: the Hadamard block or None.

    Attribute, not a field (the tuple keeps its six fields, so unpacking code is unaffected):
    x_codes_t, None or (K, N) FP8 codes of X·H transposed (the K-major operand of an FP8 ∇W product over
    the tokens), written by the forward with ``save_x_codes_t=True``; ``Int4LinearSaved(..., x_codes_t=t)``.
    """

    def __new__(cls, *fields, x_codes_t: torch.Tensor | None = None):
        self = super().__new__(cls, *fields)
        self.x_codes_t = x_codes_t
        return self


def int4_linear_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_size: int | None,
    granularity: str = "tensor",
    x_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    save_x_codes_t: bool = False,
    w_codes_t_dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, Int4LinearSaved]:
    """Y = HQ(X) · HQ(W)ᵀ (+ bias): the forward of ``lowbit.int4`` on FP8 tensor cores.

    Args:
        x2d: (N, K) bf16 / fp16 / fp32, rows contiguous, on CUDA. weight: (M, K), same kinds of dtype.
        bias: optional (M,), added in ``out_dtype`` after the product (one more rounding than the
            emulation's fp32 sum).
        block_size: Hadamard block (power of two <= 128 dividing K) or None (no rotation).
        granularity: "tensor" (one scale per tensor) or "row" (per token of X, per output channel of W).
        x_scale, w_scale: given (learned, LSQ) positive one-element scales; then granularity is ignored.
        out_dtype: dtype of Y (default x2d's).
        save_x_codes_t: also write the transposed FP8 X codes in the same pass (``x_codes_t``: the operand of
            the all-FP8 ∇W of a per-tensor "rtn" gradient, see :func:`int4_linear_bwd`).
        w_codes_t_dtype: dtype of the saved transposed W codes: int8 (the int8 ∇X product of a bit-split
            gradient) or float8_e4m3fn (the FP8 ∇X product of an INT4 "rtn" gradient).

    Returns:
        (Y (N, M) ``out_dtype``, :class:`Int4LinearSaved`). N, M, K multiples of 16 (cuBLAS FP8).
    """
    if x2d.ndim != 2 or weight.ndim != 2 or x2d.shape[1] != weight.shape[1]:
        raise ValueError(f"x2d (N, K) and weight (M, K) must share K, got {tuple(x2d.shape)} and "
                         f"{tuple(weight.shape)}")
    if granularity not in ("tensor", "row"):
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    _check_matrix("x2d", x2d)
    _check_matrix("weight", weight)
    _check_triton("int4_linear_fwd", x2d, weight)
    b = _check_block(block_size, x2d.shape[1])
    if w_codes_t_dtype not in _CODE_DTYPES:
        raise TypeError(f"w_codes_t_dtype must be torch.float8_e4m3fn or torch.int8, got {w_codes_t_dtype}")
    x_scale, w_scale = (_given_scale(name, s, x2d.device) for name, s in (("x_scale", x_scale),
                                                                        ("w_scale", w_scale)))
    return _fwd_impl(x2d, weight, bias, block_size, b, granularity == "row", x_scale, w_scale,
                     out_dtype or x2d.dtype, save_x_codes_t, w_codes_t_dtype)


def _given_scale(name: str, scale: torch.Tensor | None, device) -> torch.Tensor | None:
    """A given (learned) scale as the contiguous (1, 1) fp32 tensor the quantizer takes (or None)."""
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.device != device:
        raise ValueError(f"{name} must be a one-element tensor on {device}, got {scale!r}")
    return scale.detach().reshape(1, 1).float().contiguous()


def _fwd_impl(x2d, weight, bias, block_size, b, row_wise, x_scale, w_scale, out_dtype, save_x_codes_t,
              w_codes_t_dtype) -> tuple[torch.Tensor, Int4LinearSaved]:
    """:func:`int4_linear_fwd` of checked arguments (b: the int block, 1 for none)."""
    qx = _hadamard_quantize(x2d, b, row_wise, x_scale, _F8, _F8 if save_x_codes_t else None,
                            want_absmax=False)
    qw = _hadamard_quantize(weight, b, row_wise, w_scale, _F8, w_codes_t_dtype, want_absmax=False)
    w_s = qw.scale if qw.scale.numel() == 1 else qw.scale.reshape(1, -1)
    y = _int4_mm(qx.codes, qw.codes, qx.scale, w_s, out_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    saved = Int4LinearSaved(qx.codes, qx.scale, qx.code_sumsq, qw.codes_t, qw.scale, block_size,
                            x_codes_t=qx.codes_t)
    return y, saved


def _seeds(seed: torch.Tensor | None, generator: torch.Generator | None, device, needed: bool
           ) -> torch.Tensor:
    """Three int64 seeds in [0, 2^31 - 1) on ``device`` (bit splitting, sampling, power-of-two rounding):
    derived on the device from ``seed`` (no host round trip), else drawn from ``generator``.

    (The backward itself passes ``seed`` to the kernels, which derive stream i the same way:
    ``hadamard_quant._load_seed``; this is the reference of that derivation.)"""
    if seed is None:
        if not needed:
            return torch.zeros(3, dtype=torch.int64, device=device)
        return torch.randint(0, 2**31 - 1, (3,), generator=generator, device=device, dtype=torch.int64)
    base = seed.reshape(1).to(device=device, dtype=torch.int64)
    # (arange, not a tensor from a list: no host-to-device copy, which CUDA-graph capture forbids)
    return (base + torch.arange(3, dtype=torch.int64, device=device) * 1_000_003) % (2**31 - 1)


class _SeedSource:
    """The three random streams of a backward as (one-element int64 tensor, ``_load_seed`` index) pairs:
    the given ``seed`` with indices 0, 1, 2 (the kernels derive the streams of :func:`_seeds`), else the
    slices of :func:`_seeds`'s tensor with index -1 (drawn from ``generator`` when ``needed``, at once, as
    before; zeros made only when read)."""

    __slots__ = ("base", "drawn", "device")

    def __init__(self, seed, generator, device, needed):
        self.device = device
        self.drawn = None
        if seed is not None:
            base = seed if seed.shape == (1,) else seed.reshape(1)
            if base.dtype != torch.int64 or base.device != device:
                base = base.to(device=device, dtype=torch.int64)
            self.base = base
        else:
            self.base = None
            if needed:
                self.drawn = _seeds(None, generator, device, True)

    def __call__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.base is not None:
            return self.base, i
        if self.drawn is None:
            self.drawn = torch.zeros(3, dtype=torch.int64, device=self.device)
        return self.drawn[i:i + 1], -1


#: Whether ``torch.mm(..., out_dtype=torch.float32)`` works for fp16 operands here (None: not tried yet).
MM_FP32_OUT: bool | None = None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · b of fp16 operands with fp32 accumulation and an fp32 result.

    Where cuBLAS cannot write fp32 from fp16 operands (``torch.mm`` without ``out_dtype``), the operands go
    through bf16 instead (an fp16 output could overflow): one more rounding of b, relative 2^-8.
    """
    global MM_FP32_OUT
    if a.device.type != "cuda":
        return a.float() @ b.float()
    if MM_FP32_OUT is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            MM_FP32_OUT = True
            return out
        except (TypeError, RuntimeError):
            MM_FP32_OUT = False
    return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16)).float()


def _as_codes(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer codes (|c| <= 15) in ``dtype`` (int8 or FP8 E4M3), converted exactly through fp16 if needed."""
    return codes if codes.dtype == dtype else codes.to(torch.float16).to(dtype)


def _pow2_normalizer(values: torch.Tensor) -> torch.Tensor:
    """One-element fp32 power of two 2^e with 7·max|values| / 2^e in [2^12, 2^13) (1 for all zeros).

    Dividing a factor by it is exact, and puts factor · code (|code| <= 7) well inside the fp16 range:
    the largest rows keep 11 significant bits, and only rows 2^-36 times smaller reach fp16 subnormals.
    The backward computes it with ``_row_factors`` (one launch); this is the PyTorch reference.
    """
    values = values.detach() if values.requires_grad else values
    return _pow2_of_max(values.abs().amax().reshape(1).float())


def _pow2_of_max(vmax: torch.Tensor) -> torch.Tensor:
    """:func:`_pow2_normalizer` of a one-element fp32 tensor vmax = max|values| (>= 0, or NaN): 2^e with
    e = floor(log2(7·vmax)) - 12, the exponent of fp32 7·vmax read exactly (``torch.frexp``, subnormals
    too; not a rounded log2, which reaches the next integer just below a power of two); 1 where 7·vmax is
    0 or NaN, inf where it overflows. Powers below 2^-126 are fp32 subnormals or 0, as fp32 arithmetic
    rounds them."""
    y = vmax * 7.0
    _, ex = torch.frexp(y)  # y = m·2^ex, m in [0.5, 1): floor(log2 y) = ex - 1
    p = torch.ldexp(torch.ones_like(y), ex - 13)
    p = torch.where(y == math.inf, y, p)
    return torch.where((y > 0) & (y == y), p, torch.ones_like(y))


def int4_linear_bwd(
    grad_y: torch.Tensor,
    saved: Int4LinearSaved,
    *,
    grad_quantizer: str = "bit_split",
    grad_granularity: str = "token",
    lss_keep_ratio: float | None = None,
    generator: torch.Generator | None = None,
    need_grad_x: bool = True,
    need_grad_w: bool = True,
    x_dtype: torch.dtype = torch.bfloat16,
    w_dtype: torch.dtype = torch.float32,
    rotate_back: bool = True,
    noise: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    grad_x_backend: str = "auto",
    grad_weight_fp8: bool = False,
    seed: torch.Tensor | None = None,
    sync_free: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∇X, ∇W) of ``int4_linear_fwd`` for the output gradient ``grad_y`` (module docstring).

    Args:
        grad_y: (N, M) bf16 / fp16 / fp32, rows contiguous.
        saved: from :func:`int4_linear_fwd`.
        grad_quantizer: "bit_split" (two INT4 halves, per ``grad_granularity``) or "rtn" (one INT4 matrix).
        grad_granularity: "token" or "tensor".
        lss_keep_ratio: None (no sampling) or the expected kept fraction of the 2N stacked halves (bit_split).
        generator: random source on grad_y's device: the seed of the in-kernel noise and the Bernoulli draws.
        need_grad_x, need_grad_w: which gradients to compute (the other is returned as None).
        x_dtype, w_dtype: dtypes of ∇X and ∇W.
        rotate_back: False returns ∇V_x = ∇X·H and ∇V_w = ∇W·H (fp32) for callers that act between the
            product and the rotation (LSQ's clip mask), then :func:`hadamard_rows`.
        noise: optional (N, M) fp32 uniform noise of the lo rounding (``bit_split_quantize``); for tests.
        row_weights: optional (2, N) / (2, N, 1) given sampling weights (1/p kept, 0 dropped), as
            ``lowbit.int4.function.lss_row_weights`` returns; replaces the draw. For tests.
        grad_x_backend: "auto" (default, = "triton"), "triton" (the fused int8 GEMM), "cublas"
            (torch._int_mm + a rotation pass) or "fp8x2" (the bit-split gradient as two FP8 products, hi and
            lo, in one Triton kernel; per-tensor weight scale, else as "triton"). A "rtn" gradient runs on
            FP8 (exact) unless "cublas". A per-channel weight scale is folded into ∇Y before quantizing
            (``lowbit.int4.function.quantize_grad_for_input``), so every backend's product is exact.
        grad_weight_fp8: with sampling, run the ∇W product on FP8 tensor cores: each kept row's factor
            s_h · s_x / p is rounded to a power of two, stochastically and unbiased (``gather_scaled_rows``'s
            ``pow2_round``), so that the product is exact; E[∇W] is unchanged, each row's factor gets a
            relative standard deviation of at most 1/sqrt(8) (0.35). Default off: fp16 operands.
        seed: optional one-element int64 tensor on grad_y's device in [0, 2^31 - 1): the random source
            instead of ``generator`` (the in-kernel Philox streams are derived from it on the device).
        sync_free: with sampling, compact the kept rows into a static capacity (``lss_capacity``) and keep
            their number on the device: no host synchronization, so the call can be captured in a CUDA
            graph. Rows past the capacity (probability below 1e-14 per call) would be dropped.

    Returns:
        (∇X (N, K) or None, ∇W (M, K) or None).
    """
    _check_bwd_options(grad_quantizer, grad_granularity, lss_keep_ratio, row_weights is not None,
                       grad_x_backend)
    n, k = saved[0].shape
    m = saved[3].shape[1]
    if grad_y.shape != (n, m):
        raise ValueError(f"grad_y must have shape {(n, m)}, got {tuple(grad_y.shape)}")
    _check_matrix("grad_y", grad_y)
    _check_triton("int4_linear_bwd", grad_y)
    if noise is not None and grad_quantizer == "bit_split":
        dev = grad_y.device
        if noise.shape != grad_y.shape or noise.dtype != torch.float32 or noise.device != dev:
            raise ValueError(f"noise must be a float32 tensor of shape {tuple(grad_y.shape)} on {dev}")
        if noise.stride(1) != 1 and m > 1:
            raise ValueError("noise must have contiguous rows")
    return _bwd_impl(grad_y, saved, grad_quantizer, grad_granularity, lss_keep_ratio, generator, need_grad_x,
                     need_grad_w, x_dtype, w_dtype, rotate_back, noise, row_weights, grad_x_backend,
                     grad_weight_fp8, seed, sync_free)


def _check_bwd_options(grad_quantizer, grad_granularity, lss_keep_ratio, has_row_weights, grad_x_backend):
    if grad_quantizer not in ("bit_split", "rtn"):
        raise ValueError(f"grad_quantizer must be 'bit_split' or 'rtn', got {grad_quantizer!r}")
    if grad_granularity not in ("token", "tensor"):
        raise ValueError(f"grad_granularity must be 'token' or 'tensor', got {grad_granularity!r}")
    if lss_keep_ratio is not None and (grad_quantizer != "bit_split" or not 0 < lss_keep_ratio <= 1):
        raise ValueError(f"lss_keep_ratio must be None or in (0, 1] with grad_quantizer='bit_split', got "
                         f"{lss_keep_ratio!r}")
    if has_row_weights and grad_quantizer != "bit_split":
        raise ValueError("row_weights sample the bit-split halves: grad_quantizer must be 'bit_split'")
    if grad_x_backend not in ("auto", "triton", "cublas", "fp8x2"):
        raise ValueError(f"grad_x_backend must be 'auto', 'triton', 'cublas' or 'fp8x2', got "
                         f"{grad_x_backend!r}")


def _bwd_impl(grad_y, saved, grad_quantizer, grad_granularity, lss_keep_ratio, generator, need_grad_x,
              need_grad_w, x_dtype, w_dtype, rotate_back, noise, row_weights, grad_x_backend, grad_weight_fp8,
              seed, sync_free):
    """:func:`int4_linear_bwd` of checked arguments."""
    x_codes, x_scale, x_sumsq, w_codes_t, w_scale, block = saved
    x_codes_t = getattr(saved, "x_codes_t", None)
    n, k = x_codes.shape
    m = w_codes_t.shape[1]
    dev = grad_y.device
    f32 = torch.float32
    blk_saved = block if block not in (None, 1) else 1  # the int block of the kernels (1: none)
    sample = lss_keep_ratio is not None or row_weights is not None
    w_per_tensor = w_scale.numel() == 1
    if grad_x_backend == "auto":
        grad_x_backend = "triton"
    fp8_dw = False
    bit_split = grad_quantizer == "bit_split"
    per_token = grad_granularity == "token"
    # A per-channel weight scale lies on the inner dimension of the ∇X product: it is folded into the
    # gradient before quantizing (lowbit.int4.function.quantize_grad_for_input): ∇X = Q(∇Y ⊙ s_wᵀ)·q_w, an
    # exact integer product like the per-tensor one. With bit splitting per token the folded split comes from
    # the same kernel pass (the same noise); otherwise from a second quantization of the fp32 product.
    fold = need_grad_x and not w_per_tensor
    fold_in_split = fold and bit_split and per_token
    # (given noise and sampling weights, only the power-of-two rounding of grad_weight_fp8 draws)
    seeds = _SeedSource(seed, generator, dev, bit_split and (noise is None or grad_weight_fp8))
    if bit_split:
        dual = need_grad_x and grad_x_backend == "fp8x2" and w_per_tensor
        write_v = (need_grad_x and not dual and not fold) or (need_grad_w and not sample)
        # v only for the fp16 ∇W product (∇X takes the folded split): written as fp16, the operand itself
        v_fp16 = write_v and fold_in_split and not grad_weight_fp8
        seed_t, seed_i = seeds(0) if noise is None else (None, -1)
        bs = _bit_split(grad_y, per_token, seed_t, seed_i, noise, write_v, sample and need_grad_w, dual,
                        write_sumsq=sample and need_grad_w and row_weights is None,
                        col_scale=w_scale.reshape(-1) if fold_in_split else None,
                        v_dtype=torch.float16 if v_fp16 else torch.int8)
        g_codes, g_scale = bs.v, bs.scale_lo
    else:
        # One INT4 matrix: its products with INT4 codes are exact on FP8 tensor cores. ∇X on FP8 when the
        # weight scale is per tensor; ∇W on FP8 when every scale on its inner dimension (the tokens) is per
        # tensor and the forward saved the transposed X codes (then G is written transposed in the same pass).
        per_tensor = grad_granularity == "tensor"
        fp8_dx = need_grad_x and w_per_tensor and grad_x_backend != "cublas"
        fp8_dw = need_grad_w and per_tensor and x_codes_t is not None and x_scale.numel() == 1
        codes_f8 = fp8_dx and (fp8_dw or not need_grad_w)  # else int8: the gather of the ∇W path reads int8
        q = _hadamard_quantize(grad_y, 1, not per_tensor, None, _F8 if codes_f8 else torch.int8,
                               _F8 if fp8_dw else None, want_absmax=False)
        g_codes, g_scale = q.codes, q.scale

    grad_x = grad_w = None
    if need_grad_x:
        out_dtype = x_dtype if rotate_back else f32
        blk = blk_saved if rotate_back else 1
        gx_codes, gx_scale, wx_scale = g_codes, g_scale, w_scale
        if fold_in_split:
            gx_codes, _, gx_scale = bs.folded
            wx_scale = torch.ones(1, 1, dtype=f32, device=dev)
        elif fold:
            gx_codes, gx_scale = _fold_quantize(grad_y, w_scale, bit_split, per_token, noise, seeds,
                                                w_codes_t.dtype)
            wx_scale = torch.ones(1, 1, dtype=f32, device=dev)
        if fold and grad_x_backend == "fp8x2":
            grad_x_backend = "triton"  # (no FP8 halves of the folded split: the int8 product)
        grad_x = _grad_x_product(gx_codes, gx_scale, wx_scale, w_codes_t, bs if bit_split else None, blk,
                                 out_dtype, grad_x_backend)

    if need_grad_w and fp8_dw:
        # ∇W = s_g·s_x · (Gᵀ · q_x) · H: both operands K-major over the tokens, exact on FP8 tensor cores.
        s_gx = g_scale.reshape(1) * x_scale.reshape(1)
        one = torch.ones(1, device=dev)
        if rotate_back and blk_saved > 1:
            prod = _int4_mm(q.codes_t, x_codes_t, s_gx, one, f32)
            grad_w = _hadamard_rows(prod, blk_saved, None, None, w_dtype)
        else:
            grad_w = _int4_mm(q.codes_t, x_codes_t, s_gx, one, w_dtype if rotate_back else f32)
    elif need_grad_w:
        if grad_weight_fp8 and not sample:
            raise ValueError("grad_weight_fp8 needs leverage-score sampling (INT4 halves as the operand)")
        live = None  # with sync_free: the number of kept rows, on the device
        if sample and row_weights is None:
            capacity = lss_capacity(2 * n, lss_keep_ratio) if sync_free else None
            seed_t, seed_i = seeds(1)
            lss = _lss(bs.sumsq_hi, bs.sumsq_lo, bs.scale_hi, bs.scale_lo, x_sumsq.float().contiguous(),
                       x_scale.contiguous(), lss_keep_ratio, seed_t, seed_i,
                       capacity=capacity, sliced=capacity is None)  # (the gather reads the first count rows)
            src, half, factor, fmax, n_rows = lss.src, lss.half, lss.factor, lss.factor_max, lss.count
            g_src = bs.hl
            live = lss.kept if sync_free else None
        elif sample:
            x_scale_rows = x_scale.reshape(-1).expand(n)
            wts = row_weights.reshape(2 * n).float()
            kept = torch.nonzero(wts > 0).squeeze(1)  # one device sync: the number kept
            src, half = kept % n, torch.div(kept, n, rounding_mode="floor")
            s_half = torch.stack((bs.scale_hi.reshape(-1).expand(n), bs.scale_lo.reshape(-1).expand(n)))
            factor = (s_half[half, src] * wts[kept] * x_scale_rows[src]).contiguous()
            fmax = factor.amax().reshape(1) if factor.numel() else torch.zeros(1, device=dev)
            half = half.to(torch.int32)
            n_rows = src.numel()
            g_src = bs.hl
        else:
            src = half = None  # the rows in order: j -> token j
            factor = None  # (made with the normalizer below, in one launch)
            n_rows = n
            g_src = g_codes
        if grad_weight_fp8:
            # INT4 codes against codes times powers of two: exact on FP8 tensor cores (K-major operands).
            a_t, b_t, t_scale = _gather(g_src, x_codes, src, factor, n_rows, half=half, out_dtype=_F8,
                                        transposed=True, pad_to=16, pow2=(fmax, *seeds(2)),
                                        count=live)
            one = torch.ones(1, device=dev)
            prod = _int4_mm(a_t, b_t, one, t_scale, f32)
            norm = one
        else:
            # (with a device count, the entries past it are not factors: normalize by the kept maximum; the
            # gather divides each factor by the normalizer)
            if factor is None:  # the rows in order: factor_j = s_g,j · s_x,j
                factor, norm = _row_factors(g_scale.float(), x_scale.float(), n)
            elif live is None:
                norm = _row_factors(factor, None, factor.numel(), write_factor=False)[1]
            else:
                norm = _row_factors(fmax, None, 1, write_factor=False)[1]
            a_ready = g_src.dtype == torch.float16 and src is None  # the split wrote v in fp16
            a, b = _gather(g_src, x_codes, src, factor, n_rows, half=half, out_dtype=torch.float16,
                           count=live, norm=norm, write_a=not a_ready)
            if a_ready:
                a = g_src
            if a.shape[0] == 0:
                prod = torch.zeros(m, k, dtype=f32, device=dev)
            else:
                prod = _mm_fp32(a.t(), b)
        grad_w = _hadamard_rows(prod, blk_saved if rotate_back else 1, None, norm,
                                w_dtype if rotate_back else f32)
    return grad_x, grad_w


def _fold_quantize(grad_y, w_scale, bit_split, per_token, noise, seeds, w_codes_dtype):
    """(codes, scale) of Q(∇Y ⊙ s_wᵀ) for the ∇X product, where the bit split's own pass cannot fold s_w
    (a per-tensor gradient scale, or "rtn"): the fp32 product, then the same quantizer with the same noise
    stream (seeds(0): the same Philox counters, or the given ``noise``). Codes as the product wants them:
    v (int8) of a bit split, INT4 codes in the dtype of the saved W codes for "rtn"."""
    g2 = grad_y.float() * w_scale.reshape(1, -1)
    if bit_split:
        seed_t, seed_i = seeds(0) if noise is None else (None, -1)
        b2 = _bit_split(g2, per_token, seed_t, seed_i, noise, True, False, False, write_sumsq=False)
        return b2.v, b2.scale_lo
    q2 = _hadamard_quantize(g2, 1, per_token, None, _F8 if w_codes_dtype == _F8 else torch.int8, None,
                            want_absmax=False)
    return q2.codes, q2.scale


def _grad_x_product(codes, scale, w_scale, w_codes_t, bs, blk, out_dtype, backend):
    """∇X = (scale ⊙ (codes · q_w) · w_scale)·H of a per-tensor (or folded: 1) weight scale: an exact integer
    product. FP8 codes ("rtn") on FP8 tensor cores; int8 v (bit split) on the Triton int8 GEMM with the
    scales and the rotation in its epilogue ("cublas": torch._int_mm, then a rotation pass); "fp8x2": the
    split's FP8 halves as two FP8 products in one Triton kernel."""
    if backend == "fp8x2" and bs is not None and bs.hi_f8 is not None:
        return _scaled_mm_triton(bs.hi_f8, bs.lo_f8, _as_codes(w_codes_t, _F8), bs.scale_lo.reshape(-1),
                                 _flat(w_scale), blk, out_dtype, GEMM_CONFIG_DUAL)
    if codes.dtype == _F8:
        w_t8 = _as_codes(w_codes_t, _F8)
        if blk == 1:
            return _int4_mm(codes, w_t8, scale, w_scale, out_dtype)
        # the FP8 Triton GEMM with the rotation in its epilogue
        return _scaled_mm_triton(codes, None, w_t8, scale.reshape(-1), _flat(w_scale), blk, out_dtype)
    if backend == "cublas":
        return int8_scaled_mm(codes, _as_codes(w_codes_t, torch.int8), scale, w_scale, hadamard_block=blk,
                              out_dtype=out_dtype, backend="cublas")
    return _scaled_mm_triton(codes, None, _as_codes(w_codes_t, torch.int8), scale.reshape(-1), _flat(w_scale),
                             blk, out_dtype)


def _flat(scale: torch.Tensor) -> torch.Tensor:
    """A one-element or per-column fp32 scale flattened for the Triton GEMM."""
    return scale.reshape(-1)


# ---------------------------------------------------------------------------------------------- custom ops
# The forward and the backward as two torch.library custom ops: torch.compile traces a layer as one node
# each (no graph break), and with the sampled rows compacted into a static capacity (``sync_free``) and the
# randomness seeded from a device tensor, nothing syncs with the host: a compiled training step can run
# under CUDA graphs (``mode="reduce-overhead"``), which removes the launchers' Python time (milliseconds per
# layer on the H100 machine, more than the kernels themselves at GPT-350m shapes).

_OP_SAVED = 6  # x_codes, x_scale, x_code_sumsq, w_codes_t, w_scale, x_codes_t (empty when not saved)


def _op_layout(granularity: str, grad_quantizer: str, grad_granularity: str, grad_x_backend: str):
    """(save_x_codes_t, w_codes_t dtype): a per-tensor "rtn" gradient runs all three products on FP8 (X's
    codes also saved transposed, W's as FP8); the bit-split gradient's ∇X wants int8 W codes."""
    rtn = grad_quantizer == "rtn"
    save_x_t = rtn and grad_granularity == "tensor" and granularity == "tensor"
    wt_dtype = _F8 if rtn or grad_x_backend == "fp8x2" else torch.int8
    return save_x_t, wt_dtype


@torch.library.custom_op("lowbit::int4_linear_fwd", mutates_args=())
def _fwd_op(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: torch.Tensor,
            block_size: int, granularity: str, grad_quantizer: str, grad_granularity: str, keep_ratio: float,
            grad_x_backend: str, grad_weight_fp8: bool, out_dtype: torch.dtype,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    save_x_t, wt_dtype = _op_layout(granularity, grad_quantizer, grad_granularity, grad_x_backend)
    y, saved = int4_linear_fwd(x2d, weight, bias, block_size=block_size or None, granularity=granularity,
                               out_dtype=out_dtype, save_x_codes_t=save_x_t, w_codes_t_dtype=wt_dtype)
    x_t = saved.x_codes_t if saved.x_codes_t is not None else x2d.new_empty(0, dtype=_F8)
    return (y, *saved[:5], x_t)


@_fwd_op.register_fake
def _(x2d, weight, bias, seed, block_size, granularity, grad_quantizer, grad_granularity, keep_ratio,
      grad_x_backend, grad_weight_fp8, out_dtype):
    n, k = x2d.shape
    m = weight.shape[0]
    save_x_t, wt_dtype = _op_layout(granularity, grad_quantizer, grad_granularity, grad_x_backend)
    row = granularity == "row"
    f32 = torch.float32
    return (x2d.new_empty(n, m, dtype=out_dtype), x2d.new_empty(n, k, dtype=_F8),
            x2d.new_empty(n if row else 1, 1, dtype=f32), x2d.new_empty(n, dtype=f32),
            x2d.new_empty(k, m, dtype=wt_dtype), x2d.new_empty(m if row else 1, 1, dtype=f32),
            x2d.new_empty(k, n, dtype=_F8) if save_x_t else x2d.new_empty(0, dtype=_F8))


@torch.library.custom_op("lowbit::int4_linear_bwd", mutates_args=())
def _bwd_op(grad_y: torch.Tensor, x_codes: torch.Tensor, x_scale: torch.Tensor, x_sumsq: torch.Tensor,
            w_codes_t: torch.Tensor, w_scale: torch.Tensor, x_codes_t: torch.Tensor, seed: torch.Tensor,
            block_size: int, grad_quantizer: str, grad_granularity: str, keep_ratio: float,
            grad_x_backend: str, grad_weight_fp8: bool, need_x: bool, need_w: bool, x_dtype: torch.dtype,
            w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    saved = Int4LinearSaved(x_codes, x_scale, x_sumsq, w_codes_t, w_scale, block_size or None,
                            x_codes_t=x_codes_t if x_codes_t.numel() else None)
    gx, gw = int4_linear_bwd(
        grad_y, saved, grad_quantizer=grad_quantizer, grad_granularity=grad_granularity,
        lss_keep_ratio=keep_ratio or None, need_grad_x=need_x, need_grad_w=need_w, x_dtype=x_dtype,
        w_dtype=w_dtype, grad_x_backend=grad_x_backend, grad_weight_fp8=grad_weight_fp8, seed=seed,
        sync_free=True,
    )
    return (gx if gx is not None else grad_y.new_empty(0, dtype=x_dtype),
            gw if gw is not None else grad_y.new_empty(0, dtype=w_dtype))


@_bwd_op.register_fake
def _(grad_y, x_codes, x_scale, x_sumsq, w_codes_t, w_scale, x_codes_t, seed, block_size, grad_quantizer,
      grad_granularity, keep_ratio, grad_x_backend, grad_weight_fp8, need_x, need_w, x_dtype, w_dtype):
    n, k = x_codes.shape
    m = w_codes_t.shape[1]
    return (grad_y.new_empty((n, k) if need_x else (0,), dtype=x_dtype),
            grad_y.new_empty((m, k) if need_w else (0,), dtype=w_dtype))


def _fwd_setup(ctx, inputs, output):
    (x2d, weight, bias, seed, block_size, granularity, grad_quantizer, grad_granularity, keep_ratio,
     grad_x_backend, grad_weight_fp8, _) = inputs
    ctx.save_for_backward(*output[1:], seed)
    ctx.args = (block_size, grad_quantizer, grad_granularity, keep_ratio, grad_x_backend, grad_weight_fp8)
    ctx.dtypes = (x2d.dtype, weight.dtype, None if bias is None else bias.dtype)


def _fwd_backward(ctx, grad_y, *_):
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    grad_y = grad_y.contiguous()
    gx, gw = _bwd_op(grad_y, *ctx.saved_tensors, *ctx.args, need_x, need_w, x_dtype, w_dtype)
    grad_b = grad_y.float().sum(0).to(b_dtype) if need_b else None
    return (gx if need_x else None, gw if need_w else None, grad_b) + (None,) * 9


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ---------------------------------------------------------------------------------------------- eager path
# Outside torch.compile the same forward / backward run through a plain autograd Function: the custom ops'
# dispatch, schema checks and autograd wrapping cost about 0.1-0.3 ms of host time per layer and step, more
# than the launchers themselves once those were trimmed. Same calls, same results bit for bit.

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _eager_ok(*tensors) -> bool:
    """True outside tracing: not compiling, no dispatch mode (fake / meta tracing, FlopCounter...), no
    functorch transform, plain tensors only (a subclass keeps the custom op, which it may know)."""
    if torch.compiler.is_compiling() or _functorch_active():
        return False
    if _current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


def _current_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


class _Int4LinearFunction(torch.autograd.Function):
    """``_fwd_op`` with its registered autograd (``_fwd_setup`` / ``_fwd_backward``), eagerly."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, seed, block_size, granularity, grad_quantizer, grad_granularity,
                keep_ratio, grad_x_backend, grad_weight_fp8, out_dtype):
        save_x_t, wt_dtype = _op_layout(granularity, grad_quantizer, grad_granularity, grad_x_backend)
        y, saved = int4_linear_fwd(x2d, weight, bias, block_size=block_size or None, granularity=granularity,
                                   out_dtype=out_dtype, save_x_codes_t=save_x_t, w_codes_t_dtype=wt_dtype)
        ctx.save_for_backward(*saved[:5], saved.x_codes_t, seed)
        ctx.args = (block_size or None, grad_quantizer, grad_granularity, keep_ratio or None, grad_x_backend,
                    grad_weight_fp8)
        ctx.dtypes = (x2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        block, grad_quantizer, grad_granularity, keep_ratio, grad_x_backend, grad_weight_fp8 = ctx.args
        # (the options int4_linear_bwd checks, checked here as the custom op's backward does)
        _check_bwd_options(grad_quantizer, grad_granularity, keep_ratio, False, grad_x_backend)
        grad_y = grad_y.contiguous()
        gx = gw = None
        if need_x or need_w:
            x_codes, x_scale, x_sumsq, w_codes_t, w_scale, x_codes_t, seed = ctx.saved_tensors
            saved = Int4LinearSaved(x_codes, x_scale, x_sumsq, w_codes_t, w_scale, block, x_codes_t=x_codes_t)
            gx, gw = _bwd_impl(grad_y, saved, grad_quantizer, grad_granularity, keep_ratio, None, need_x,
                               need_w, x_dtype, w_dtype, True, None, None, grad_x_backend, grad_weight_fp8,
                               seed, True)
        grad_b = grad_y.float().sum(0).to(b_dtype) if need_b else None
        return (gx if need_x else None, gw if need_w else None, grad_b) + (None,) * 9


def int4_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_size: int | None = 32,
    granularity: str = "tensor",
    grad_quantizer: str = "bit_split",
    grad_granularity: str = "token",
    lss_keep_ratio: float | None = 0.5,
    generator: torch.Generator | None = None,
    grad_weight_fp8: bool = False,
    grad_x_backend: str = "auto",
    seed: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """INT4 fully quantized ``x · weightᵀ + bias`` on the Triton / FP8 path (differentiable: x, weight, bias).

    x: (..., K) bf16 / fp16 / fp32 on CUDA; weight (M, K); bias (M,) or None. Defaults: the "hq-lss" recipe
    of ``lowbit.int4`` (block 32, per-tensor absmax scales, bit splitting per token, keep ratio 0.5);
    ``grad_weight_fp8``, ``grad_x_backend`` as in :func:`int4_linear_bwd`. The backward's randomness comes
    from ``seed`` (one-element int64 tensor on x's device, in [0, 2^31 - 1)), else from one draw of
    ``generator``. The forward and backward are the custom ops ``lowbit::int4_linear_fwd`` / ``_bwd``:
    traceable by torch.compile, and free of host syncs (CUDA graphs). Eagerly (not compiling, no dispatch
    mode, plain tensors) the same pair runs through a plain autograd Function instead, which skips the custom
    ops' host-side layers; the results are the same bit for bit.
    Returns (..., M) in ``out_dtype`` (default x's dtype). x's rows: a multiple of 16 on CUDA.
    """
    k = weight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal weight's D_in ({k})")
    x2d = x if x.dim() == 2 else x.reshape(-1, k)  # (no view, no view node in the graph, for a 2-D x)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=x.device, dtype=torch.int64)
    elif not isinstance(seed, torch.Tensor) or seed.numel() != 1 or seed.dtype != torch.int64 or \
            seed.device != x.device:
        got = f"{getattr(seed, 'dtype', type(seed).__name__)} {tuple(getattr(seed, 'shape', ()))}"
        raise ValueError(f"seed must be a one-element int64 tensor on x's device ({x.device}), got {got} on "
                         f"{getattr(seed, 'device', None)}")
    args = (block_size or 0, granularity, grad_quantizer, grad_granularity, lss_keep_ratio or 0.0,
            grad_x_backend, grad_weight_fp8, out_dtype or x.dtype)
    if not _eager_ok(x2d, weight, bias, seed):
        y = _fwd_op(x2d, weight, bias, seed, *args)[0]
    else:
        if torch.is_grad_enabled() and (x2d.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            y = _Int4LinearFunction.apply(x2d, weight, bias, seed, *args)
        else:  # nothing to differentiate: the forward alone
            save_x_t, wt_dtype = _op_layout(granularity, grad_quantizer, grad_granularity, grad_x_backend)
            y = int4_linear_fwd(x2d, weight, bias, block_size=block_size or None, granularity=granularity,
                                out_dtype=out_dtype or x.dtype, save_x_codes_t=save_x_t,
                                w_codes_t_dtype=wt_dtype)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
