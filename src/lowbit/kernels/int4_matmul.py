"""The products of INT4 training on tensor cores, with the dequantization scales in the epilogue.

Contracts (a: (M, K), b: (N, K), both K-contiguous, holding integer codes):

``int4_mm(a, b, scale_a, scale_b)``
    out = (a · bᵀ) ⊙ scale_a ⊙ scale_b, a and b FP8 E4M3 holding INT4 codes. ``torch._scaled_mm`` (cuBLAS):
    every product of two codes is at most 49 in magnitude and the fp32 accumulator is exact below 2^24, so
    a · bᵀ is exact for K <= 2^24 / 49 (342,000); the result is that exact integer times the scales, rounded
    once to the output dtype. Scales: (M, 1) per row / (1, N) per column, or one element per tensor.
``int8_scaled_mm(a, b, row_scale, col_scale, hadamard_block)``
    out = ((a · bᵀ) ⊙ row_scale ⊙ col_scale) · BlockDiag(H_b) in fp32, rounded once; a, b int8 (e.g. the
    bit-split v = 14·hi + lo in [-105, 105] against INT4 codes: |a·bᵀ| <= 735·K, exact in the int32
    accumulator and in fp32 below 2^24, i.e. K < 22,800). A Triton GEMM whose epilogue applies the scales and
    the rotation back (tl.dot of the fp32 tile, split into two exact-enough bf16 pieces, with the ±1 block
    sign matrix): ∇X = ∇Y·W̃·H in one kernel, no int32 round trip through memory. ``backend="cublas"``
    runs ``torch._int_mm`` and then ``hadamard_rows`` (an int32 round trip) instead.

Why int8 for the bit-split gradient: v = 14·hi + lo needs 8 bits, which E4M3 does not hold exactly (its
significand has 4 bits), so on FP8 tensor cores the gradient costs two exact INT4 products (hi and lo) or
one lossy one; one INT8 product does it exactly at 1.2-1.3x the bf16 rate (FACTS.md), two FP8 products at
about 1.8 / 2 = 0.9x. docs/kernels-int4.md has the measurements on an H100.
"""

from __future__ import annotations

import math

import torch

from .hadamard_quant import (
    HAS_TRITON,
    _check_block,
    _check_triton,
    _rotate,
    _sign_tile,
    _store_cast,
    hadamard_rows,
    interpreting,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["GEMM_CONFIG", "GEMM_CONFIG_DUAL", "GEMM_CONFIG_F16", "bit_split_fp8_mm", "int4_mm",
           "int4_mm_reference", "int8_scaled_mm"]

#: Default tile configuration of the Triton int8 GEMM (BLOCK_N must stay 128 when rotating).
#: Measured best of five on an H100 (docs/kernels-int4.md): 256 × 128 × 128 tiles, 8 warps, 3 stages.
GEMM_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
#: int8 a against fp16 / bf16 b (a converted on chip): 2-byte b tiles, so BLOCK_K 64 keeps 4 stages in
#: shared memory ((128·64 + 128·64·2) B = 24 KB per stage). Not yet measured: the bench sweeps it.
GEMM_CONFIG_F16 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                   "num_stages": 4}
#: Two FP8 products (hi, lo) sharing the b tile: three 16 KB tiles per stage at 128 × 128 × 128.
GEMM_CONFIG_DUAL = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
                    "num_stages": 3}

_F8 = torch.float8_e4m3fn


def _as_row_scale(scale: torch.Tensor, n: int, name: str, device) -> torch.Tensor:
    """(n,) fp32 from a per-row (n,) / (n, 1) / (1, n) scale or a one-element per-tensor scale."""
    s = _flat_scale(scale, n, name, device)
    return s.expand(n) if s.numel() == 1 else s


def _flat_scale(scale: torch.Tensor, n: int, name: str, device) -> torch.Tensor:
    """(1,) or (n,) fp32 from a one-element or a per-row (n,) / (n, 1) / (1, n) scale (checked)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(scale).__name__}")
    dev = torch.device(device)
    if scale.device != dev and not (scale.device.type == "cuda" == dev.type):
        raise ValueError(f"{name} must be on {device}, got {scale.device}")
    s = scale.detach().float().reshape(-1)
    if s.numel() == 1:
        return s
    if s.numel() != n:
        raise ValueError(f"{name} must have 1 or {n} elements, got shape {tuple(scale.shape)}")
    return s


def _scalar_scale(scale: torch.Tensor) -> torch.Tensor:
    """A one-element scale as the 0-dim fp32 tensor ``torch._scaled_mm`` takes (no copy when it is fp32)."""
    s = scale.reshape(()) if scale.dtype == torch.float32 else scale.float().reshape(())
    return s.detach() if s.requires_grad else s


def int4_mm_reference(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The math of :func:`int4_mm` in fp64 (exact product, scales, one rounding): the test oracle."""
    m, n = a.shape[0], b.shape[0]
    prod = a.double() @ b.double().t()
    sa = _as_row_scale(scale_a, m, "scale_a", a.device).double()
    sb = _as_row_scale(scale_b, n, "scale_b", b.device).double()
    return (prod * sa[:, None] * sb[None, :]).to(out_dtype)


def int4_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """out = (a · bᵀ) ⊙ scale_a ⊙ scale_b on FP8 tensor cores (``torch._scaled_mm``), exact integer product.

    Args:
        a: (M, K) float8_e4m3fn holding integers (INT4 codes), rows contiguous.
        b: (N, K) float8_e4m3fn, rows contiguous (passed to cuBLAS as the column-major K × N operand).
        scale_a: per-row (M, 1) / (M,) or one-element fp32; scale_b: per-column (1, N) / (N,) or one element.
        out_dtype: bf16 (default), fp16 or fp32.

    Returns:
        (M, N) ``out_dtype``. M, N, K must be multiples of 16 on CUDA (cuBLAS FP8 requirement). On other
        devices the same exact product is computed in fp32 (float64 past K = 342,000), scales after.
    """
    for name, t in (("a", a), ("b", b)):
        if t.dtype != _F8 or t.ndim != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} must be a 2-D float8_e4m3fn tensor with contiguous rows, got {t.dtype} "
                             f"{tuple(t.shape)} strides {t.stride()}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must share K, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _int4_mm(a, b, scale_a, scale_b, out_dtype)


def _int4_mm(a, b, scale_a, scale_b, out_dtype):
    """:func:`int4_mm` of checked operands (scales: tensors on the operands' device)."""
    m, n = a.shape[0], b.shape[0]
    if a.device.type != "cuda":
        # Off CUDA (tests, CPU runs): the same math, the exact integer product in fp32, scales after.
        sa = _as_row_scale(scale_a, m, "scale_a", a.device)
        sb = _as_row_scale(scale_b, n, "scale_b", b.device)
        exact = torch.float32 if a.shape[1] <= 2**24 // 49 else torch.float64
        prod = (a.to(exact) @ b.to(exact).t()).float()
        return (prod * sa[:, None] * sb[None, :]).to(out_dtype)
    per_tensor = scale_a.numel() == 1 and scale_b.numel() == 1
    if per_tensor:
        sa, sb = _scalar_scale(scale_a), _scalar_scale(scale_b)
    elif (scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.shape == (m, 1)
          and scale_b.shape == (1, n) and scale_a.is_contiguous() and scale_b.is_contiguous()
          and not (scale_a.requires_grad or scale_b.requires_grad)):
        sa, sb = scale_a, scale_b  # already the row-wise layout cuBLAS takes
    else:
        # cuBLAS row-wise scaling needs both vectors: a per-tensor one is broadcast.
        sa = _as_row_scale(scale_a, m, "scale_a", a.device).reshape(m, 1).contiguous()
        sb = _as_row_scale(scale_b, n, "scale_b", b.device).reshape(1, n).contiguous()
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


if HAS_TRITON:

    @triton.jit
    def _scaled_gemm_kernel(
        a_ptr, a2_ptr, b_ptr, out_ptr, rs_ptr, cs_ptr,
        M, N, K, stride_am, stride_bn, stride_om, stride_cs, stride_rs,
        inv_sqrt_b, a_weight,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        HB: tl.constexpr,
        ROTATE: tl.constexpr, NSPLIT: tl.constexpr, DOT_F32: tl.constexpr, INT_ACC: tl.constexpr,
        EVEN_K: tl.constexpr, A_CAST: tl.constexpr, DUAL: tl.constexpr,
    ):
        """out[m, n] = rotate_n(Σ_k a[m, k] b[n, k]) · rs[m · stride_rs] · cs[n · stride_cs]; grouped tile
        order.

        A_CAST: a (int8) is converted to b's dtype (fp16 / bf16) on chip, exactly (|a| <= 127).
        DUAL: the sum is a_weight · (a · bᵀ) + a2 · bᵀ, two accumulators sharing each b tile (FP8 hi, lo).
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % group) % size_m)
        pid_n = (pid % group) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Clamp the row indices instead of masking the loads: out-of-range rows are dropped at the store.
        rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
        a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
        a2_ptrs = a2_ptr + rm[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_k[:, None]
        if INT_ACC:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0)
                b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0)
            if INT_ACC:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            elif A_CAST:
                if DOT_F32:  # the interpreter: the same exact values in fp32
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a.to(b.dtype), b, acc)
            else:
                acc = tl.dot(a, b, acc)
            if DUAL:
                if EVEN_K:
                    a2 = tl.load(a2_ptrs)
                else:
                    a2 = tl.load(a2_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0)
                acc2 = tl.dot(a2, b, acc2)
                a2_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        y = acc.to(tl.float32)
        if DUAL:  # exact: both sums are integers below 2^24 / 15
            y = y * a_weight + acc2
        if ROTATE:
            y = _rotate(y, _sign_tile(BLOCK_N, HB), NSPLIT, DOT_F32) * inv_sqrt_b
        rs = tl.load(rs_ptr + offs_m * stride_rs, mask=offs_m < M, other=0.0)
        cs = tl.load(cs_ptr + offs_n * stride_cs, mask=offs_n < N, other=0.0)
        y = y * rs[:, None] * cs[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        _store_cast(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], y, mask)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    *,
    hadamard_block: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "triton",
    config: dict | None = None,
) -> torch.Tensor:
    """out = ((a · bᵀ) ⊙ row_scale ⊙ col_scale) · BlockDiag(H_b), exact int32 product, one rounding.

    Args:
        a: (M, K) int8 (or FP8 E4M3 codes with ``backend="triton"``), rows contiguous.
        b: (N, K) same dtype as a, rows contiguous (K-major: the layout both operands need); or, with int8
            ``a`` and ``backend="triton"``, fp16 / bf16 (a is converted on chip, exactly; fp32
            accumulation: the product is then the fp32 GEMM of those operands, not an exact integer).
        row_scale: (M,) / (M, 1) or one element, fp32. col_scale: (N,) / (1, N) or one element; with
            ``hadamard_block`` it must be one element (a per-column scale does not commute with the
            rotation along N).
        hadamard_block: b, a power of two <= 128 dividing N, to rotate the result along N; None: no rotation.
        out_dtype: bf16 (default), fp16 or fp32.
        backend: "triton" (fused epilogue) or "cublas" (``torch._int_mm``, then :func:`hadamard_rows`).
        config: Triton tile configuration overriding ``GEMM_CONFIG`` (``GEMM_CONFIG_F16`` for a 2-byte b)
            keys.

    Returns:
        (M, N) ``out_dtype``, within a few fp32 ulps of the exact result before its final rounding.
    """
    mixed = a.dtype == torch.int8 and b.dtype in (torch.float16, torch.bfloat16)
    if a.dtype not in (torch.int8, _F8) or (a.dtype != b.dtype and not mixed):
        raise TypeError(f"a and b must both be int8 (or float8_e4m3fn), or int8 and fp16 / bf16, got "
                        f"{a.dtype} and {b.dtype}")
    if mixed and backend != "triton":
        raise TypeError("an fp16 / bf16 b needs backend='triton'")
    return _scaled_mm_launch(a, None, b, row_scale, col_scale, hadamard_block=hadamard_block,
                             out_dtype=out_dtype, backend=backend, config=config)


def bit_split_fp8_mm(
    hi: torch.Tensor,
    lo: torch.Tensor,
    b: torch.Tensor,
    scale_lo: torch.Tensor,
    col_scale: torch.Tensor,
    *,
    hadamard_block: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
) -> torch.Tensor:
    """out = (((14·hi + lo) · bᵀ) ⊙ scale_lo ⊙ col_scale) · BlockDiag(H_b): the bit-split product as two
    FP8 products in one Triton kernel (two accumulators sharing each b tile), exact.

    The alternative to one int8 product of v = 14·hi + lo (:func:`int8_scaled_mm`): twice the FLOPs at the
    FP8 rate. hi, lo: (M, K) FP8 E4M3 INT4 halves (``bit_split_quantize(write_fp8=True)``); b: (N, K) FP8
    E4M3 codes; scales and rotation as :func:`int8_scaled_mm`. K < 22,800 keeps 14·|hi·bᵀ| + |lo·bᵀ| below
    2^24.
    """
    if hi.dtype != _F8 or lo.dtype != _F8 or b.dtype != _F8:
        raise TypeError(f"hi, lo and b must be float8_e4m3fn, got {hi.dtype}, {lo.dtype}, {b.dtype}")
    if hi.shape != lo.shape or hi.stride() != lo.stride():
        raise ValueError(f"hi and lo must have the same shape and strides, got {tuple(hi.shape)}, "
                         f"{tuple(lo.shape)}")
    cfg = {**GEMM_CONFIG_DUAL, **(config or {})}
    return _scaled_mm_launch(hi, lo, b, scale_lo, col_scale, hadamard_block=hadamard_block,
                             out_dtype=out_dtype, backend="triton", config=cfg)


def _scaled_mm_launch(a, a2, b, row_scale, col_scale, *, hadamard_block, out_dtype, backend, config):
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a (M, K) and b (N, K) must be 2-D with the same K, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have contiguous rows (K-major), got strides {t.stride()}")
    m, k = a.shape
    n = b.shape[0]
    blk = _check_block(hadamard_block, n)
    rs = _flat_scale(row_scale, m, "row_scale", a.device)
    if blk > 1 and col_scale.numel() != 1:
        raise ValueError("with hadamard_block, col_scale must be one element (per tensor)")
    cs = col_scale.detach().float().reshape(-1).contiguous()
    if cs.numel() not in (1, n):
        raise ValueError(f"col_scale must have 1 or {n} elements, got {cs.numel()}")
    if backend == "cublas":
        if a.dtype != torch.int8:
            raise TypeError("backend='cublas' multiplies int8 operands (torch._int_mm)")
        rs = rs.expand(m).contiguous()
        acc = torch._int_mm(a, b.t())
        if cs.numel() == 1:
            return hadamard_rows(acc, blk, row_scale=rs, scale=cs, out_dtype=out_dtype)
        return (acc.float() * rs[:, None] * cs[None, :]).to(out_dtype)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'cublas', got {backend!r}")
    _check_triton("int8_scaled_mm", a)
    # (a per-tensor row scale is read with stride 0: no (M,) copy)
    rs = rs.contiguous()
    return _scaled_mm_triton(a, a2, b, rs, cs, blk, out_dtype, config)


#: Launch plans of _scaled_gemm_kernel by shapes, dtypes, rotation and configuration (Python values only).
_MM_PLANS: dict = {}


def _mm_plan(m, n, k, a_dtype, b_dtype, blk, config, dev_type):
    key = (m, n, k, a_dtype, b_dtype, blk, None if config is None else tuple(sorted(config.items())),
           dev_type, tuple(GEMM_CONFIG.values()), tuple(GEMM_CONFIG_F16.values()))
    plan = _MM_PLANS.get(key)
    if plan is not None:
        return plan
    mixed = a_dtype != b_dtype
    cfg = {**(GEMM_CONFIG_F16 if mixed else GEMM_CONFIG), **(config or {})}
    if interpreting():
        cfg.update(num_stages=1)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    while bk > 16 and k % bk:  # an unmasked K loop where K allows it (FP8 tiles cannot be masked)
        bk //= 2
    if k % bk and a_dtype != torch.int8:
        raise ValueError(f"FP8 / fp16 operands need K ({k}) to be a multiple of 16")
    if blk > 1:
        bn = max(blk, 16) if n < 128 else 128
        if n % bn:
            raise ValueError(f"with hadamard_block, N ({n}) must be a multiple of {bn}")
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    meta = dict(
        inv_sqrt_b=1.0 / math.sqrt(blk), a_weight=14.0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], HB=max(blk, 1),
        ROTATE=blk > 1, NSPLIT=2, DOT_F32=interpreting(), INT_ACC=a_dtype == torch.int8 and not mixed,
        EVEN_K=k % bk == 0, A_CAST=mixed,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **({"enable_fp_fusion": False} if dev_type == "cuda" else {}),
    )
    plan = (grid, meta)
    if len(_MM_PLANS) >= 256:
        _MM_PLANS.clear()
    _MM_PLANS[key] = plan
    return plan


def _scaled_mm_triton(a, a2, b, rs, cs, blk, out_dtype, config=None):
    """The Triton GEMM of checked operands: rs (M,) or (1,) (per tensor) and cs (N,) or (1,), contiguous fp32
    on a's device; blk an int block (1: no rotation)."""
    m, k = a.shape
    n = b.shape[0]
    grid, meta = _mm_plan(m, n, k, a.dtype, b.dtype, blk, config, a.device.type)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    _scaled_gemm_kernel[grid](
        a, a2 if a2 is not None else a, b, out, rs, cs,
        m, n, k, a.stride(0), b.stride(0), out.stride(0), 0 if cs.numel() == 1 else 1,
        0 if rs.numel() == 1 else 1, DUAL=a2 is not None, **meta,
    )
    return out
