"""Fused quantizers of INT4 training (Xi et al. 2023): Hadamard quantizer, bit splitting, LSS compaction.

Each launcher is one pass (two for a per-tensor absmax) over a bf16 / fp16 / fp32 row-major matrix that
writes the GEMM operand directly. Contracts (x of shape (R, C), b the Hadamard block, H = BlockDiag(H_b)):

``hadamard_quantize(x, b, granularity)``
    codes = clamp(round(x̂ / s), -7, 7),  x̂ = x · H in fp32,  s = absmax(x̂) / 7 per row ("row") or per
    tensor ("tensor"), or a given scale ``scale``; it equals
    ``quantize(hadamard_transform(x.float(), b), 4, granularity="token" | "tensor")`` (or
    ``quantize_with_scale``), which is ``lowbit.int4.function.hq_quantize``; ``round_rotated=True`` rounds
    x̂ to x's dtype first, as ``quantize(hadamard_transform(x, b), ...)`` does.
    Codes are written as FP8 E4M3 (every integer in [-7, 7] is exact in E4M3) or int8, optionally also
    transposed ((C, R), the K-major layout a product over R needs). FP8 codes are stored as their E4M3
    bytes, built by integer operations: on the H100 (triton 3.6) Triton's fp32 -> fp8 conversion wrote
    wrong bytes into transposed FP8 tiles (fp32 input without rotation, bf16 input with rotation).
``bit_split_quantize(g)``
    the halves of ``lowbit.quant.bit_split(g)``: hi = round(g / s_hi), lo = floor((g - hi·s_hi) / s_lo + u),
    written as v = 14·hi + lo (int8, |v| <= 105: g = v·s_lo up to the lo rounding, one INT8 operand) and/or
    packed (hi << 4 | lo & 15, int8) and/or two FP8 operands.
``gather_scaled_rows(...)``
    the compacted operands of the sampled ∇W product: kept rows of the INT4 codes (bf16, exact) and of the
    saved activation codes times a per-row factor (the 1/p of leverage-score sampling fused in).
``hadamard_rows(x, b)``
    y = (x · H) · row_scale · tensor_scale in fp32, written in the output dtype: the rotation back of a
    product whose inner dimension was rotated.

The rotation is a ``tl.dot`` of the (rows × BC) tile with the BC × BC sign matrix BlockDiag(√b·H_b) held on
chip, then one multiplication by fp32(1/√b), as the butterflies of ``hadamard_transform`` end. For bf16 /
fp16 input the products are exact (entries ±1) and the fp32 sums equal the butterfly's whenever they are
exact (the inputs' exponents span less than 16 binades, the usual case); fp32 input is split exactly into
three bf16 pieces. Where a sum does round, the two paths can differ by an ulp, which flips a code only when
x̂ / s lies within a few ulps of a .5 boundary (tests/kernels/test_hadamard_quant.py bounds this).

Arithmetic that decides codes follows ``lowbit.quant`` exactly: divisions correctly rounded, round half to
even, no FMA contraction (the launch passes ``enable_fp_fusion=False``). A division by a row's scale s is
x · (1/s) plus two FMA corrections (``_div_by``: the correctly rounded quotient, without the MUFU
reciprocal of ``div_rn`` per element) wherever that is proven exact (normal scales and quotients, checked
once per program); elsewhere ``div_rn``. Integer codes leave fp32 by adding 1.5·2^23 and reading the low
bits, not through conversion instructions (quarter rate on Hopper). On the CPU the
kernels run under ``TRITON_INTERPRET=1`` (tests, small shapes).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from lowbit.quant import is_power_of_two, true_div

try:
    import triton
    import triton.language as tl
    import triton.language.random as tlr
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None
    tlr = None
try:  # libdevice's directed roundings (triton >= 3.0 on CUDA); absent: the kernels round in software
    from triton.language.extra import libdevice as _libdevice
except ImportError:  # pragma: no cover - depends on the Triton build
    _libdevice = None

__all__ = [
    "HAS_TRITON",
    "LO_RATIO",
    "QMAX",
    "BitSplitCodes",
    "HadamardQuantized",
    "LssSample",
    "bit_split_quantize",
    "gather_scaled_rows",
    "hadamard_quantize",
    "hadamard_rows",
    "interpreting",
    "leverage_sample_compact",
    "lss_capacity",
    "row_absmax",
    "unpack_hi_lo",
]

HAS_TRITON = triton is not None
QMAX = 7  # INT4 symmetric codes lie in [-7, 7]
LO_RATIO = 14  # bit splitting: s_lo = s_hi / 14 (lowbit.quant.gradient)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CODE_DTYPES = (torch.float8_e4m3fn, torch.int8)

# Kernel modes of _hq_kernel.
_STATS, _ROW, _GIVEN, _TRANSFORM = 0, 1, 2, 3
# How x̂ is rounded before it is quantized (hadamard_transform returns x's dtype).
_ROUND_NONE, _ROUND_BF16, _ROUND_FP16 = 0, 1, 2


# Triton decides at decoration time whether a kernel is compiled or interpreted: remember what this module's
# kernels are (a test may import a private copy with TRITON_INTERPRET=1 and unset it afterwards).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when this module's kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
    when the module was imported)."""
    return _INTERPRETED


def _check_triton(name: str, *tensors: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs Triton: pip install 'lowbit[triton]'")
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{name} runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1); got one on {t.device}"
            )


_NO_FMA: dict = {"enable_fp_fusion": False}
_NO_OPTIONS: dict = {}


def _hw_round_down() -> bool:
    """Whether the kernels may call libdevice's round-toward-minus-infinity addition (compiled kernels with
    libdevice; the interpreter has no extern functions)."""
    return _libdevice is not None and not interpreting()


def _launch_options(device: torch.device) -> dict:
    # No FMA contraction: the reference rounds every product and every sum. (Shared dicts, only unpacked.)
    return _NO_OPTIONS if device.type != "cuda" else _NO_FMA


def _cdiv(a: int, b: int) -> int:
    # (plain arithmetic: triton.cdiv is a constexpr function in recent Triton, microseconds per host call)
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return n if n <= 1 else 1 << (n - 1).bit_length()  # (as triton.next_power_of_2: 0 -> 0)


def _rotation_width(block: int, n_cols: int) -> int:
    """Columns per rotation tile: a multiple of the block, at least 16 (tl.dot), dividing n_cols."""
    width = max(block, 16)
    if n_cols % width:
        raise ValueError(
            f"the rotated dimension ({n_cols}) must be a multiple of max(block_size, 16) = {width} for the "
            "Triton kernels"
        )
    return width


def _check_block(block_size: int | None, n_cols: int) -> int:
    if block_size is None or block_size == 1:
        return 1
    if not is_power_of_two(block_size) or block_size > 128:
        raise ValueError(f"block_size must be None or a power of two <= 128, got {block_size!r}")
    if n_cols % block_size:
        raise ValueError(f"the last dim ({n_cols}) must be a multiple of block_size ({block_size})")
    return block_size


def _round_mode(dtype: torch.dtype) -> int:
    return {torch.bfloat16: _ROUND_BF16, torch.float16: _ROUND_FP16}.get(dtype, _ROUND_NONE)


def _n_split(dtype: torch.dtype) -> int:
    # bf16 / fp16 tiles go into the dot as they are; anything wider is split into exact bf16 pieces.
    return 1 if dtype in (torch.bfloat16, torch.float16) else 3


if HAS_TRITON:

    @triton.jit
    def _rne_bf16(x):
        """fp32 -> bf16, round to nearest even by bits (the interpreter truncates in ``.to``)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _store_cast(ptrs, value, mask):
        """Store fp32 ``value`` in the pointer's dtype, rounding to nearest even."""
        if ptrs.dtype.element_ty == tl.bfloat16:
            tl.store(ptrs, _rne_bf16(value), mask=mask)
        else:
            tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_codes(ptrs, q, mask):
        """Store integer codes q (fp32 holding integers, |q| <= 15) in the pointer's dtype.

        A uint8 pointer is an FP8 E4M3 tensor viewed as bytes: it gets the E4M3 bit pattern, built from q's
        fp32 bits by integer operations (sign; exponent rebiased 127 -> 7; the top three mantissa bits, which
        hold every integer up to 15 exactly; 0 for ±0). This sidesteps the fp32 -> fp8 conversion, which
        wrote wrong bytes on the H100 (triton 3.6) when the tile was stored transposed (module docstring).
        """
        if ptrs.dtype.element_ty == tl.uint8:
            b = q.to(tl.int32, bitcast=True)
            # (exponent << 3 | top three mantissa bits) of |q|, rebiased by (127 - 7) << 3, and the sign
            bits = (((b & 0x7FFFFFFF) >> 20) - 0x3C0) | ((b >> 24) & 0x80)
            bits = tl.where(q == 0.0, 0, bits)
            tl.store(ptrs, bits.to(tl.uint8), mask=mask)
        elif ptrs.dtype.element_ty == tl.int8:
            tl.store(ptrs, _small_int(q).to(tl.int8), mask=mask)
        else:
            tl.store(ptrs, q.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _small_int(q):
        """int32 of an fp32 q holding an integer, |q| < 2^22, without a conversion instruction (those issue
        at a quarter of the FMA rate): q + 1.5·2^23 is exact and keeps q in its low mantissa bits."""
        return (q + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000

    @triton.jit
    def _floor_small(x):
        """floor(x) for |x| < 2^22 on the FMA pipe: round to nearest by adding and subtracting 1.5·2^23,
        then one down where that went up."""
        r = (x + 12582912.0) - 12582912.0
        return tl.where(r > x, r - 1.0, r)

    @triton.jit
    def _div_by(a, b, inv_b, FAST: tl.constexpr):
        """a / b correctly rounded (``div_rn``'s result). FAST: from inv_b = div_rn(1, b), q = a·inv_b and
        two Markstein corrections q += (a - q·b)·inv_b, each two FMAs (the remainder a - q·b is exact once q
        is faithful, and the last step of a faithful q rounds correctly: Markstein 1990). Valid when b,
        1/b and every nonzero quotient are normal numbers and no quotient overflows: the caller checks
        that per program and passes FAST only then. It takes no MUFU reciprocal per element."""
        if FAST:
            q = a * inv_b
            q = tl.fma(tl.fma(-q, b, a), inv_b, q)
            return tl.fma(tl.fma(-q, b, a), inv_b, q)
        else:
            return tl.math.div_rn(a, b)

    @triton.jit
    def _round_to_input(y, ROUND: tl.constexpr):
        """fp32 y rounded to the input dtype and back (hadamard_transform returns x's dtype)."""
        if ROUND == 1:
            return _rne_bf16(y).to(tl.float32)
        elif ROUND == 2:
            return y.to(tl.float16).to(tl.float32)
        else:
            return y

    @triton.jit
    def _rint7(v):
        """clamp(round(v), -7, 7) with round half to even (torch.round), for any finite v.

        Clamping to ±8 first changes nothing after the final clamp; then adding and subtracting 1.5·2^23
        rounds to an integer in IEEE fp32 (round to nearest even), exact for |v| < 2^22.
        """
        r = (tl.minimum(tl.maximum(v, -8.0), 8.0) + 12582912.0) - 12582912.0
        return tl.minimum(tl.maximum(r, -7.0), 7.0)

    @triton.jit
    def _sign_tile(W: tl.constexpr, B: tl.constexpr):
        """BlockDiag(√B·H_B, ...) of shape (W, W) in fp32, made in registers: entry (i, j) is 0 across
        blocks, else (-1)^popcount((i mod B) & (j mod B)) (Sylvester's order, as lowbit.quant's).
        No table in memory: nothing to cache per device, nothing allocated inside a CUDA graph."""
        idx = tl.arange(0, W)
        i = idx[:, None]
        j = idx[None, :]
        p = (i % B) & (j % B)  # < 128: the parity of 7 bits by folding
        p = p ^ (p >> 4)
        p = p ^ (p >> 2)
        p = p ^ (p >> 1)
        sign = 1.0 - 2.0 * (p & 1).to(tl.float32)
        return tl.where((i // B) == (j // B), sign, 0.0)

    @triton.jit
    def _rotate(xr, s, NSPLIT: tl.constexpr, DOT_F32: tl.constexpr):
        """xr (rows, W) · BlockDiag(s, ..., s) with fp32 accumulation (s = an fp32 ±1 tile (RW, RW) of
        :func:`_sign_tile`, RW dividing W, used in the dtype of the dot's other operand: exact). With RW < W
        the tile is viewed as (rows·W/RW, RW) for the dot: a block-diagonal (W, W) tile would spend
        (W/RW - 1)/(W/RW) of its tensor-core work on zeros (the sums are the same: those terms are exact 0).

        NSPLIT == 1: xr (bf16 / fp16) goes into the dot as is. Else xr is taken in fp32 and split into
        NSPLIT bf16 pieces (x = p1 + p2 + ..., each residual exact in fp32), one dot each.
        DOT_F32: the dot runs on fp32 copies of the same pieces (CPU interpreter).
        """
        ROWS: tl.constexpr = xr.shape[0]
        W: tl.constexpr = xr.shape[1]
        RW: tl.constexpr = s.shape[0]
        if RW < W:
            xr = tl.reshape(xr, [ROWS * (W // RW), RW])
        if NSPLIT == 1:
            if DOT_F32:
                acc = tl.dot(xr.to(tl.float32), s, input_precision="ieee")
            else:
                acc = tl.dot(xr, s.to(xr.dtype))
        else:
            rest = xr.to(tl.float32)
            acc = tl.zeros(xr.shape, dtype=tl.float32)
            s16 = s.to(tl.bfloat16)
            for _ in tl.static_range(NSPLIT):
                piece = rest.to(tl.bfloat16)
                rest = rest - piece.to(tl.float32)
                if DOT_F32:
                    acc = tl.dot(piece.to(tl.float32), s, acc, input_precision="ieee")
                else:
                    acc = tl.dot(piece, s16, acc)
        if RW < W:
            acc = tl.reshape(acc, [ROWS, W])
        return acc

    @triton.jit
    def _transform(xr, s, inv_sqrt_b, ROTATE: tl.constexpr, NSPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                   ROUND: tl.constexpr):
        if ROTATE:
            y = _rotate(xr, s, NSPLIT, DOT_F32) * inv_sqrt_b
            return _round_to_input(y, ROUND)
        else:
            return xr.to(tl.float32)

    @triton.jit
    def _load_seed(seed_ptr, SEED_IDX: tl.constexpr):
        """The int64 Philox seed at seed_ptr; with SEED_IDX >= 0 the stream SEED_IDX derived from it,
        (seed + SEED_IDX · 1000003) mod (2^31 - 1) (floor modulo, as torch's %)."""
        seed = tl.load(seed_ptr)
        if SEED_IDX >= 0:
            seed = (seed + SEED_IDX * 1000003) % 2147483647
            seed = tl.where(seed < 0, seed + 2147483647, seed)
        return seed

    @triton.jit
    def _scale_of_max(vmax, QMAX_C: tl.constexpr):
        """A symmetric absmax scale: vmax / QMAX_C correctly rounded, 1 where that is not positive (as
        ``torch.where(s > 0, s, 1)`` after ``true_div``)."""
        scale = tl.math.div_rn(vmax, tl.full(vmax.shape, QMAX_C, tl.float32))
        return tl.where(scale > 0, scale, 1.0)

    @triton.jit
    def _hq_codes(x_rows, rows64, row_ok, cols0, c_begin, c_end, C, s, inv_sqrt_b, scale, out_ptr, out_t_ptr,
                  stride_or, stride_tc, BR: tl.constexpr, BC: tl.constexpr, ROTATE: tl.constexpr,
                  NSPLIT: tl.constexpr, DOT_F32: tl.constexpr, ROUND: tl.constexpr, WRITE_OUT: tl.constexpr,
                  WRITE_T: tl.constexpr, FAST: tl.constexpr):
        """The code pass of ``_hq_kernel`` (MODE 1 and 2): codes of x̂ / scale stored, row sums of codes²."""
        inv = tl.math.div_rn(tl.full([BR], 1.0, tl.float32), scale)
        ssq = tl.zeros([BR, BC], dtype=tl.float32)  # elementwise; summed across lanes once at the end
        for c0 in range(c_begin, c_end, BC):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < C)
            xr = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
            y = _transform(xr, s, inv_sqrt_b, ROTATE, NSPLIT, DOT_F32, ROUND)
            q = _div_by(y, scale[:, None], inv[:, None], FAST)
            if FAST:  # the scale is an absmax / 7 (correctly rounded): |q| <= 7·(1 + 2^-23), no clamp
                q = (q + 12582912.0) - 12582912.0
            else:
                q = _rint7(q)
            ssq += q * q
            if WRITE_OUT:
                _store_codes(out_ptr + rows64[:, None] * stride_or + cols[None, :], q, mask)
            if WRITE_T:
                t_ptrs = out_t_ptr + cols.to(tl.int64)[None, :] * stride_tc + rows64[:, None]
                _store_codes(t_ptrs, q, mask)
        return tl.sum(ssq, axis=1)

    @triton.jit
    def _hq_kernel(
        x_ptr, scale_in_ptr, rs_ptr,
        out_ptr, out_t_ptr, scale_out_ptr, absmax_ptr, sumsq_ptr, tmax_ptr,
        R, C, CHUNK, stride_xr, stride_or, stride_tc,
        inv_sqrt_b,
        BR: tl.constexpr, BC: tl.constexpr, HB: tl.constexpr, RW: tl.constexpr,
        ROTATE: tl.constexpr, NSPLIT: tl.constexpr, DOT_F32: tl.constexpr, ROUND: tl.constexpr,
        MODE: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_T: tl.constexpr, HAS_RS: tl.constexpr,
        SPLIT: tl.constexpr, QMAX_C: tl.constexpr, TMAX: tl.constexpr, HAS_SCALE: tl.constexpr,
        WRITE_ABS: tl.constexpr,
    ):
        """Program (i, j): rows [i·BR, (i+1)·BR), columns [j·CHUNK, (j+1)·CHUNK) in tiles of BC.

        MODE 0 (stats): absmax of each row of x̂ (atomic max over column chunks when SPLIT; written only with
            WRITE_ABS, as in MODE 1); with TMAX also
            the absmax of the whole tensor, atomically into tmax_ptr (which must start at zero).
        MODE 1 (row): per-row scale, then codes; one chunk holds the whole row.
        MODE 2 (given): codes with the scale at scale_in_ptr (Σ codes² atomically added when SPLIT); with
            TMAX the scale is that of the tensor absmax at tmax_ptr (``_scale_of_max``), and program (0, 0)
            writes it to scale_out_ptr.
        MODE 3 (transform): out = x̂ · rs[row] · scale (scale 1 without HAS_SCALE).
        """
        pid = tl.program_id(0)
        c_begin = tl.program_id(1) * CHUNK
        c_end = tl.minimum(c_begin + CHUNK, C)
        rows = pid * BR + tl.arange(0, BR)
        row_ok = rows < R
        rows64 = rows.to(tl.int64)
        cols0 = tl.arange(0, BC)
        if ROTATE:
            s = _sign_tile(RW, HB)
        else:
            s = None
        x_rows = x_ptr + rows64[:, None] * stride_xr

        if MODE == 0 or MODE == 1:
            # max |x̂| of each row. x̂ = round(acc · 1/√b) and both roundings are monotone, so the max of |acc|
            # is taken elementwise over the tiles and scaled and rounded once per row: the same number.
            amax_t = tl.zeros([BR, BC], dtype=tl.float32)
            for c0 in range(c_begin, c_end, BC):
                cols = c0 + cols0
                mask = row_ok[:, None] & (cols[None, :] < C)
                xr = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
                if ROTATE:
                    amax_t = tl.maximum(amax_t, tl.abs(_rotate(xr, s, NSPLIT, DOT_F32)))
                else:
                    amax_t = tl.maximum(amax_t, tl.abs(xr.to(tl.float32)))
            amax = tl.max(amax_t, axis=1)
            if ROTATE:
                amax = _round_to_input(amax * inv_sqrt_b, ROUND)
            if WRITE_ABS:
                if SPLIT:
                    tl.atomic_max(absmax_ptr + rows, amax, mask=row_ok)
                else:
                    tl.store(absmax_ptr + rows, amax, mask=row_ok)
            if MODE == 0 and TMAX:
                tl.atomic_max(tmax_ptr, tl.max(amax, axis=0))
            scale = _scale_of_max(amax, QMAX_C)
            if MODE == 1:
                tl.store(scale_out_ptr + rows, scale, mask=row_ok)
        elif MODE == 3 and not HAS_SCALE:
            scale = tl.full([BR], 1.0, tl.float32)
        elif MODE == 2 and TMAX:
            scale = _scale_of_max(tl.zeros([BR], dtype=tl.float32) + tl.load(tmax_ptr), QMAX_C)
            tl.store(scale_out_ptr + rows * 0, scale, mask=(rows + c_begin) == 0)  # program (0, 0)
        else:
            scale = tl.zeros([BR], dtype=tl.float32) + tl.load(scale_in_ptr)

        if MODE == 1 or MODE == 2:
            # A scale from an absmax (MODE 1, or MODE 2 with TMAX) bounds every |x̂ / scale| by 7: the FAST
            # division (``_div_by``) is exact there once the program's scales and their reciprocals are
            # normal (a subnormal quotient rounds to code 0 either way). A given scale keeps div_rn.
            fast = False
            if MODE == 1 or TMAX:
                fast = (tl.min(scale, axis=0) >= 2.350988701644575e-38) & (tl.max(scale, axis=0) <= 1e37)
            if fast:
                ssq = _hq_codes(x_rows, rows64, row_ok, cols0, c_begin, c_end, C, s, inv_sqrt_b, scale,
                                out_ptr, out_t_ptr, stride_or, stride_tc, BR, BC, ROTATE, NSPLIT, DOT_F32,
                                ROUND, WRITE_OUT, WRITE_T, True)
            else:
                ssq = _hq_codes(x_rows, rows64, row_ok, cols0, c_begin, c_end, C, s, inv_sqrt_b, scale,
                                out_ptr, out_t_ptr, stride_or, stride_tc, BR, BC, ROTATE, NSPLIT, DOT_F32,
                                ROUND, WRITE_OUT, WRITE_T, False)
            if SPLIT:
                tl.atomic_add(sumsq_ptr + rows, ssq, mask=row_ok)
            else:
                tl.store(sumsq_ptr + rows, ssq, mask=row_ok)

        if MODE == 3:
            if HAS_RS:
                rscale = tl.load(rs_ptr + rows, mask=row_ok, other=0.0) * scale
            else:
                rscale = scale
            for c0 in range(c_begin, c_end, BC):
                cols = c0 + cols0
                mask = row_ok[:, None] & (cols[None, :] < C)
                xr = tl.load(x_rows + cols[None, :], mask=mask, other=0)
                y = _transform(xr, s, inv_sqrt_b, ROTATE, NSPLIT, DOT_F32, 0)
                _store_cast(out_ptr + rows64[:, None] * stride_or + cols[None, :], y * rscale[:, None], mask)

    @triton.jit
    def _floor_magic(x, HW_RD: tl.constexpr):
        """MAGIC + floor(x) in fp32 (MAGIC = 1.5·2^23), exact for |x| < 2^22. HW_RD: one addition rounded
        toward -inf (libdevice ``add_rd``: FADD.FTZ.RM, so x must not be subnormal); else ``_floor_small``
        plus MAGIC (the interpreter has no libdevice)."""
        if HW_RD:
            return _libdevice.add_rd(x, tl.full(x.shape, 12582912.0, tl.float32))
        else:
            return _floor_small(x) + 12582912.0

    @triton.jit
    def _bit_split_tile(g, u, mask, offs, s_hi, s_lo, inv_hi, inv_lo,
                        v_ptr, hl_ptr, hi8_ptr, lo8_ptr,
                        WRITE_V: tl.constexpr, WRITE_HL: tl.constexpr, WRITE_F8: tl.constexpr,
                        FAST: tl.constexpr, HW_RD: tl.constexpr):
        """Split one fp32 tile g (zero where masked) with the noise u.

        Codes live as t = MAGIC + code (MAGIC = 1.5·2^23: the code sits in t's low mantissa bits, so its
        int32 is bits(t) - bits(MAGIC) and its float t - MAGIC, no conversion instruction). hi: with FAST
        every |g / s_hi| is at most 7·(1 + 2^-23) (s_hi is the row's absmax / 7, correctly rounded), so
        MAGIC + q rounds q to nearest even with no clamp; else ``_rint7``. lo: floor(q_lo + u) as
        ``_floor_magic``, clamped to [-7, 7] on t. Masked elements give 0 codes (g = 0, u < 1). Returns the
        tiles hi² and lo² (the caller sums them once per row, not per tile)."""
        q = _div_by(g, s_hi[:, None], inv_hi[:, None], FAST)
        if FAST:
            th = q + 12582912.0
            hi = th - 12582912.0
        else:
            hi = _rint7(q)
            th = hi + 12582912.0
        resid = g - hi * s_hi[:, None]
        # FADD.RM flushes subnormals (libdevice is compiled with FTZ): only under FAST, where q_lo + u is 0
        # or normal (nonzero quotients are normal, u is 0 or at least 2^-23).
        tlo = _floor_magic(_div_by(resid, s_lo[:, None], inv_lo[:, None], FAST) + u, FAST and HW_RD)
        tlo = tl.minimum(tl.maximum(tlo, 12582905.0), 12582919.0)
        lo = tlo - 12582912.0
        hi_i = th.to(tl.int32, bitcast=True) - 0x4B400000
        lo_i = tlo.to(tl.int32, bitcast=True) - 0x4B400000
        if WRITE_V:
            if v_ptr.dtype.element_ty == tl.int8:
                tl.store(v_ptr + offs, (hi_i * 14 + lo_i).to(tl.int8), mask=mask)
            else:  # fp16: the same integers, exact
                tl.store(v_ptr + offs, (hi * 14.0 + lo).to(v_ptr.dtype.element_ty), mask=mask)
        if WRITE_HL:
            tl.store(hl_ptr + offs, (hi_i * 16 + (lo_i & 15)).to(tl.int8), mask=mask)
        if WRITE_F8:
            tl.store(hi8_ptr + offs, hi.to(hi8_ptr.dtype.element_ty), mask=mask)
            tl.store(lo8_ptr + offs, lo.to(lo8_ptr.dtype.element_ty), mask=mask)
        return hi * hi, lo * lo

    @triton.jit
    def _bit_split_pass(g_rows, noise_rows, rows64, row_ok, C, s_hi, s_lo, s2_hi, s2_lo, seed,
                        v_ptr, hl_ptr, hi8_ptr, lo8_ptr, stride_or, cs_ptr, v2_ptr,
                        BR: tl.constexpr, BC: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_V: tl.constexpr,
                        WRITE_HL: tl.constexpr, WRITE_F8: tl.constexpr, FOLD: tl.constexpr,
                        FAST: tl.constexpr, HW_RD: tl.constexpr):
        """The code pass of ``_bit_split_kernel`` over the program's rows; returns row sums of hi², lo².
        Each tile of g is loaded once and feeds both splits (FOLD)."""
        Q: tl.constexpr = BC // 4
        one = tl.full([BR], 1.0, tl.float32)
        inv_hi = tl.math.div_rn(one, s_hi)
        inv_lo = tl.math.div_rn(one, s_lo)
        inv2_hi = tl.math.div_rn(one, s2_hi)
        inv2_lo = tl.math.div_rn(one, s2_lo)
        ssq_hi = tl.zeros([BR, Q], dtype=tl.float32)
        ssq_lo = tl.zeros([BR, Q], dtype=tl.float32)
        cq = tl.arange(0, Q)
        for c0 in range(0, C, BC):
            if HAS_NOISE:
                r0, r1, r2, r3 = 0, 0, 0, 0
            else:
                ctr = rows64[:, None] * ((C + 3) // 4) + (c0 // 4 + cq)[None, :]
                r0, r1, r2, r3 = tl.randint4x(seed, ctr.to(tl.uint32))
            for t in tl.static_range(4):
                if t == 0:
                    rnd = r0
                elif t == 1:
                    rnd = r1
                elif t == 2:
                    rnd = r2
                else:
                    rnd = r3
                cols = c0 + t * Q + cq
                mask = row_ok[:, None] & (cols[None, :] < C)
                g = tl.load(g_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_NOISE:
                    u = tl.load(noise_rows + cols[None, :], mask=mask, other=0.0)
                else:
                    # 23 random bits as the mantissa of a number in [1, 2), minus 1: u = k·2^-23 in [0, 1)
                    u = ((rnd >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
                offs = rows64[:, None] * stride_or + cols[None, :]
                h, lw = _bit_split_tile(g, u, mask, offs, s_hi, s_lo, inv_hi, inv_lo, v_ptr, hl_ptr, hi8_ptr,
                                        lo8_ptr, WRITE_V, WRITE_HL, WRITE_F8, FAST, HW_RD)
                ssq_hi += h
                ssq_lo += lw
                if FOLD:  # the same noise, g ⊙ cs (the fp32 product) with its own scales: only v2 is written
                    g2 = g * tl.load(cs_ptr + cols, mask=cols < C, other=0.0)[None, :]
                    _bit_split_tile(g2, u, mask, offs, s2_hi, s2_lo, inv2_hi, inv2_lo, v2_ptr, v2_ptr, v2_ptr,
                                    v2_ptr, True, False, False, FAST, HW_RD)
        return tl.sum(ssq_hi, axis=1), tl.sum(ssq_lo, axis=1)

    @triton.jit
    def _bit_split_kernel(
        g_ptr, noise_ptr, scale_in_ptr,
        v_ptr, hl_ptr, hi8_ptr, lo8_ptr, scale_out_ptr, ssq_hi_ptr, ssq_lo_ptr,
        R, C, stride_gr, stride_nr, stride_or, seed_ptr, scale_lo_ptr,
        cs_ptr, v2_ptr, scale2_hi_ptr, scale2_lo_ptr,
        BR: tl.constexpr, BC: tl.constexpr, GIVEN: tl.constexpr, HAS_NOISE: tl.constexpr,
        WRITE_V: tl.constexpr, WRITE_HL: tl.constexpr, WRITE_F8: tl.constexpr, SEED_IDX: tl.constexpr,
        WRITE_SSQ: tl.constexpr, FOLD: tl.constexpr, HW_RD: tl.constexpr,
    ):
        """BR whole rows per program. The noise of the lo rounding: one Philox call (tl.randint4x) per four
        elements, element (r, c0 + t·BC/4 + j) of a BC-column tile taking output t of counter
        r·ceil(C/4) + c0/4 + j. GIVEN (one scale per tensor): scale_in_ptr holds the tensor absmax, program 0
        writes s_hi and s_lo (one element each); else each row's s_hi and s_lo are written. The seed:
        ``_load_seed(seed_ptr, SEED_IDX)``. v is stored in v_ptr's dtype (int8, or fp16: exact). The row sums
        of hi² and lo² are written only with WRITE_SSQ. FOLD (per token only): also split g ⊙ cs (cs: one fp32
        factor per column) with its own row scales and the same noise, written as v2 (int8) and the scales
        scale2_hi / scale2_lo: the input-gradient operand with a per-channel weight scale folded in."""
        pid = tl.program_id(0)
        rows = pid * BR + tl.arange(0, BR)
        row_ok = rows < R
        rows64 = rows.to(tl.int64)
        g_rows = g_ptr + rows64[:, None] * stride_gr
        noise_rows = noise_ptr + rows64[:, None] * stride_nr
        # FAST division (``_div_by``) needs normal scales and normal nonzero quotients: every nonzero |g| at
        # least 2^-96 of its row's s_hi (|g| / s_lo >= 14·2^-96; a nonzero residual of hi != 0 is at least
        # 2^-25 of s_hi), s_hi in [2^-96, 2^96]. Checked once per program from the min nonzero |g|.
        amin = tl.full([BR], float("inf"), tl.float32)
        amin2 = tl.full([BR], float("inf"), tl.float32)
        if GIVEN:
            s_hi = _scale_of_max(tl.zeros([BR], dtype=tl.float32) + tl.load(scale_in_ptr), 7.0)
            tl.store(scale_out_ptr + rows * 0, s_hi, mask=rows == 0)
            amin = tl.zeros([BR], dtype=tl.float32)  # not tracked: the exact division
        else:
            # Elementwise running max / min over (BR, BC/4) tiles, reduced across lanes once at the end.
            Q: tl.constexpr = BC // 4
            cols0 = tl.arange(0, Q)
            amax_t = tl.zeros([BR, Q], dtype=tl.float32)
            amax2_t = tl.zeros([BR, Q], dtype=tl.float32)
            amin_t = tl.full([BR, Q], float("inf"), tl.float32)
            amin2_t = tl.full([BR, Q], float("inf"), tl.float32)
            for c0 in range(0, C, Q):
                cols = c0 + cols0
                mask = row_ok[:, None] & (cols[None, :] < C)
                ga = tl.abs(tl.load(g_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32))
                amax_t = tl.maximum(amax_t, ga)
                amin_t = tl.minimum(amin_t, tl.where(ga > 0, ga, float("inf")))
                if FOLD:
                    ga2 = ga * tl.abs(tl.load(cs_ptr + cols, mask=cols < C, other=0.0))[None, :]
                    amax2_t = tl.maximum(amax2_t, ga2)
                    amin2_t = tl.minimum(amin2_t, tl.where(ga2 > 0, ga2, float("inf")))
            amax = tl.max(amax_t, axis=1)
            amin = tl.min(amin_t, axis=1)
            amax2 = tl.max(amax2_t, axis=1)
            amin2 = tl.min(amin2_t, axis=1)
            s_hi = tl.math.div_rn(amax, tl.full([BR], 7.0, tl.float32))
            s_hi = tl.where(s_hi > 0, s_hi, 1.0)
            tl.store(scale_out_ptr + rows, s_hi, mask=row_ok)
        s2_hi = s_hi
        s2_lo = s_hi
        if FOLD:
            s2_hi = tl.math.div_rn(amax2, tl.full([BR], 7.0, tl.float32))
            s2_hi = tl.where(s2_hi > 0, s2_hi, 1.0)
            s2_lo = tl.math.div_rn(s2_hi, tl.full([BR], 14.0, tl.float32))
            tl.store(scale2_hi_ptr + rows, s2_hi, mask=row_ok)
            tl.store(scale2_lo_ptr + rows, s2_lo, mask=row_ok)
        s_lo = tl.math.div_rn(s_hi, tl.full([BR], 14.0, tl.float32))
        if GIVEN:
            tl.store(scale_lo_ptr + rows * 0, s_lo, mask=rows == 0)
        else:
            tl.store(scale_lo_ptr + rows, s_lo, mask=row_ok)
        seed = 0
        if not HAS_NOISE:
            seed = _load_seed(seed_ptr, SEED_IDX)
        tiny = 1.2621774483536189e-29  # 2^-96
        ok = (amin >= s_hi * tiny) & (s_hi >= tiny) & (s_hi <= 1.0 / tiny)
        if FOLD:
            ok = ok & (amin2 >= s2_hi * tiny) & (s2_hi >= tiny) & (s2_hi <= 1.0 / tiny)
        fast = tl.min(tl.where(row_ok, ok, True).to(tl.int32), axis=0) == 1
        if fast:
            ssq_hi, ssq_lo = _bit_split_pass(
                g_rows, noise_rows, rows64, row_ok, C, s_hi, s_lo, s2_hi, s2_lo, seed, v_ptr, hl_ptr, hi8_ptr,
                lo8_ptr, stride_or, cs_ptr, v2_ptr, BR, BC, HAS_NOISE, WRITE_V, WRITE_HL, WRITE_F8, FOLD,
                True, HW_RD)
        else:
            ssq_hi, ssq_lo = _bit_split_pass(
                g_rows, noise_rows, rows64, row_ok, C, s_hi, s_lo, s2_hi, s2_lo, seed, v_ptr, hl_ptr, hi8_ptr,
                lo8_ptr, stride_or, cs_ptr, v2_ptr, BR, BC, HAS_NOISE, WRITE_V, WRITE_HL, WRITE_F8, FOLD,
                False, HW_RD)
        if WRITE_SSQ:
            tl.store(ssq_hi_ptr + rows, ssq_hi, mask=row_ok)
            tl.store(ssq_lo_ptr + rows, ssq_lo, mask=row_ok)

    @triton.jit
    def _lss_score(j, mask, N, ssq_hi_ptr, ssq_lo_ptr, s_hi_ptr, s_lo_ptr, stride_s, xssq_ptr, sx_ptr,
                   stride_sx):
        """Stacked row j of [hi; lo]: (score ‖s_h·G_h row‖·‖s_x·q_x row‖, token m, half h, s_h·s_x)."""
        is_lo = j >= N
        m = tl.where(is_lo, j - N, j)
        ssq = tl.where(is_lo, tl.load(ssq_lo_ptr + m, mask=mask, other=0.0),
                       tl.load(ssq_hi_ptr + m, mask=mask, other=0.0))
        s_h = tl.where(is_lo, tl.load(s_lo_ptr + m * stride_s, mask=mask, other=0.0),
                       tl.load(s_hi_ptr + m * stride_s, mask=mask, other=0.0))
        sx = tl.load(sx_ptr + m * stride_sx, mask=mask, other=0.0)
        xssq = tl.load(xssq_ptr + m, mask=mask, other=0.0)
        score = (s_h * tl.sqrt_rn(ssq)) * (sx * tl.sqrt_rn(xssq))
        return tl.where(mask, score, 0.0), m, is_lo.to(tl.int32), s_h * sx

    @triton.jit
    def _lss_kernel(
        ssq_hi_ptr, ssq_lo_ptr, s_hi_ptr, s_lo_ptr, xssq_ptr, sx_ptr, seed_ptr,
        p_ptr, src_ptr, half_ptr, factor_ptr, count_ptr, fmax_ptr,
        N, k_keep, stride_s, stride_sx,
        BLOCK: tl.constexpr, ITERS: tl.constexpr, SEED_IDX: tl.constexpr,
    ):
        """One program: scores of the 2N stacked rows, p = min(1, c·score) with Σ p = k_keep, Bernoulli keep
        with u = tl.rand(seed, j), kept rows compacted in increasing j (token, half, s_h·s_x / p).

        c: bisection on log2(c) finds the clamped set {c·score >= 1}; then c = (k - #clamped) / Σ others, the
        closed form of ``lowbit.quant.leverage_score_probabilities`` (which sorts instead), in fp32.
        """
        n2 = 2 * N
        offs = tl.arange(0, BLOCK)
        total = tl.full([], 0.0, tl.float32)
        npos = tl.full([], 0.0, tl.float32)
        smin = tl.full([], float("inf"), tl.float32)
        for j0 in range(0, n2, BLOCK):
            j = j0 + offs
            mask = j < n2
            sc, m, h, f = _lss_score(j, mask, N, ssq_hi_ptr, ssq_lo_ptr, s_hi_ptr, s_lo_ptr, stride_s,
                                     xssq_ptr, sx_ptr, stride_sx)
            tl.store(p_ptr + j, sc, mask=mask)
            total += tl.sum(sc, axis=0)
            npos += tl.sum((sc > 0).to(tl.float32), axis=0)
            smin = tl.minimum(smin, tl.min(tl.where(sc > 0, sc, float("inf")), axis=0))
        tl.debug_barrier()  # the scores written above are read back by other threads of this program
        all_kept = npos <= k_keep
        # (literals under 2^-126 would be typed fp64 by Triton: keep them inside the fp32 normal range)
        lo = tl.log2(k_keep / tl.maximum(total, 1e-30))  # f(2^lo) <= k
        hi = -tl.log2(tl.minimum(smin, 3e38))  # f(2^hi) = npos >= k
        for _ in range(ITERS):
            mid = 0.5 * (lo + hi)
            c = tl.exp2(mid)
            f_mid = tl.full([], 0.0, tl.float32)
            for j0 in range(0, n2, BLOCK):
                j = j0 + offs
                sc = tl.load(p_ptr + j, mask=j < n2, other=0.0)
                f_mid += tl.sum(tl.minimum(c * sc, 1.0), axis=0)
            up = f_mid < k_keep
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid)
        c_hi = tl.exp2(hi)
        n_clamped = tl.full([], 0.0, tl.float32)
        rest = tl.full([], 0.0, tl.float32)
        for j0 in range(0, n2, BLOCK):
            j = j0 + offs
            sc = tl.load(p_ptr + j, mask=j < n2, other=0.0)
            clamped = (c_hi * sc >= 1.0) & (sc > 0)
            n_clamped += tl.sum(clamped.to(tl.float32), axis=0)
            rest += tl.sum(tl.where(clamped, 0.0, sc), axis=0)
        c = tl.where(rest > 0, tl.math.div_rn(k_keep - n_clamped, tl.where(rest > 0, rest, 1.0)), 0.0)
        seed = _load_seed(seed_ptr, SEED_IDX)
        count = tl.full([], 0, tl.int32)
        fmax = tl.full([], 0.0, tl.float32)
        for j0 in range(0, n2, BLOCK):
            j = j0 + offs
            mask = j < n2
            sc, m, h, f = _lss_score(j, mask, N, ssq_hi_ptr, ssq_lo_ptr, s_hi_ptr, s_lo_ptr, stride_s,
                                     xssq_ptr, sx_ptr, stride_sx)
            p = tl.where(all_kept, 1.0, tl.minimum(c * sc, 1.0))
            p = tl.where(sc > 0, p, 0.0)
            u = tl.rand(seed, j.to(tl.uint32))
            keep = (u < p) & mask
            keep_i = keep.to(tl.int32)
            pos = count + tl.cumsum(keep_i, axis=0) - 1
            tl.store(src_ptr + pos, m, mask=keep)
            tl.store(half_ptr + pos, h, mask=keep)
            fac = tl.math.div_rn(f, tl.where(keep, p, 1.0))
            tl.store(factor_ptr + pos, fac, mask=keep)
            tl.store(p_ptr + j, p, mask=mask)
            count += tl.sum(keep_i, axis=0)
            fmax = tl.maximum(fmax, tl.max(tl.where(keep, fac, 0.0), axis=0))
        tl.store(count_ptr, count)
        tl.store(fmax_ptr, fmax)

    @triton.jit
    def _exp2_int(e):
        """2^e as fp32 for an int32 e in [-126, 127], by its bits (exact)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _pow2_factor(f, rows, R_OUT, fmax_ptr, seed_ptr, t_ptr, pid, SEED_IDX: tl.constexpr):
        """Unbiased power-of-two rounding of the row factors, relative to t = 2^(ceil(log2 max f) - 6):

        v = f / t in (0, 64]; v = 2^e (1 + m) becomes 2^(e+1) with probability m, else 2^e (E = v); values
        under 2^-9 become 2^-9 with probability v / 2^-9, else 0 (E = v). Any INT4 code times the result is
        exact in E4M3 (at most 7 · 64 = 448; at least 2^-9). Returns the rounded v; program 0 writes t.
        """
        fb = tl.load(fmax_ptr).to(tl.uint32, bitcast=True)
        e_max = ((fb >> 23) & 0xFF).to(tl.int32) - 127 + ((fb & 0x7FFFFF) != 0).to(tl.int32)
        e_t = tl.minimum(tl.maximum(e_max - 6, -120), 120)
        tl.store(t_ptr, _exp2_int(e_t), mask=pid == 0)
        v = f * _exp2_int(-e_t)
        p2 = (v.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        m = tl.math.div_rn(v, tl.where(p2 > 0, p2, 1.0)) - 1.0
        seed = _load_seed(seed_ptr, SEED_IDX)
        up = tl.rand(seed, rows.to(tl.uint32)) < m
        v = tl.where(up, 2.0 * p2, p2)
        tiny = 0.001953125  # 2^-9, the smallest E4M3 subnormal
        keep_tiny = tl.rand(seed, (rows + R_OUT).to(tl.uint32)) * tiny < v
        return tl.where(v < tiny, tl.where(keep_tiny, tiny, 0.0), v)

    @triton.jit
    def _pow2_of_max_value(vmax):
        """2^(floor(log2(7·vmax)) - 12) as fp32 (the exponent read from the bits of 7·vmax, exact; powers
        below 2^-126 rounded as fp32 arithmetic does, to a subnormal or 0); 1 where 7·vmax is 0 or NaN, inf
        where it overflows. vmax >= 0 or NaN, a scalar."""
        y = vmax * 7.0
        sub = y < 1.1754943508222875e-38  # 2^-126: scale subnormals up by 2^24 (exact) to read the exponent
        yn = y * tl.where(sub, 16777216.0, 1.0)
        e = ((yn.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - tl.where(sub, 24, 0) - 12
        p = tl.where(e >= -126, _exp2_int(tl.maximum(e, -126)), _exp2_int(tl.maximum(e, -126 - 64) + 64)
                     * 5.421010862427522e-20)  # 2^-64
        p = tl.where(y == float("inf"), y, p)
        return tl.where((y > 0.0) & (y == y), p, 1.0)

    @triton.jit
    def _row_factors_kernel(a_ptr, stride_a, b_ptr, stride_b, factor_ptr, norm_ptr, R, BLOCK: tl.constexpr,
                            HAS_B: tl.constexpr, WRITE_F: tl.constexpr):
        """One program: factor[r] = a[r·stride_a] · b[r·stride_b] (fp32; a alone without HAS_B) for r < R,
        written with WRITE_F, and norm[0] = _pow2_of_max_value(max_r |factor[r]|) (NaN if any is NaN)."""
        offs = tl.arange(0, BLOCK)
        vmax = tl.zeros([BLOCK], dtype=tl.float32)
        nan = tl.zeros([BLOCK], dtype=tl.int32)
        for r0 in range(0, R, BLOCK):
            r = r0 + offs
            mask = r < R
            f = tl.load(a_ptr + r.to(tl.int64) * stride_a, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                f = f * tl.load(b_ptr + r.to(tl.int64) * stride_b, mask=mask, other=0.0).to(tl.float32)
            if WRITE_F:
                tl.store(factor_ptr + r, f, mask=mask)
            vmax = tl.maximum(vmax, tl.abs(f))
            nan = nan | (f != f).to(tl.int32)
        m = tl.max(vmax, axis=0)
        m = tl.where(tl.max(nan, axis=0) > 0, float("nan"), m)
        tl.store(norm_ptr, _pow2_of_max_value(m))

    @triton.jit
    def _gather_kernel(
        src_idx_ptr, half_ptr, factor_ptr, g_ptr, x_ptr, a_out_ptr, b_out_ptr, fmax_ptr, seed_ptr, t_ptr,
        count_ptr, norm_ptr, R_OUT, N, K, stride_gr, stride_xr, stride_ar, stride_br,
        BR: tl.constexpr, BC: tl.constexpr, G_PACKED: tl.constexpr, TRANS: tl.constexpr, POW2: tl.constexpr,
        COUNTED: tl.constexpr, SEED_IDX: tl.constexpr, NORM: tl.constexpr, IDENT: tl.constexpr,
        WRITE_A: tl.constexpr,
    ):
        """Row j of the outputs: a_out[j] = codes of g row src_idx[j] (the hi or lo half when packed),
        b_out[j] = factor[j] · x[src_idx[j]]; both rounded to the outputs' dtype (bf16: RNE). TRANS: the
        outputs are stored transposed, a_out[:, j] and b_out[:, j] (stride_ar, stride_br: row strides).
        COUNTED: only rows j < count_ptr[0] are live (read); the rows after them, up to R_OUT, are zeros.
        NORM: each factor is first divided by norm_ptr[0] (correctly rounded). IDENT: src_idx[j] = j (not
        read). Without WRITE_A only b_out is written."""
        pid = tl.program_id(0)
        rows = pid * BR + tl.arange(0, BR)
        row_ok = rows < R_OUT
        if COUNTED:
            live = row_ok & (rows < tl.load(count_ptr))
        else:
            live = row_ok
        rows64 = rows.to(tl.int64)
        if IDENT:
            src = tl.where(live, rows64, 0)
        else:
            src = tl.load(src_idx_ptr + rows, mask=live, other=0).to(tl.int64)
        f = tl.load(factor_ptr + rows, mask=live, other=0.0)
        if NORM:
            f = tl.math.div_rn(f, tl.zeros([BR], dtype=tl.float32) + tl.load(norm_ptr))
        if POW2:
            f = _pow2_factor(f, rows, R_OUT, fmax_ptr, seed_ptr, t_ptr, pid, SEED_IDX)
        cols0 = tl.arange(0, BC)
        if G_PACKED:
            half = tl.load(half_ptr + rows, mask=live, other=0)  # 0: hi, 1: lo
        for c0 in range(0, N if WRITE_A else 0, BC):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < N)
            c = tl.load(g_ptr + src[:, None] * stride_gr + cols[None, :], mask=live[:, None] & mask,
                        other=0).to(tl.int32)
            if G_PACKED:
                hi = c >> 4
                lo = ((c & 15) ^ 8) - 8
                c = tl.where(half[:, None] == 0, hi, lo)
            if TRANS:
                a_ptrs = a_out_ptr + cols.to(tl.int64)[None, :] * stride_ar + rows64[:, None]
            else:
                a_ptrs = a_out_ptr + rows64[:, None] * stride_ar + cols[None, :]
            _store_cast(a_ptrs, c.to(tl.float32), mask)
        for c0 in range(0, K, BC):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < K)
            xq = tl.load(x_ptr + src[:, None] * stride_xr + cols[None, :], mask=live[:, None] & mask)
            xq = tl.where(live[:, None], xq.to(tl.float32), 0.0)
            if TRANS:
                b_ptrs = b_out_ptr + cols.to(tl.int64)[None, :] * stride_br + rows64[:, None]
            else:
                b_ptrs = b_out_ptr + rows64[:, None] * stride_br + cols[None, :]
            _store_cast(b_ptrs, xq * f[:, None], mask)


class HadamardQuantized(NamedTuple):
    """Result of :func:`hadamard_quantize` for x of shape (R, C).

    codes: (R, C) FP8 E4M3 or int8, integers in [-7, 7] (None when not requested).
    codes_t: (C, R) the same codes transposed (None unless requested).
    scale: fp32, (R, 1) per row or (1, 1) per tensor; the dequantized x̂ is codes · scale.
    absmax: (R,) fp32 absmax of each row of x̂ (None with a given scale).
    code_sumsq: (R,) fp32 Σ codes² per row (exact integers): ‖row of codes·scale‖ = scale·sqrt(code_sumsq).
    """

    codes: torch.Tensor | None
    codes_t: torch.Tensor | None
    scale: torch.Tensor
    absmax: torch.Tensor | None
    code_sumsq: torch.Tensor


class BitSplitCodes(NamedTuple):
    """Result of :func:`bit_split_quantize` for g of shape (R, C).

    v: (R, C) int8 = 14·hi + lo in [-105, 105], so that hi·s_hi + lo·s_lo = v·s_lo (None unless requested).
    hl: (R, C) int8 packed halves, hi << 4 | (lo & 15) (:func:`unpack_hi_lo`; None unless requested).
    hi_f8, lo_f8: (R, C) FP8 E4M3 halves (None unless requested).
    scale_hi, scale_lo: fp32 (R, 1) per token or (1, 1) per tensor, scale_lo = scale_hi / 14.
    sumsq_hi, sumsq_lo: (R,) fp32 Σ hi², Σ lo² per row (exact integers).
    folded: None, or (v2, scale2_hi, scale2_lo): the bit split of g ⊙ cs for given column factors cs, with
        the same noise (v2 int8 as v; per-token scales (R, 1)); see ``_bit_split``'s ``col_scale``.
    """

    v: torch.Tensor | None
    hl: torch.Tensor | None
    hi_f8: torch.Tensor | None
    lo_f8: torch.Tensor | None
    scale_hi: torch.Tensor
    scale_lo: torch.Tensor
    sumsq_hi: torch.Tensor
    sumsq_lo: torch.Tensor
    folded: tuple | None = None


def unpack_hi_lo(hl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) int8 from the packed byte hi << 4 | (lo & 15) of :func:`bit_split_quantize`."""
    h = hl.to(torch.int16)
    return (h >> 4).to(torch.int8), (((h & 15) ^ 8) - 8).to(torch.int8)


def _seed_tensor(seed: int | torch.Tensor, dev) -> torch.Tensor:
    """A Philox seed as a one-element int64 tensor on ``dev`` (an int becomes a host-to-device copy)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=dev, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=dev)


def _check_matrix(name: str, x: torch.Tensor, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride(1) == 1), got strides {x.stride()}")


def _row_granularity(granularity: str) -> bool:
    if granularity in ("row", "token", "channel"):
        return True
    if granularity == "tensor":
        return False
    raise ValueError(f"granularity must be 'row' (= 'token' / 'channel' of a 2-D matrix) or 'tensor', got "
                     f"{granularity!r}")


#: Launch defaults of _hq_kernel: rows per program (rotating, whole-row mode, plain), columns per
#: program when a row is split over programs, columns per tile without rotation, warps.
_HQ_CONFIG = {"rows_rotate": 64, "rows_whole": 32, "rows_plain": 16, "chunk": 512, "cols_plain": 256,
              "num_warps": 4}


def _tile_width(b: int, n_cols: int) -> int:
    """Columns per tile: 128 (the block-diagonal sign matrix holds 128 / b blocks) when they divide the
    row, else the rotation block itself (at least 16 for tl.dot); 256 without rotation (masked tail)."""
    if b == 1:
        return _HQ_CONFIG["cols_plain"]
    if n_cols % 128 == 0:
        return 128
    return _rotation_width(b, n_cols)


#: Launch plans of _hq_kernel by (shape, dtype, block, mode, outputs, configuration): the grid and the
#: keyword arguments that depend on nothing else (Python values only: no tensor is cached).
_HQ_PLANS: dict = {}
_PLANS_MAX = 512  # cleared when full (shapes that keep changing)


def _hq_plan(n_rows, n_cols, dtype, b, mode, flags, round_rotated, block_rows, num_warps, chunk, dev_type):
    """(grid, split, meta) of one _hq_kernel launch (see :func:`_launch_hq`); cached."""
    key = (n_rows, n_cols, dtype, b, mode, flags, round_rotated, block_rows, num_warps, chunk, dev_type,
           tuple(_HQ_CONFIG.values()))
    plan = _HQ_PLANS.get(key)
    if plan is not None:
        return plan
    rotate = b > 1
    width = _tile_width(b, n_cols)
    if mode == _ROW:
        br = block_rows or (_HQ_CONFIG["rows_whole"] if rotate else _HQ_CONFIG["rows_plain"])
        cols_per_prog = n_cols
    else:
        br = block_rows or (_HQ_CONFIG["rows_rotate"] if rotate else _HQ_CONFIG["rows_plain"])
        cols_per_prog = max(width, (chunk or _HQ_CONFIG["chunk"]) // width * width)
    br = max(16 if rotate else 1, min(br, max(16, triton.next_power_of_2(n_rows))))
    n_chunks = triton.cdiv(n_cols, cols_per_prog)
    round_mode = _round_mode(dtype) if round_rotated and mode != _TRANSFORM else _ROUND_NONE
    write_out, write_t, has_rs, tmax, has_scale, write_abs = flags
    meta = dict(
        CHUNK=cols_per_prog, inv_sqrt_b=1.0 / math.sqrt(b),
        BR=br, BC=width, HB=b, RW=max(b, 16), ROTATE=rotate, NSPLIT=_n_split(dtype), DOT_F32=interpreting(),
        ROUND=round_mode, MODE=mode, WRITE_OUT=write_out, WRITE_T=write_t, HAS_RS=has_rs,
        SPLIT=n_chunks > 1, QMAX_C=float(QMAX), TMAX=tmax, HAS_SCALE=has_scale,
        WRITE_ABS=write_abs, num_warps=num_warps or _HQ_CONFIG["num_warps"],
        **({"enable_fp_fusion": False} if dev_type == "cuda" else {}),
    )
    plan = ((triton.cdiv(n_rows, br), n_chunks), n_chunks > 1, meta)
    if len(_HQ_PLANS) >= _PLANS_MAX:
        _HQ_PLANS.clear()
    _HQ_PLANS[key] = plan
    return plan


def _hq_split(x, b, mode, round_rotated=False, block_rows=None, num_warps=None, chunk=None) -> bool:
    """Whether a launch of _hq_kernel in ``mode`` splits the rows over programs (accumulators at zero)."""
    if mode == _ROW:
        return False
    return _hq_plan(x.shape[0], x.shape[1], x.dtype, b, mode, (False, False, False, False, True, False),
                    round_rotated, block_rows, num_warps, chunk, x.device.type)[1]


def _launch_hq(x, b, mode, *, scale_in=None, row_scale=None, out=None, out_t=None, scale_out=None,
               absmax=None, sumsq=None, tmax=None, round_rotated=False, block_rows=None, num_warps=None,
               chunk=None) -> None:
    """Launch _hq_kernel over x (checked by the caller); absent outputs are not written. Outside the
    whole-row mode the columns are split over programs: absmax and sumsq must then start at zero (as
    ``tmax``, the tensor absmax of the stats mode, always: ``_hq_kernel``'s TMAX)."""
    n_rows, n_cols = x.shape
    grid, _, meta = _hq_plan(n_rows, n_cols, x.dtype, b, mode,
                             (out is not None, out_t is not None, row_scale is not None, tmax is not None,
                              scale_in is not None, absmax is not None),
                             round_rotated, block_rows, num_warps, chunk, x.device.type)
    dummy = (absmax if absmax is not None else sumsq if sumsq is not None else out if out is not None
             else scale_in if scale_in is not None else tmax)
    if mode != _TRANSFORM:  # FP8 codes are written as their E4M3 bytes (_store_codes)
        if out is not None and out.dtype == torch.float8_e4m3fn:
            out = out.view(torch.uint8)
        if out_t is not None and out_t.dtype == torch.float8_e4m3fn:
            out_t = out_t.view(torch.uint8)
    _hq_kernel[grid](
        x, scale_in if scale_in is not None else dummy, row_scale if row_scale is not None else dummy,
        out if out is not None else dummy, out_t if out_t is not None else dummy,
        scale_out if scale_out is not None else dummy, absmax if absmax is not None else dummy,
        sumsq if sumsq is not None else dummy, tmax if tmax is not None else dummy,
        n_rows, n_cols, stride_xr=x.stride(0),
        stride_or=out.stride(0) if out is not None else 0,
        stride_tc=out_t.stride(0) if out_t is not None else 0, **meta,
    )


def hadamard_quantize(
    x: torch.Tensor,
    block_size: int | None,
    *,
    granularity: str = "row",
    scale: torch.Tensor | None = None,
    codes_dtype: torch.dtype | None = torch.float8_e4m3fn,
    transposed_dtype: torch.dtype | None = None,
    round_rotated: bool = False,
    block_rows: int | None = None,
    num_warps: int | None = None,
    chunk: int | None = None,
) -> HadamardQuantized:
    """INT4 codes of x̂ = x · BlockDiag(H_b), fused in one pass (two for a per-tensor absmax).

    Equals ``quantize(hadamard_transform(x.float(), b), 4, granularity=g)`` with g = "token" for "row" and
    "tensor" for "tensor", and ``quantize_with_scale(hadamard_transform(x.float(), b), scale, 4)`` when
    ``scale`` is given (``lowbit.int4``'s ``hq_quantize``); with ``round_rotated=True`` x̂ is first rounded
    to x's dtype, as ``hadamard_transform(x, b)`` returns it. Up to the .5-boundary flips the module
    docstring describes.

    Args:
        x: (R, C) bf16 / fp16 / fp32 on CUDA (or the CPU under TRITON_INTERPRET=1), rows contiguous.
        block_size: Hadamard block b, a power of two <= 128 dividing C (and C a multiple of max(b, 16));
            None or 1: no rotation (plain INT4 round to nearest).
        granularity: "row" (one scale per row: a token of X, an output channel of W) or "tensor".
        scale: a given positive scale (fp32 tensor of one element, e.g. a learned LSQ scale): one pass,
            granularity ignored. Not checked for positivity (that would sync).
        codes_dtype: dtype of ``codes`` (float8_e4m3fn or int8), or None to skip writing them.
        transposed_dtype: when given (float8_e4m3fn or int8), also write ``codes_t`` = codes.T, (C, R).
        round_rotated: round x̂ to x's dtype before the scale (see above); default: x̂ in fp32.
        block_rows, num_warps, chunk: launch configuration (rows per program, warps, columns per program
            outside the per-row mode; defaults in ``_HQ_CONFIG``).

    Returns:
        :class:`HadamardQuantized`. Empty x gives empty codes and scale 1.
    """
    _check_matrix("x", x)
    _check_triton("hadamard_quantize", x)
    n_rows, n_cols = x.shape
    b = _check_block(block_size, n_cols)
    row_wise = _row_granularity(granularity)
    for name, dt in (("codes_dtype", codes_dtype), ("transposed_dtype", transposed_dtype)):
        if dt is not None and dt not in _CODE_DTYPES:
            raise TypeError(f"{name} must be None, torch.float8_e4m3fn or torch.int8, got {dt}")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.device != x.device:
            raise ValueError(f"scale must be a one-element tensor on {x.device}, got {scale!r}")
        scale = scale.detach().reshape(1, 1).float().contiguous()
    return _hadamard_quantize(x, b, row_wise, scale, codes_dtype, transposed_dtype, round_rotated, block_rows,
                              num_warps, chunk)


def _hadamard_quantize(x, b, row_wise, scale, codes_dtype, transposed_dtype, round_rotated=False,
                       block_rows=None, num_warps=None, chunk=None, want_absmax=True) -> HadamardQuantized:
    """:func:`hadamard_quantize` of checked arguments: b an int block (1: none), ``scale`` None or a
    contiguous (1, 1) fp32 tensor on x's device. ``want_absmax=False``: the rows' absmax are not written
    (``absmax`` None; the scales are the same)."""
    n_rows, n_cols = x.shape
    dev = x.device
    codes = None if codes_dtype is None else torch.empty(n_rows, n_cols, dtype=codes_dtype, device=dev)
    codes_t = None
    if transposed_dtype is not None:
        codes_t = torch.empty(n_cols, n_rows, dtype=transposed_dtype, device=dev)
    if n_rows == 0 or n_cols == 0:
        sumsq = torch.zeros(n_rows, dtype=torch.float32, device=dev)
        absmax = None if scale is not None else torch.zeros(n_rows, dtype=torch.float32, device=dev)
        if scale is not None:
            out_scale = scale
        else:
            out_scale = torch.ones(n_rows if row_wise else 1, 1, device=dev)
        return HadamardQuantized(codes, codes_t, out_scale, absmax, sumsq)
    f32 = torch.float32
    if scale is not None:
        # Given scale: one pass (Σ codes² accumulated atomically when the columns are split).
        split = _hq_split(x, b, _GIVEN, round_rotated, block_rows, num_warps, chunk)
        sumsq = (torch.zeros if split else torch.empty)(n_rows, dtype=f32, device=dev)
        _launch_hq(x, b, _GIVEN, scale_in=scale, out=codes, out_t=codes_t, sumsq=sumsq,
                   round_rotated=round_rotated, block_rows=block_rows, num_warps=num_warps, chunk=chunk)
        return HadamardQuantized(codes, codes_t, scale, None, sumsq)
    if row_wise:
        # One pass per row block: every output is written whole (no accumulator to clear).
        sumsq = torch.empty(n_rows, dtype=f32, device=dev)
        absmax = torch.empty(n_rows, dtype=f32, device=dev) if want_absmax else None
        out_scale = torch.empty(n_rows, 1, dtype=f32, device=dev)
        _launch_hq(x, b, _ROW, out=codes, out_t=codes_t, scale_out=out_scale, absmax=absmax, sumsq=sumsq,
                   round_rotated=round_rotated, block_rows=block_rows, num_warps=num_warps)
        return HadamardQuantized(codes, codes_t, out_scale, absmax, sumsq)
    # Per tensor. Pass 1: absmax of x̂ per row and of the whole tensor (atomic max); pass 2: the scale as
    # lowbit.quant computes it (true_div, 1 where not positive), written by the kernel, and the codes.
    # One zeroed workspace holds the accumulators: [Σ codes² (R) | tensor absmax | absmax (R)].
    ws = torch.zeros(n_rows + 1 + (n_rows if want_absmax else 0), dtype=f32, device=dev)
    sumsq, tmax = ws[:n_rows], ws[n_rows:n_rows + 1]
    absmax = ws[n_rows + 1:] if want_absmax else None
    out_scale = torch.empty(1, 1, dtype=f32, device=dev)
    _launch_hq(x, b, _STATS, absmax=absmax, tmax=tmax, round_rotated=round_rotated, block_rows=block_rows,
               num_warps=num_warps, chunk=chunk)
    _launch_hq(x, b, _GIVEN, tmax=tmax, scale_out=out_scale, out=codes, out_t=codes_t, sumsq=sumsq,
               round_rotated=round_rotated, block_rows=block_rows, num_warps=num_warps, chunk=chunk)
    return HadamardQuantized(codes, codes_t, out_scale, absmax, sumsq)


def row_absmax(x: torch.Tensor, block_size: int | None, *, round_rotated: bool = False,
               block_rows: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """(R,) fp32 absmax of each row of x̂ = x · BlockDiag(H_b) in fp32 (``round_rotated``: in x's dtype).

    Same arguments and conditions as :func:`hadamard_quantize`; ``row_absmax(x, b).amax()`` is the absmax
    of a per-tensor scale.
    """
    _check_matrix("x", x)
    _check_triton("row_absmax", x)
    n_rows, n_cols = x.shape
    b = _check_block(block_size, n_cols)
    absmax = torch.zeros(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return absmax
    _launch_hq(x, b, _STATS, absmax=absmax, round_rotated=round_rotated, block_rows=block_rows,
               num_warps=num_warps)
    return absmax


def hadamard_rows(
    x: torch.Tensor,
    block_size: int | None,
    *,
    row_scale: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    block_rows: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """y = (x · BlockDiag(H_b)) · row_scale · scale in fp32, rounded once to ``out_dtype``.

    The rotation back of a product: ∇X = (∇X̂)·H where ∇X̂ comes out of an integer product (int32) or a
    bf16 one. The fp32 result is within a few fp32 ulps of hadamard_transform(x.float() · scales, b).

    Args:
        x: (R, C) int32 / bf16 / fp16 / fp32, rows contiguous; C a multiple of max(b, 16).
        block_size: b, a power of two <= 128 (None or 1: no rotation, only the scales).
        row_scale: optional (R,) or (R, 1) fp32; scale: optional one-element fp32 tensor.
        out_dtype: fp32, bf16 or fp16.

    Returns:
        (R, C) tensor of ``out_dtype``.
    """
    _check_matrix("x", x, _FLOAT_DTYPES + (torch.int32,))
    _check_triton("hadamard_rows", x)
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_FLOAT_DTYPES}, got {out_dtype}")
    n_rows, n_cols = x.shape
    b = _check_block(block_size, n_cols)
    dev = x.device
    if n_rows == 0 or n_cols == 0:
        return torch.empty(n_rows, n_cols, dtype=out_dtype, device=dev)
    if row_scale is not None:
        row_scale = row_scale.detach().reshape(-1).float().contiguous()
        if row_scale.numel() != n_rows or row_scale.device != dev:
            raise ValueError(f"row_scale must have {n_rows} elements on {dev}, got {tuple(row_scale.shape)}")
    if scale is not None:
        if scale.numel() != 1 or scale.device != dev:
            raise ValueError(f"scale must be a one-element tensor on {dev}")
        scale = scale.detach().reshape(1).float()
    return _hadamard_rows(x, b, row_scale, scale, out_dtype, block_rows, num_warps)


def _hadamard_rows(x, b, row_scale, scale, out_dtype, block_rows=None, num_warps=None) -> torch.Tensor:
    """:func:`hadamard_rows` of checked arguments: b an int block, ``row_scale`` None or R contiguous fp32
    elements ((R,) or (R, 1)), ``scale`` None (1) or one fp32 element, both on x's device."""
    out = torch.empty(x.shape[0], x.shape[1], dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    # int32 (|v| < 2^24) and fp32 go into the dot in three exact bf16 pieces, bf16 / fp16 as they are.
    _launch_hq(x, b, _TRANSFORM, scale_in=scale, row_scale=row_scale, out=out, block_rows=block_rows,
               num_warps=num_warps)
    return out


_BS_CONFIG = {"rows": 8, "cols": 512, "num_warps": 4}


def bit_split_quantize(
    g: torch.Tensor,
    *,
    granularity: str = "token",
    seed: int | torch.Tensor = 0,
    noise: torch.Tensor | None = None,
    write_v: bool = True,
    write_packed: bool = False,
    write_fp8: bool = False,
    block_rows: int | None = None,
    block_cols: int | None = None,
    num_warps: int | None = None,
    col_scale: torch.Tensor | None = None,
) -> BitSplitCodes:
    """Bit splitting of ∇Y into two INT4 halves in one pass (two with a per-tensor scale).

    Equals ``lowbit.quant.bit_split(g, granularity=...)`` given the same uniform noise u: pass
    ``noise`` = the tensor ``torch.rand(g.shape, generator=gen)`` that bit_split draws from the same
    generator state, and hi, lo, scales are bit for bit the same. Without ``noise`` the kernel draws
    u uniform on the grid k·2^-23 of [0, 1) (23 bits of Triton's Philox, one ``tl.randint4x`` per four
    elements, seeded by ``seed``; ``torch.rand`` has 24): another stream, fixed by ``seed`` and
    ``block_cols``.

    Args:
        g: (R, C) bf16 / fp16 / fp32, rows contiguous, on CUDA (or the CPU under TRITON_INTERPRET=1).
        granularity: "token" (one scale per row) or "tensor".
        seed: Philox seed of the in-kernel noise (ignored with ``noise``): an int, or an int64 tensor of
            one element on g's device (e.g. drawn from a CUDA generator: no host sync).
        noise: optional (R, C) fp32 uniform noise in [0, 1).
        write_v, write_packed, write_fp8: which operands to write (:class:`BitSplitCodes`).
        col_scale: optional (C,) positive factors cs, one per column (granularity "token" only): the same
            pass also splits g ⊙ cs (fp32 products) with its own row scales and the same noise, returned
            as ``folded`` = (v2, scale_hi, scale_lo); equals ``bit_split(g.float() * cs)`` given that noise.

    Returns:
        :class:`BitSplitCodes`.
    """
    _check_matrix("g", g)
    _check_triton("bit_split_quantize", g)
    if granularity not in ("token", "tensor"):
        raise ValueError(f"granularity must be 'token' or 'tensor', got {granularity!r}")
    dev = g.device
    if noise is not None:
        if noise.shape != g.shape or noise.dtype != torch.float32 or noise.device != dev:
            raise ValueError(f"noise must be a float32 tensor of shape {tuple(g.shape)} on {dev}")
        if noise.stride(1) != 1 and g.shape[1] > 1:
            raise ValueError("noise must have contiguous rows")
    bc = block_cols or _BS_CONFIG["cols"]
    if bc < 64 or bc & (bc - 1):
        raise ValueError(f"block_cols must be a power of two >= 64, got {bc}")
    if col_scale is not None:
        if granularity != "token":
            raise ValueError("col_scale needs granularity='token'")
        if not (isinstance(col_scale, torch.Tensor) and col_scale.numel() == g.shape[1]
                and col_scale.device == dev):
            raise ValueError(f"col_scale must be a tensor of {g.shape[1]} elements (one per column of g) on "
                             f"{dev}, got {getattr(col_scale, 'shape', type(col_scale).__name__)}")
        col_scale = col_scale.detach().reshape(-1).float().contiguous()
    if noise is not None:
        seed_t = None
    else:
        seed_t = _seed_tensor(seed, dev)
    return _bit_split(g, granularity == "token", seed_t, -1, noise, write_v, write_packed, write_fp8,
                      block_rows, bc, num_warps, col_scale=col_scale)


def _bit_split(g, per_token, seed_t, seed_idx, noise, write_v, write_packed, write_fp8, block_rows=None,
               block_cols=None, num_warps=None, v_dtype=torch.int8, write_sumsq=True, col_scale=None
               ) -> BitSplitCodes:
    """:func:`bit_split_quantize` of checked arguments: ``seed_t`` a one-element int64 tensor on g's device
    (None with ``noise``), read through ``_load_seed(seed_t, seed_idx)`` in the kernel. ``v_dtype``: int8
    or fp16 (the same integers, for an fp16 product); ``write_sumsq=False``: no row sums (None).
    ``col_scale``: None, or (C,) contiguous fp32 column factors cs (per token only): the result's ``folded``
    is then the bit split of g ⊙ cs drawn with the same noise, as (v2 int8, scale_hi, scale_lo)."""
    n_rows, n_cols = g.shape
    dev = g.device
    f32 = torch.float32

    def empty(flag, dtype):
        return torch.empty(n_rows, n_cols, dtype=dtype, device=dev) if flag else None

    v, hl = empty(write_v, v_dtype), empty(write_packed, torch.int8)
    hi8, lo8 = empty(write_fp8, torch.float8_e4m3fn), empty(write_fp8, torch.float8_e4m3fn)
    if n_rows == 0 or n_cols == 0:
        s_hi = torch.ones(n_rows if per_token else 1, 1, device=dev)
        ssq_hi = torch.zeros(n_rows, dtype=f32, device=dev)
        ssq_lo = torch.zeros(n_rows, dtype=f32, device=dev)
        folded = None
        if col_scale is not None:
            s2 = torch.ones(n_rows, 1, device=dev)
            folded = (torch.zeros(n_rows, n_cols, dtype=torch.int8, device=dev), s2, true_div(s2, LO_RATIO))
        return BitSplitCodes(v, hl, hi8, lo8, s_hi, true_div(s_hi, LO_RATIO), ssq_hi, ssq_lo, folded)
    # (every row's sums and scales are written whole by the kernel: nothing to clear)
    ssq_hi = torch.empty(n_rows, dtype=f32, device=dev) if write_sumsq else None
    ssq_lo = torch.empty(n_rows, dtype=f32, device=dev) if write_sumsq else None
    s_rows = n_rows if per_token else 1
    s_hi = torch.empty(s_rows, 1, dtype=f32, device=dev)
    s_lo = torch.empty(s_rows, 1, dtype=f32, device=dev)
    if per_token:
        scale_in = s_hi
    else:
        # The tensor absmax (one stats pass, atomic max into the last element of a zeroed workspace); the
        # split kernel turns it into s_hi = true_div(absmax, 7) (1 where not positive) and s_lo = s_hi / 14.
        scale_in = torch.zeros(1, dtype=f32, device=dev)
        _launch_hq(g, 1, _STATS, tmax=scale_in)
    br = block_rows or _BS_CONFIG["rows"]
    bc = block_cols or _BS_CONFIG["cols"]
    fold = col_scale is not None
    if fold:
        if not per_token:
            raise ValueError("col_scale (a folded per-column factor) needs the per-token granularity")
        v2 = torch.empty(n_rows, n_cols, dtype=torch.int8, device=dev)
        s2_hi = torch.empty(n_rows, 1, dtype=f32, device=dev)
        s2_lo = torch.empty(n_rows, 1, dtype=f32, device=dev)
    some = v if v is not None else hl if hl is not None else hi8 if hi8 is not None else v2 if fold else None
    dummy = s_hi
    _bit_split_kernel[(_cdiv(n_rows, br),)](
        g, noise if noise is not None else dummy, scale_in,
        v if v is not None else dummy, hl if hl is not None else dummy,
        hi8 if hi8 is not None else dummy, lo8 if lo8 is not None else dummy,
        s_hi, ssq_hi if write_sumsq else dummy, ssq_lo if write_sumsq else dummy,
        n_rows, n_cols, g.stride(0), noise.stride(0) if noise is not None else 0,
        some.stride(0) if some is not None else 0, seed_t if seed_t is not None else dummy, s_lo,
        col_scale if fold else dummy, v2 if fold else dummy, s2_hi if fold else dummy,
        s2_lo if fold else dummy,
        BR=br, BC=bc, GIVEN=not per_token, HAS_NOISE=noise is not None,
        WRITE_V=write_v, WRITE_HL=write_packed, WRITE_F8=write_fp8, SEED_IDX=seed_idx, WRITE_SSQ=write_sumsq,
        FOLD=fold, HW_RD=_hw_round_down(), num_warps=num_warps or _BS_CONFIG["num_warps"],
        **_launch_options(dev),
    )
    return BitSplitCodes(v, hl, hi8, lo8, s_hi, s_lo, ssq_hi, ssq_lo,
                         folded=(v2, s2_hi, s2_lo) if fold else None)


def gather_scaled_rows(
    g_codes: torch.Tensor,
    x_codes: torch.Tensor,
    src_idx: torch.Tensor,
    factor: torch.Tensor,
    *,
    half: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    transposed: bool = False,
    pad_to: int = 1,
    pow2_round: tuple[torch.Tensor, int | torch.Tensor] | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
    num_warps: int = 4,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compacted operands of a row-sampled product Σ_j a_jᵀ b_j (the ∇W product of LSS).

    a[j] = g_codes[src_idx[j]] (the hi half when half[j] == 0, the lo half when 1, if g_codes is packed),
    b[j] = factor[j] · x_codes[src_idx[j]], both rounded once to ``out_dtype`` (bf16 or fp16: integers in
    [-105, 105] are exact, so ``a`` is exact; ``b`` has one rounding, relative error <= 2^-8 in bf16, 2^-11 in
    fp16 as long as factor · 7 stays inside the fp16 range).

    Args:
        g_codes: (M, N) int8: codes (v or INT4) or, with ``half``, the packed halves of bit_split_quantize.
        x_codes: (M, K) FP8 E4M3 / int8 codes of the saved activation.
        src_idx: (R,) int32 / int64 source rows in [0, M) (not checked: that would sync).
        factor: (R,) fp32 per-row factor (e.g. s_j / p_j · s_x).
        half: optional (R,) int8 / int32, 0 = hi, 1 = lo; means g_codes is packed.
        out_dtype: bf16, fp16, fp32 or float8_e4m3fn (exact only where factor · code is: e.g. codes times
            powers of two inside the E4M3 range).
        transposed: write aᵀ (N, R') and bᵀ (K, R') instead, the K-major operands of a product over R.
        pad_to: R' = R rounded up to a multiple of pad_to; the padding rows (columns when transposed) are 0.
        pow2_round: (factor_max, seed): replace factor[j] by an unbiased power-of-two rounding of
            factor[j] / t, t = 2^(ceil(log2 factor_max) - 6) (``factor_max`` >= every factor, a one-element
            tensor). Then every b entry, an INT4 code times a power of two in [2^-9, 2^6], is exact in
            E4M3, and E[t · b[j]] = factor[j] · x_codes[src_idx[j]]. Returns t as a third output.
        count: optional one-element int32 tensor on the device: only the first ``count`` of the R rows are
            live (their ``src_idx``, ``factor``, ``half`` are read); rows count..R are written as zeros. The
            sync-free form of a sampled product: R is a static capacity, the number kept stays on the GPU.

    Returns:
        (a, b): (R', N) and (R', K) of ``out_dtype``, or (N, R') and (K, R') when transposed; plus the
        one-element fp32 tensor t with ``pow2_round``.

    Launch: ``block_rows`` × ``block_cols`` tiles, default 16 × 256, and 64 × 128 when transposed: a
    transposed store writes ``block_rows`` consecutive elements per output row, and 64 one-byte codes fill
    two whole 32-byte sectors where 16 left each sector half written by two programs.
    """
    _check_matrix("g_codes", g_codes, (torch.int8,))
    _check_matrix("x_codes", x_codes, _CODE_DTYPES)
    _check_triton("gather_scaled_rows", g_codes)
    n_out = src_idx.numel()
    if factor.numel() != n_out or (half is not None and half.numel() != n_out):
        raise ValueError("src_idx, factor (and half) must have the same number of elements")
    if g_codes.shape[0] != x_codes.shape[0]:
        raise ValueError(f"g_codes and x_codes must have the same rows, got {g_codes.shape[0]} and "
                         f"{x_codes.shape[0]}")
    src_idx = src_idx.reshape(-1).contiguous()
    factor = factor.reshape(-1).float().contiguous()
    half_t = half.reshape(-1).to(torch.int32).contiguous() if half is not None else None
    pow2 = None
    if pow2_round is not None:
        factor_max, seed = pow2_round
        pow2 = (factor_max.reshape(1).float(), _seed_tensor(seed, g_codes.device), -1)
    count_t = count.reshape(1).to(torch.int32) if count is not None else None
    return _gather(g_codes, x_codes, src_idx, factor, n_out, half=half_t, out_dtype=out_dtype,
                   transposed=transposed, pad_to=pad_to, pow2=pow2, count=count_t, block_rows=block_rows,
                   block_cols=block_cols, num_warps=num_warps)


def _row_factors(a: torch.Tensor, b: torch.Tensor | None, n: int, *, write_factor: bool = True):
    """(factor, norm) in one launch: factor = a · b (fp32, (n,); each a (n,) or one-element fp32 tensor,
    broadcast) and norm = 2^(floor(log2(7·max|factor|)) - 12) (one element; 1 for all zeros or a NaN), the
    power of two that int4_linear's fp16 ∇W operand is divided by. ``b`` None: factor = a;
    ``write_factor=False``: factor is None (only the normalizer of a, e.g. a kept maximum)."""
    dev = a.device
    factor = torch.empty(n, dtype=torch.float32, device=dev) if write_factor else None
    norm = torch.empty(1, dtype=torch.float32, device=dev)
    a1 = a.reshape(-1)
    b1 = b.reshape(-1) if b is not None else a1
    _row_factors_kernel[(1,)](
        a1, a1.stride(0) if a1.numel() > 1 else 0, b1, b1.stride(0) if b1.numel() > 1 else 0,
        factor if factor is not None else norm, norm, n,
        BLOCK=min(1024, max(16, _next_pow2(n))), HAS_B=b is not None, WRITE_F=write_factor, num_warps=4,
        **_launch_options(dev))
    return factor, norm


def _gather(g_codes, x_codes, src_idx, factor, n_out, *, half=None, out_dtype, transposed=False, pad_to=1,
            pow2=None, count=None, norm=None, block_rows=None, block_cols=None, num_warps=4, write_a=True):
    """:func:`gather_scaled_rows` of checked arguments: ``src_idx`` (n_out,) int32 / int64 contiguous, or None
    for rows 0..n_out-1 in order; ``factor`` (n_out,) contiguous fp32; ``half`` None or (n_out,) int32;
    ``pow2`` None or (factor_max (1,) fp32, seed (1,) int64, seed index of ``_load_seed``); ``count`` None
    or (1,) int32; ``norm`` None or a one-element fp32 tensor that divides every factor first.
    ``write_a=False``: only b is made (a is None), for a caller that holds the codes as an operand already."""
    dev = g_codes.device
    n, k = g_codes.shape[1], x_codes.shape[1]
    padded = -(-n_out // pad_to) * pad_to
    if transposed:
        a = torch.empty(n, padded, dtype=out_dtype, device=dev) if write_a else None
        b = torch.empty(k, padded, dtype=out_dtype, device=dev)
        if padded > n_out:
            if write_a:
                a[:, n_out:].zero_()
            b[:, n_out:].zero_()
    else:
        a = torch.empty(padded, n, dtype=out_dtype, device=dev) if write_a else None
        b = torch.empty(padded, k, dtype=out_dtype, device=dev)
        if padded > n_out:
            if write_a:
                a[n_out:].zero_()
            b[n_out:].zero_()
    if n_out == 0:
        return (a, b, torch.ones(1, dtype=torch.float32, device=dev)) if pow2 is not None else (a, b)
    block_rows = block_rows or (64 if transposed else 16)
    block_cols = block_cols or (128 if transposed else 256)
    ident = src_idx is None
    if ident:
        src_idx = factor
    if pow2 is not None:
        factor_max, seed_t, seed_idx = pow2
        t_out = torch.empty(1, dtype=torch.float32, device=dev)
        extra = (factor_max, seed_t, t_out)
    else:
        seed_idx = -1
        extra = (factor, factor, factor)
    _gather_kernel[(_cdiv(n_out, block_rows),)](
        src_idx, half if half is not None else src_idx, factor, g_codes, x_codes, b if a is None else a, b,
        *extra,
        count if count is not None else src_idx, norm if norm is not None else factor,
        n_out, n, k, g_codes.stride(0), x_codes.stride(0), a.stride(0) if write_a else 0, b.stride(0),
        BR=block_rows, BC=block_cols, G_PACKED=half is not None, TRANS=transposed, POW2=pow2 is not None,
        COUNTED=count is not None, SEED_IDX=seed_idx, NORM=norm is not None, IDENT=ident, WRITE_A=write_a,
        num_warps=num_warps, **_launch_options(dev),
    )
    if pow2 is not None:
        return a, b, t_out
    return a, b


class LssSample(NamedTuple):
    """Result of :func:`leverage_sample_compact` for N tokens (2N stacked rows [hi; lo]).

    count: the number R of kept rows (a Python int: reading it is the one device sync); with a ``capacity``
        the capacity instead (no sync), and ``kept`` the one-element int32 device tensor of the number kept,
        of which the first min(kept, capacity) entries of src / half / factor are valid.
    src: (R,) int32 token of each kept row, in increasing stacked order; half: (R,) int32, 0 = hi, 1 = lo.
    factor: (R,) fp32 s_h · s_x / p of each kept row. p: (2N,) fp32 keep probabilities.
    factor_max: one-element fp32 tensor, the largest factor (0 when none kept), for ``pow2_round``.
    """

    count: int
    src: torch.Tensor
    half: torch.Tensor
    factor: torch.Tensor
    p: torch.Tensor
    factor_max: torch.Tensor
    kept: torch.Tensor | None = None


def leverage_sample_compact(
    sumsq_hi: torch.Tensor,
    sumsq_lo: torch.Tensor,
    scale_hi: torch.Tensor,
    scale_lo: torch.Tensor,
    x_code_sumsq: torch.Tensor,
    x_scale: torch.Tensor,
    keep_ratio: float,
    seed: int | torch.Tensor = 0,
    *,
    block: int = 2048,
    iters: int = 40,
    num_warps: int = 8,
    capacity: int | None = None,
) -> LssSample:
    """Leverage-score sampling of the 2N stacked bit-split rows in one single-program kernel.

    Scores c_j = ‖s_h·G_h row‖ · ‖s_x·q_x row‖ (from Σ codes², as ``lowbit.quant.leverage_scores`` of the
    dequantized rows), p = ``leverage_score_probabilities(c, keep_ratio·2N)`` (fp32 here: equal up to
    rounding), keep row j when u_j < p_j with u_j = tl.rand(seed, j), and the kept rows compacted in order.

    Args:
        sumsq_hi, sumsq_lo: (N,) Σ hi², Σ lo² per token (:class:`BitSplitCodes`).
        scale_hi, scale_lo: (N, 1) or one-element scales of the halves.
        x_code_sumsq: (N,) Σ q_x² per token; x_scale: (N, 1) or one-element scale of q_x.
        keep_ratio: in (0, 1]: Σ p = keep_ratio · 2N (or every row with a nonzero score, if fewer).
        seed: int or one-element int64 tensor on the device.
        capacity: None (read the number kept: one device sync) or a static number of rows R
            (:func:`lss_capacity`): src / half / factor are returned with R entries and the number kept stays
            on the device (``kept``), for :func:`gather_scaled_rows`'s ``count`` (CUDA-graph capturable).

    Returns:
        :class:`LssSample`.
    """
    n = sumsq_hi.numel()
    dev = sumsq_hi.device
    _check_triton("leverage_sample_compact", sumsq_hi)
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    for name, t, sizes in (("sumsq_lo", sumsq_lo, (n,)), ("x_code_sumsq", x_code_sumsq, (n,)),
                           ("scale_hi", scale_hi, (1, n)), ("scale_lo", scale_lo, (1, n)),
                           ("x_scale", x_scale, (1, n))):
        if t.numel() not in sizes or t.device != dev:
            raise ValueError(f"{name} must have {' or '.join(map(str, sizes))} elements on {dev}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if scale_hi.numel() != scale_lo.numel():
        raise ValueError("scale_hi and scale_lo must have the same number of elements")
    seed_t = _seed_tensor(seed, dev)
    return _lss(sumsq_hi.float().contiguous(), sumsq_lo.float().contiguous(),
                scale_hi.detach().reshape(-1).float().contiguous(),
                scale_lo.detach().reshape(-1).float().contiguous(), x_code_sumsq.float().contiguous(),
                x_scale.detach().reshape(-1).float().contiguous(), keep_ratio, seed_t, -1, block=block,
                iters=iters, num_warps=num_warps, capacity=capacity)


def _lss(sumsq_hi, sumsq_lo, s_hi, s_lo, x_sumsq, sx, keep_ratio, seed_t, seed_idx, *, block=2048, iters=40,
         num_warps=8, capacity=None, sliced=True) -> LssSample:
    """:func:`leverage_sample_compact` of checked arguments: contiguous fp32 tensors, the scales N or one
    element (any shape: (N, 1) reads as (N,)), ``seed_t`` a one-element int64 tensor read through
    ``_load_seed(seed_t, seed_idx)``.
    ``sliced=False`` returns src / half / factor whole (2N entries, the first ``count`` of them kept)."""
    n = sumsq_hi.numel()
    dev = sumsq_hi.device
    p = torch.empty(2 * n, dtype=torch.float32, device=dev)
    src = torch.empty(2 * n, dtype=torch.int32, device=dev)
    half = torch.empty(2 * n, dtype=torch.int32, device=dev)
    factor = torch.empty(2 * n, dtype=torch.float32, device=dev)
    if n == 0:
        return LssSample(0, src, half, factor, p, torch.zeros(1, dtype=torch.float32, device=dev))
    # (the kernel writes the count and the largest factor at its end: nothing to clear)
    count = torch.empty(1, dtype=torch.int32, device=dev)
    fmax = torch.empty(1, dtype=torch.float32, device=dev)
    _lss_kernel[(1,)](
        sumsq_hi, sumsq_lo, s_hi, s_lo, x_sumsq, sx, seed_t, p, src, half, factor, count, fmax,
        n, float(keep_ratio) * 2 * n, 0 if s_hi.numel() == 1 else 1, 0 if sx.numel() == 1 else 1,
        BLOCK=min(block, max(16, _next_pow2(2 * n))), ITERS=iters, SEED_IDX=seed_idx,
        num_warps=num_warps, **_launch_options(dev),
    )
    if capacity is not None:
        r = min(int(capacity), 2 * n)
        if not sliced:
            return LssSample(r, src, half, factor, p, fmax, count)
        return LssSample(r, src[:r], half[:r], factor[:r], p, fmax, count)
    r = int(count.item())  # the one sync: the size of the compacted operands
    return LssSample(r, src[:r], half[:r], factor[:r], p, fmax, count)


def lss_capacity(rows: int, keep_ratio: float) -> int:
    """Static number of compacted rows for sampling ``rows`` rows with Σ p = k = keep_ratio · rows: k plus
    8·sqrt(k) + 16, rounded up to a multiple of 16, at most ``rows``.

    The number kept is a sum of independent Bernoulli draws with mean <= k; by Chernoff's bound
    P(count >= k + t) <= exp(-t² / (2(k + t/3))), which for t = 8·sqrt(k) + 16 is below e^-32 (1e-14) for
    every k. Rows kept beyond the capacity (that improbable event) would be dropped.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if rows <= 0:
        return 0
    k = keep_ratio * rows
    cap = int(math.ceil(k + 8.0 * math.sqrt(k) + 16.0))
    return min(rows, -(-cap // 16) * 16)
