"""Triton kernels for the OneBit product from packed signs, y = h ⊙ ((x ⊙ g) · Sᵀ), fp32 accumulation.

Specification: ``lowbit.quant.binary.onebit_matmul_reference(x, signs_packed, g, h, n)`` (fp32 result);
with ``layernorm_eps`` the kernels also apply the OneBit post-LayerNorm (no affine, over the out dim, in
fp32), the specification of which is ``F.layer_norm(reference, (m,), eps=eps)``.

Layout. S (m × n, ±1) is read as ``lowbit.quant.pack_bits_int32`` lays it out: int32 words (m, ceil(n / 32)),
bit j of word i = element 32i + j, 1 = +1. ``pack_bits`` bytes (uint8, 8 per byte) are the same bits in
little-endian order, so a uint8 matrix whose rows are a whole number of words is used as int32 without a
copy (other uint8 matrices are padded to whole words first, which copies).

Two kernels, chosen by the number of tokens M (rows of x) in :func:`onebit_matmul`:

- ``_onebit_gemv_kernel`` (small M, CUDA cores): each program owns BLOCK_N rows of S and a K-range. The
  sign of each term is applied by XOR-ing bit j of the weight word onto the IEEE sign bit of the fp32 value
  x_k · g_k (one shift and one LOP3 per weight bit), and the terms are added in fp32. Every weight bit is
  read once per token. Split-K programs write fp32 partials; the last program of a tile (an acq_rel
  atomic counter) adds them in a fixed order, so the result is deterministic.
- ``_onebit_mm_kernel`` (tensor cores, any M): the weight tile is unpacked in registers straight into the
  bf16/fp16 bit pattern of ±g_k (a rotate puts bit j on the sign position, XOR with the bits of -g_k), so
  g is folded into the weights exactly (a ±g_k value is representable in g's dtype) and x is used as
  loaded; ``tl.dot`` accumulates in fp32. For fp32 x (or g of another dtype than x) x ⊙ g is formed in
  fp32 and split exactly into three bf16 parts (hi + mid + lo) against ±1 weights: three products whose
  sum is the fp32 product, since ±1 · bf16 is exact. With BLOCK_M = 16 and split-K this kernel is the
  tensor-core GEMV for 2..16 tokens; with large tiles it is the GEMM.

Epilogue (both kernels): multiply by h in fp32, cast to the output dtype. With ``LN`` the tile is written
in fp32 to a work buffer and the last program of the launch (a second counter) normalizes all rows, reading
a row of up to LN_ONE_PASS_MAX values once into registers (longer rows: twice, in chunks whose mean and
variance are merged, Chan et al. 1979); this single-program tail is only worth it for small M·m (decode),
which :func:`onebit_matmul` checks.

Counters live in a per-device, per-stream int32 buffer that every launch leaves at zero (the last program
resets what it used), so launches are CUDA-graph safe once the buffer exists: call once before capture.
Two launches in flight at once on one stream are ordered by the stream, so they cannot race.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

__all__ = [
    "HAS_TRITON",
    "VARIANTS",
    "VARIANT_M_RANGE",
    "GemvConfig",
    "LutConfig",
    "MMConfig",
    "OneBitPlan",
    "PlanesConfig",
    "UnpackMMConfig",
    "unpack_weight",
    "LN_FUSE_MAX_ELEMENTS",
    "as_int32_words",
    "onebit_gemv",
    "onebit_linear_packed",
    "onebit_matmul",
    "onebit_matmul_plan",
    "onebit_mm",
    "select_config",
    "triton_usable",
]

HAS_TRITON = triton is not None

#: Fuse the post-LayerNorm into the kernel when M · out_features is at most this (the normalization then
#: runs in one program at the end of the launch); larger outputs use F.layer_norm on the fp32 product.
LN_FUSE_MAX_ELEMENTS = 16384
#: The fused LayerNorm reads a row of N <= this many values once into registers (LN_BLOCK = next_pow2(N));
#: longer rows are read twice in chunks of this size (per-chunk mean and M2 merged, then normalize), holding
#: one chunk in registers at a time like the one-read path. 4096 fp32 are 32 registers per thread at
#: num_warps = 4. Checked offline (sm_90 ptxas -v, decode specializations): at 4096 the LN tail adds no
#: register to core1_n16_kw8 (95), planes_n64/n32_kw32 (168/128), planes_n128_kw32_w8 (178) or
#: tc16_n64_k256_swap (124); at 8192 core1_n16_kw8 rises to 128 and a num_warps = 2 GEMV spills.
LN_ONE_PASS_MAX = 4096

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:  # grid dependency control (programmatic dependent launch, sm_90+), Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton, or none
    gdc_launch_dependents = gdc_wait = None

if HAS_TRITON:
    _SIGN16 = tl.constexpr(-32768)  # 0x8000 as int16: the sign bit of a bf16 / fp16 value
    _MINUS_ONE_BF16 = tl.constexpr(-16512)  # 0xBF80 as int16: -1.0 in bf16


def triton_usable(device: torch.device | str) -> bool:
    """True when the kernels can run on ``device``: CUDA with Triton, or any device with
    ``TRITON_INTERPRET=1`` set when this module was imported (the CPU interpreter, slow: for tests)."""
    if not HAS_TRITON:
        return False
    if _INTERPRETED:
        return True
    return torch.device(device).type == "cuda"


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if HAS_TRITON:
    # The kernels call only Triton builtins and the @triton.jit helpers of this module (no tl.sum, tl.zeros,
    # tl.cdiv, which are themselves jit functions): a copy of this module imported with TRITON_INTERPRET=1
    # then runs in the CPU interpreter even when triton itself was imported without it (the tests do that).

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _dot(a, b, acc, F32_DOT: tl.constexpr):
        """acc + a @ b on tensor cores. F32_DOT (set only under TRITON_INTERPRET=1, whose CPU ``tl.dot``
        multiplies the raw uint16 patterns of bf16 operands) upcasts to fp32 first: same exact products."""
        if F32_DOT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _to_out(y, OUT_DTYPE: tl.constexpr):
        """fp32 -> output dtype, round to nearest even. bf16 is rounded by hand: the CPU interpreter truncates
        in ``.to(tl.bfloat16)``, the GPU rounds; the bit formula gives the GPU's result on both (finite y)."""
        if OUT_DTYPE == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(y == y, rounded, y.to(tl.bfloat16))  # NaN stays NaN
        else:
            return y.to(OUT_DTYPE)

    @triton.jit
    def _layernorm_row_in_registers(row, out_row, N, stride_on, eps, LN_BLOCK: tl.constexpr):
        """One row of N <= LN_BLOCK fp32 values: read once, mean and the two-pass variance from registers."""
        offs = tl.arange(0, LN_BLOCK)
        mask = offs < N
        v = tl.load(row + offs, mask=mask, other=0.0, cache_modifier=".cg")
        mean = tl.reduce(v, 0, _add) / N
        d = tl.where(mask, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.reduce(d * d, 0, _add) / N + eps)
        tl.store(out_row + offs * stride_on, _to_out(d * rstd, out_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _layernorm_row_chunked(row, out_row, N, stride_on, eps, LN_BLOCK: tl.constexpr):
        """One row of N > LN_BLOCK fp32 values in two reads of LN_BLOCK-chunks. Read 1: each chunk's count
        n_c, mean and M2_c = Σ(v - mean_c)² (two-pass, from registers), merged into the running (n, mean, M2)
        by Chan, Golub and LeVeque (1979): with δ = mean_c - mean, mean += δ·n_c/(n + n_c) and
        M2 += M2_c + δ²·n·n_c/(n + n_c), in fp32 (every term of M2 is >= 0, no cancellation). Read 2:
        normalize. The last chunk may be ragged (n_c = N - n); the first is full since N > LN_BLOCK."""
        offs = tl.arange(0, LN_BLOCK)
        v = tl.load(row + offs, cache_modifier=".cg")
        mean = tl.reduce(v, 0, _add) / LN_BLOCK
        d = v - mean
        m2 = tl.reduce(d * d, 0, _add)
        for n0 in range(LN_BLOCK, N, LN_BLOCK):
            mask = n0 + offs < N
            n_prev = n0 * 1.0  # fp32, exact (< 2^24); no .to(): the interpreter's loop index is a Python int
            n_c = tl.minimum(N - n0, LN_BLOCK).to(tl.float32)
            v = tl.load(row + n0 + offs, mask=mask, other=0.0, cache_modifier=".cg")
            mean_c = tl.reduce(v, 0, _add) / n_c
            d = tl.where(mask, v - mean_c, 0.0)
            m2_c = tl.reduce(d * d, 0, _add)
            delta = mean_c - mean
            step = delta * (n_c / (n_prev + n_c))
            mean += step
            m2 += m2_c + delta * step * n_prev  # δ·(δ·n_c/n)·n_prev = δ²·n_prev·n_c/n
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        for n0 in range(0, N, LN_BLOCK):
            mask = n0 + offs < N
            v = tl.load(row + n0 + offs, mask=mask, other=0.0, cache_modifier=".cg")
            z = _to_out((v - mean) * rstd, out_row.dtype.element_ty)
            tl.store(out_row + (n0 + offs) * stride_on, z, mask=mask)

    @triton.jit
    def _layernorm_rows(ypre_ptr, out_ptr, M, N, stride_om, stride_on, eps, LN_BLOCK: tl.constexpr):
        """out[m, :] = (y[m, :] - mean) / sqrt(var + eps) for every row of the fp32 (M, N) work buffer
        (biased variance, in fp32; the variance two-pass as F.layer_norm, or merged per chunk).

        The tail runs in one program after all tiles, so its dependent L2 round trips are the cost (decode
        is latency-bound): a row that fits one block (N <= LN_BLOCK, which the plan makes next_pow2(N) up to
        LN_ONE_PASS_MAX) is read once and both passes run on registers; a longer row is read twice in
        chunks (mean and variance merged per chunk, Chan et al. 1979; then normalize). The branch is on N,
        uniform across the program."""
        for m in range(0, M):
            row = ypre_ptr + m * N  # LN is fused only for small M·N (no int32 overflow)
            out_row = out_ptr + m * stride_om
            if N <= LN_BLOCK:
                _layernorm_row_in_registers(row, out_row, N, stride_on, eps, LN_BLOCK)
            else:
                _layernorm_row_chunked(row, out_row, N, stride_on, eps, LN_BLOCK)

    @triton.jit
    def _finish_tile(
        y, offs_m, offs_n, m_mask, n_mask, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr, cnt_ptr, n_units,
        M, N, ln_eps, LN: tl.constexpr, LN_BLOCK: tl.constexpr,
    ):
        """Epilogue of one finished (BM, BN) fp32 tile y = (x ⊙ g)·Sᵀ: ⊙ h, then store (or the LN tail)."""
        hv = tl.load(h_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y * hv[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if LN:
            tl.store(ypre_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y, mask=mask)
            # Slot n_units counts finished tiles; the last one (acquire: sees every tile) normalizes.
            done = tl.atomic_add(cnt_ptr + n_units, 1, sem="acq_rel")
            if done == n_units - 1:
                tl.atomic_xchg(cnt_ptr + n_units, 0)
                _layernorm_rows(ypre_ptr, out_ptr, M, N, stride_om, stride_on, ln_eps, LN_BLOCK)
        else:
            ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.store(ptrs, _to_out(y, out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _reduce_split_k(
        acc, tile_id, offs_m, offs_n, m_mask, n_mask, part_ptr, cnt_ptr, M, N, split_k, pid_k,
        h_ptr, out_ptr, stride_om, stride_on, ypre_ptr, n_units, ln_eps,
        LN: tl.constexpr, LN_BLOCK: tl.constexpr,
    ):
        """Split-K: store this program's fp32 partial; the last program of the tile sums the partials in
        order k = 0..split_k-1 (deterministic) and runs the epilogue."""
        mask = m_mask[:, None] & n_mask[None, :]
        tile_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        plane = M * N  # M may arrive as the constant 1 (Triton specializes it): no .to() on it
        tl.store(part_ptr + pid_k.to(tl.int64) * plane + tile_off, acc, mask=mask)
        done = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if done == split_k - 1:
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
            y = acc * 0.0
            ptrs = part_ptr + tile_off
            for _ in range(0, split_k):
                y += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                ptrs += plane
            _finish_tile(y, offs_m, offs_n, m_mask, n_mask, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr,
                         cnt_ptr, n_units, M, N, ln_eps, LN, LN_BLOCK)

    @triton.jit
    def _onebit_gemv_kernel(
        x_ptr, w_ptr, g_ptr, h_ptr, out_ptr, part_ptr, cnt_ptr, ypre_ptr,
        M, N, K, KW, kw_per_split, split_k, n_tiles,
        stride_xm, stride_xk, stride_wn, stride_om, stride_on,
        ln_eps,
        BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, LN: tl.constexpr, LN_BLOCK: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """CUDA-core GEMV: one token (row of x) × BLOCK_N rows of S × one K-range per program.

        grid = (M · n_tiles, split_k). acc holds Σ_k (bit ? -1 : +1)·(x_k g_k) = -(x ⊙ g)·Sᵀ per lane.
        """
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        j = tl.arange(0, 32)
        to_sign = 31 - j  # left shift that moves bit j onto bit 31 (the fp32 sign)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn  # rows past N: valid junk, not stored
        kw_lo = pid_k * kw_per_split
        kw_hi = tl.minimum(kw_lo + kw_per_split, KW)
        acc = tl.full((BLOCK_N, BLOCK_KW, 32), 0.0, tl.float32)
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            offs_kw = kw0 + tl.arange(0, BLOCK_KW)
            offs_k = offs_kw[:, None] * 32 + j[None, :]  # (BLOCK_KW, 32): k = 32·word + j
            if EVEN_K:  # whole blocks only: no masks
                w = tl.load(w_rows + offs_kw[None, :])
                xv = tl.load(x_row + offs_k * stride_xk).to(tl.float32)
                gv = tl.load(g_ptr + offs_k).to(tl.float32)
            else:  # x ⊙ g is 0 past K and past this split, so those words' bits multiply zeros
                kw_mask = offs_kw < kw_hi
                w = tl.load(w_rows + offs_kw[None, :], mask=kw_mask[None, :], other=0)
                k_mask = (offs_k < K) & kw_mask[:, None]
                xv = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
                gv = tl.load(g_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            xg_bits = (xv * gv).to(tl.int32, bitcast=True)  # exact fp32 x_k·g_k, as in the reference
            sign = (w[:, :, None] << to_sign[None, None, :]) & -2147483648  # bit j -> sign bit
            acc += (xg_bits[None, :, :] ^ sign).to(tl.float32, bitcast=True)
        y = -tl.reduce(tl.reduce(acc, 2, _add), 1, _add)  # (BLOCK_N,): (x ⊙ g)·Sᵀ
        offs_m = pid_m + tl.arange(0, 1)
        m_mask = offs_m < M
        y2 = tl.reshape(y, (1, BLOCK_N))
        n_units = M * n_tiles
        if split_k == 1:
            _finish_tile(y2, offs_m, offs_n, m_mask, n_mask, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr,
                         cnt_ptr, n_units, M, N, ln_eps, LN, LN_BLOCK)
        else:
            _reduce_split_k(y2, pid, offs_m, offs_n, m_mask, n_mask, part_ptr, cnt_ptr, M, N, split_k, pid_k,
                            h_ptr, out_ptr, stride_om, stride_on, ypre_ptr, n_units, ln_eps, LN, LN_BLOCK)

    # Unpacking a tile of words into one value per bit. Each of the 32 bit planes is computed with a
    # constant shift in the words' own register layout; tl.join stacks planes as new register-resident
    # dims, ordered so that the final reshape lists bit j of word i at column 32i + j (natural K order).
    # A thread thus holds whole runs of K: its stores to shared memory are vectorized, and no data moves
    # between threads.

    @triton.jit
    def _join1(w, J: tl.constexpr):
        """Bits J and J + 16 of each int32 word on bit 15 of two int16 values (last dim b4: bit J + 16·b4);
        the other bits are junk, masked off by the caller. One shift serves both halves."""
        s = w << (15 - J)
        return tl.join(s.to(tl.int16), (s >> 16).to(tl.int16))

    @triton.jit
    def _join2(w, J: tl.constexpr):  # dims (b4, b3): bit J + 8·b3 + 16·b4
        return tl.join(_join1(w, J), _join1(w, J + 8))

    @triton.jit
    def _join3(w, J: tl.constexpr):
        return tl.join(_join2(w, J), _join2(w, J + 4))

    @triton.jit
    def _join4(w, J: tl.constexpr):
        return tl.join(_join3(w, J), _join3(w, J + 2))

    @triton.jit
    def _unpack_bit15(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_K // 32) int32 words -> (BLOCK_N, BLOCK_K) int16 holding bit j of word i on bit 15
        at column 32i + j (other bits junk: mask with 0x8000).
        Dims after the joins: (n, word, b4, b3, b2, b1, b0) with bit j = 16·b4 + 8·b3 + 4·b2 + 2·b1 + b0."""
        t = tl.join(_join4(w, 0), _join4(w, 1))
        return tl.reshape(t, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _onebit_mm_kernel(
        x_ptr, w_ptr, g_ptr, h_ptr, out_ptr, part_ptr, cnt_ptr, ypre_ptr,
        M, N, K, KW, k_per_split, split_k,
        stride_xm, stride_xk, stride_wn, stride_om, stride_on,
        ln_eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT3: tl.constexpr, DOT_DTYPE: tl.constexpr, LN: tl.constexpr, LN_BLOCK: tl.constexpr,
        F32_DOT: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """Tensor-core product: (BLOCK_M × BLOCK_N) output tile per program, weight tiles unpacked on chip.

        grid = (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), split_k). Without SPLIT3, g_ptr points at the int16 bit
        patterns of g (dtype DOT_DTYPE = x's dtype) and the B tile is ±g; with SPLIT3, g_ptr is g itself and
        the B tile is ±1 in bf16 against the three bf16 parts of the fp32 x ⊙ g.
        """
        BLOCK_KW: tl.constexpr = BLOCK_K // 32
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        # Grouped order: GROUP_M row-tiles share each column of weight tiles while it sits in L2.
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # Rows past the end read row (index mod M) / (mod N) instead of being masked: valid data, results
        # dropped by the masked store, and no per-element masks in the loop.
        x_rows = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm
        w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if SWAP_AB:
            acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)  # yᵀ tile: the weights are the MMA's A operand
        else:
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            offs_kw = k0 // 32 + tl.arange(0, BLOCK_KW)
            if EVEN_K:  # every K block is whole: no masks
                xt = tl.load(x_rows + offs_k[None, :] * stride_xk)
                w = tl.load(w_rows + offs_kw[None, :])
            else:  # x past k_hi reads 0, so the junk bits there multiply zeros
                xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_rows + offs_kw[None, :], mask=(offs_kw < KW)[None, :], other=0)
            bits = _unpack_bit15(w, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K) int16, bit 15 set where S = +1
            if SPLIT3:
                # 0xBF80 = -1.0 in bf16; bit set -> +1.0
                b_t = tl.trans(((bits & _SIGN16) ^ _MINUS_ONE_BF16).to(tl.bfloat16, bitcast=True))
                if EVEN_K:
                    gv = tl.load(g_ptr + offs_k).to(tl.float32)
                else:
                    gv = tl.load(g_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                xg = xt.to(tl.float32) * gv[None, :]
                hi = xg.to(tl.bfloat16)
                r = xg - hi.to(tl.float32)
                mid = r.to(tl.bfloat16)
                lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
                acc = _dot(hi, b_t, acc, F32_DOT)
                acc = _dot(mid, b_t, acc, F32_DOT)
                acc = _dot(lo, b_t, acc, F32_DOT)
            else:
                if EVEN_K:
                    g_neg = tl.load(g_ptr + offs_k) ^ _SIGN16  # int16 bits of -g_k
                else:
                    g_neg = tl.load(g_ptr + offs_k, mask=k_mask, other=0) ^ _SIGN16
                b = ((bits & _SIGN16) ^ g_neg[None, :]).to(DOT_DTYPE, bitcast=True)  # ±g_k, + where bit 1
                if SWAP_AB:
                    acc = _dot(b, tl.trans(xt), acc, F32_DOT)
                else:
                    acc = _dot(xt, tl.trans(b), acc, F32_DOT)
        n_units = num_m * num_n
        if SWAP_AB:
            acc = tl.trans(acc)
        if split_k == 1:
            _finish_tile(acc, offs_m, offs_n, m_mask, n_mask, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr,
                         cnt_ptr, n_units, M, N, ln_eps, LN, LN_BLOCK)
        else:
            _reduce_split_k(acc, pid, offs_m, offs_n, m_mask, n_mask, part_ptr, cnt_ptr, M, N, split_k, pid_k,
                            h_ptr, out_ptr, stride_om, stride_on, ypre_ptr, n_units, ln_eps, LN, LN_BLOCK)


    # --------------------------------------------------------------------------- bit-plane GEMV (CUDA cores)

    @triton.jit
    def _xg_planes_kernel(x_ptr, g_ptr, xgp_ptr, K, KWP, stride_xm, stride_xk, BLOCK_W: tl.constexpr):
        """xgp[m, j, i] = x[m, 32 i + j] · g[32 i + j] in fp32 (0 past K), for i < KWP: the bit planes of
        x ⊙ g. grid = (M, cdiv(KWP, BLOCK_W)). The product is the reference's fp32 product, bit for bit."""
        pid_m = tl.program_id(0)
        pid_w = tl.program_id(1)
        offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        j = tl.arange(0, 32)
        offs_k = offs_w[:, None] * 32 + j[None, :]  # (BLOCK_W, 32), contiguous along j
        k_mask = offs_k < K
        xv = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0)
        gv = tl.load(g_ptr + offs_k, mask=k_mask, other=0.0)
        xg = xv.to(tl.float32) * gv.to(tl.float32)
        dst = xgp_ptr + pid_m.to(tl.int64) * 32 * KWP + j[None, :] * KWP + offs_w[:, None]
        tl.store(dst, xg, mask=(offs_w < KWP)[:, None])

    @triton.jit
    def _onebit_planes_kernel(
        xgp_ptr, w_ptr, h_ptr, out_ptr, part_ptr, cnt_ptr, ypre_ptr,
        M, N, KW, KWP, kw_per_split, split_k,
        stride_wn, stride_om, stride_on,
        ln_eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
        LN: tl.constexpr, LN_BLOCK: tl.constexpr,
    ):
        """Bit-plane GEMV: BLOCK_N rows of S × one K-range per program, every token of x (M <= BLOCK_M).

        The weight tile is held as (BLOCK_N, BLOCK_KW) words, each thread a few whole words (16-byte loads);
        the next tile is loaded before the current one is used (software pipelining by hand, so that many
        bytes are in flight whatever the compiler's pipeliner does). For bit plane j (a static loop),
        xgp[m, j, words] is one contiguous vector, shared by all rows of a thread, and the signed term is
        bits(x_k g_k) XOR (word << (31 - j) & 0x80000000): a shift, a LOP3 and an fp32 add per weight bit.
        The lanes hold -(x ⊙ g)·Sᵀ (a set bit, +1, flips the sign), negated at the end.
        grid = (cdiv(N, BLOCK_N), split_k); kw_per_split is a multiple of BLOCK_KW.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn
        kw_lo = pid_k * kw_per_split
        kw_hi = tl.minimum(kw_lo + kw_per_split, KW)
        offs_w = tl.arange(0, BLOCK_KW)
        offs_m = tl.arange(0, BLOCK_M)
        tile = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for m in range(0, M):
            xg_row = xgp_ptr + m * 32 * KWP
            acc = tl.full((BLOCK_N, BLOCK_KW), 0.0, tl.float32)
            # masked-off words (past this split) are not read: no memory traffic; xgp is 0 past K
            w = tl.load(w_rows + (kw_lo + offs_w)[None, :], mask=(kw_lo + offs_w < kw_hi)[None, :], other=0)
            for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
                nxt = kw0 + BLOCK_KW + offs_w
                w_next = tl.load(w_rows + nxt[None, :], mask=(nxt < kw_hi)[None, :], other=0)
                for j in tl.static_range(32):
                    xgj = tl.load(xg_row + j * KWP + kw0 + offs_w).to(tl.int32, bitcast=True)
                    sign = (w << (31 - j)) & -2147483648  # bit j -> the fp32 sign bit
                    acc += (xgj[None, :] ^ sign).to(tl.float32, bitcast=True)
                w = w_next
            y = -tl.reduce(acc, 1, _add)  # (BLOCK_N,): (x_m ⊙ g)·Sᵀ
            tile = tl.where(offs_m[:, None] == m, y[None, :], tile)
        m_mask = offs_m < M
        if split_k == 1:
            _finish_tile(tile, offs_m, offs_n, m_mask, n_mask, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr,
                         cnt_ptr, (N + BLOCK_N - 1) // BLOCK_N, M, N, ln_eps, LN, LN_BLOCK)
        else:
            _reduce_split_k(tile, pid_n, offs_m, offs_n, m_mask, n_mask, part_ptr, cnt_ptr, M, N, split_k,
                            pid_k, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr,
                            (N + BLOCK_N - 1) // BLOCK_N, ln_eps, LN, LN_BLOCK)

    # --------------------------------------------------------------------------- LUT GEMV (CUDA cores)

    @triton.jit
    def _xg_lut_kernel(x_ptr, g_ptr, lut_ptr, K, KT, stride_xm, stride_xk, BLOCK_B: tl.constexpr,
                       BITS: tl.constexpr, PDL: tl.constexpr = False):
        """lut[m, i, b] = Σ_{t<BITS} (bit t of b ? +1 : -1) · a[m, BITS·i + t] for every BITS-bit value b and
        i < KT: one table of 2^BITS signed partial sums per BITS inputs. a_k = fp32(x_k) · fp32(g_k), the
        reference's product (0 past K, so tables past K are all zeros); each entry is summed in fp32 from
        0.0 in the order t = 0, 1, ..., BITS - 1. grid = (M, cdiv(KT, BLOCK_B)). PDL: let the GEMV that
        follows (launched as a programmatic dependent) start now; it waits for these tables itself."""
        TABLE: tl.constexpr = 1 << BITS
        if PDL:
            gdc_launch_dependents()
        pid_m = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_i = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        b = tl.arange(0, TABLE)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc = tl.full((BLOCK_B, TABLE), 0.0, tl.float32)
        for t in tl.static_range(BITS):
            k = offs_i * BITS + t
            k_mask = k < K
            xg = tl.load(x_row + k * stride_xk, mask=k_mask, other=0.0).to(tl.float32) * tl.load(
                g_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            bit = (b >> t) & 1
            acc += tl.where(bit[None, :] == 1, xg[:, None], -xg[:, None])
        dst = lut_ptr + pid_m.to(tl.int64) * KT * TABLE + offs_i[:, None] * TABLE + b[None, :]
        tl.store(dst, acc, mask=(offs_i < KT)[:, None])

    @triton.jit
    def _lut_field_offset(w, SHIFT: tl.constexpr, MASK: tl.constexpr):
        """(w >> SHIFT) & MASK, SHIFT < 0 meaning a left shift: the byte offset of a table entry."""
        if SHIFT >= 0:
            return (w >> SHIFT) & MASK
        else:
            return (w << -SHIFT) & MASK

    @triton.jit
    def _onebit_lut_kernel(
        lut_ptr, w_ptr, h_ptr, out_ptr, part_ptr, cnt_ptr, ypre_ptr,
        M, N, KW, KT, kw_per_split, split_k,
        stride_wn, stride_om, stride_on,
        ln_eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, BITS: tl.constexpr,
        VEC: tl.constexpr, LN: tl.constexpr, LN_BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """LUT GEMV: each BITS-bit field of a weight word selects one of 2^BITS precomputed partial sums of
        BITS terms (``_xg_lut_kernel``), so a field costs an extract, one gather and one fp32 add.

        Layout. The (BLOCK_N, BLOCK_KW) weight tile is held as GROUPS · BLOCK_N rows of WV = 4 words (one
        16-byte load; WV = BLOCK_KW below 4), tile row r = word group r // BLOCK_N of weight row
        r % BLOCK_N: Triton's coalescing then gives sizePerThread [1, 4], threadsPerWarp [32, 1] (a thread on
        one row, a warp's 32 lanes on 32 consecutive rows of one group, along N; a (BLOCK_N, BLOCK_KW) tile
        with BLOCK_KW = 8 would get [16, 2], lanes on two word columns). For field t of word column c all
        lanes of a warp thus gather from the one table of input position (word kw0 + c, field t), the same
        for the whole CTA: with BITS = 4, 16 fp32 = 64 bytes, one L1 wavefront per warp load. The next tile
        is loaded before the current one is used (as ``_onebit_planes_kernel``); PREFETCH = False (a split of
        one tile: every weight byte of the program is requested by its first load) skips that load. The first
        tile is loaded once for all tokens, and with PDL (launched as a programmatic dependent of
        ``_xg_lut_kernel``) before waiting for the tables: the weights stream in while they are built.

        Addresses. The buffer is TABLE_BYTES-aligned and no row of it crosses a 2^32-byte boundary
        (``_lut_buffer``), so an entry's address is the high half of the row's address and the low half of
        its word's tables OR-ed with the field's byte offset (w >> (BITS·t - 2)) & (TABLE_BYTES - 4): a shift
        and one LOP3 instead of an extract and a 64-bit add; t·TABLE_BYTES is the load's immediate offset.
        sm_90 SASS per field: shift, LOP3, LDG, FADD and (mostly) a copy of the high half into the address's
        register pair (LDG has no 32-bit-offset form); about 1.3 instructions per weight bit at BITS = 4.

        Masks. The tables are padded with zeros to whole BLOCK_KW blocks of words, and words past this split
        read as 0 (entry 0 of a table of zeros past K; no tile straddles two splits, kw_per_split being a
        multiple of BLOCK_KW), so the gathers need none. VEC: every tile is whole (KW % BLOCK_KW == 0) and
        rows start at 16-byte multiples (stride_wn % 4 == 0): tile-uniform word masks, 16-byte loads.
        grid = (cdiv(N, BLOCK_N), split_k)."""
        TABLE: tl.constexpr = 1 << BITS
        TABLE_BYTES: tl.constexpr = 4 * TABLE
        WORD_BYTES: tl.constexpr = (32 // BITS) * TABLE_BYTES  # the tables of one word
        WV: tl.constexpr = 4 if BLOCK_KW >= 4 else BLOCK_KW
        GROUPS: tl.constexpr = BLOCK_KW // WV
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # What the plan guarantees, written so that Triton's alignment analysis sees it (tl.multiple_of does
        # not attach to an argument): a whole number of blocks per split, rows at 16-byte multiples.
        kw_per_split = kw_per_split // BLOCK_KW * BLOCK_KW
        if VEC:
            stride_wn = stride_wn // 4 * 4
        offs_r = tl.arange(0, GROUPS * BLOCK_N)
        col = (offs_r // BLOCK_N)[:, None] * WV + tl.arange(0, WV)[None, :]  # word column in the tile
        rows = (pid_n * BLOCK_N + offs_r % BLOCK_N) % N  # rows past N: valid junk, not stored
        w_tile = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + col
        col_bytes = col * WORD_BYTES
        whole = tl.full((GROUPS * BLOCK_N, WV), 1, tl.int1)  # VEC masks: a scalar condition broadcast here
        kw_lo = pid_k * kw_per_split
        kw_hi = tl.minimum(kw_lo + kw_per_split, KW)
        offs_m = tl.arange(0, BLOCK_M)
        tile = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        if VEC:
            w_first = tl.load(w_tile + kw_lo, mask=whole & (kw_lo < kw_hi), other=0)
        else:
            w_first = tl.load(w_tile + kw_lo, mask=kw_lo + col < kw_hi, other=0)
        if PDL:
            gdc_wait()  # the tables of _xg_lut_kernel are written and visible from here on
        for m in range(0, M):
            row_addr = (lut_ptr + m * KT * TABLE).to(tl.int64)
            row_hi = row_addr & -4294967296  # 0xFFFFFFFF00000000
            row_lo = row_addr.to(tl.int32)
            acc = tl.full((GROUPS * BLOCK_N, WV), 0.0, tl.float32)
            w = w_first
            for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
                nxt = kw0 + BLOCK_KW
                if not PREFETCH:
                    w_next = w
                elif VEC:
                    w_next = tl.load(w_tile + nxt, mask=whole & (nxt < kw_hi), other=0)
                else:
                    w_next = tl.load(w_tile + nxt, mask=nxt + col < kw_hi, other=0)
                tables = row_lo + kw0 * WORD_BYTES + col_bytes  # low half of each word's first table
                for t in tl.static_range(32 // BITS):
                    lo = tables | _lut_field_offset(w, BITS * t - 2, TABLE_BYTES - 4)
                    entry = row_hi | lo.to(tl.uint32).to(tl.int64)
                    acc += tl.load(entry.to(tl.pointer_type(tl.float32)) + t * TABLE)
                w = w_next
            y = tl.reduce(tl.reshape(tl.reduce(acc, 1, _add), (GROUPS, BLOCK_N)), 0, _add)  # (x_m ⊙ g)·Sᵀ
            tile = tl.where(offs_m[:, None] == m, y[None, :], tile)
        m_mask = offs_m < M
        if split_k == 1:
            _finish_tile(tile, offs_m, offs_n, m_mask, n_mask, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr,
                         cnt_ptr, (N + BLOCK_N - 1) // BLOCK_N, M, N, ln_eps, LN, LN_BLOCK)
        else:
            _reduce_split_k(tile, pid_n, offs_m, offs_n, m_mask, n_mask, part_ptr, cnt_ptr, M, N, split_k,
                            pid_k, h_ptr, out_ptr, stride_om, stride_on, ypre_ptr,
                            (N + BLOCK_N - 1) // BLOCK_N, ln_eps, LN, LN_BLOCK)

    # --------------------------------------------------------------------------- unpack, then cuBLAS

    @triton.jit
    def _unpack_weight_kernel(
        w_ptr, g_ptr, wd_ptr, h_ptr, N, K, KW, stride_wn, stride_dn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr, FOLD_H: tl.constexpr,
        DTYPE16: tl.constexpr,
    ):
        """wd[n, k] = S[n, k] · g[k] (exact: ±g_k). WIDE: fp32 values (g_ptr any float dtype, wd_ptr int32
        view); else g_ptr and wd_ptr are int16 views of one 16-bit dtype (DTYPE16). FOLD_H (16-bit only):
        wd[n, k] = S[n, k] · RN(h[n] · g[k]), h_ptr of the same 16-bit dtype (the fp32 product is exact,
        then one rounding to nearest even).
        grid = (cdiv(N, BN), cdiv(K, BK))."""
        BLOCK_KW: tl.constexpr = BLOCK_K // 32
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_kw = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_kw[None, :],
                    mask=n_mask[:, None] & (offs_kw < KW)[None, :], other=0)
        bits = _unpack_bit15(w, BLOCK_N, BLOCK_K)  # bit 15 set where S = +1
        dst = wd_ptr + offs_n.to(tl.int64)[:, None] * stride_dn + offs_k[None, :]
        mask = n_mask[:, None] & k_mask[None, :]
        if WIDE:
            g_neg = tl.load(g_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
            g_neg = g_neg ^ -2147483648
            tl.store(dst, (bits.to(tl.int32) & -2147483648) ^ g_neg[None, :], mask=mask)
        elif FOLD_H:
            gv = tl.load(g_ptr + offs_k, mask=k_mask, other=0).to(DTYPE16, bitcast=True).to(tl.float32)
            hv = tl.load(h_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            hg = _to_out(hv[:, None] * gv[None, :], DTYPE16).to(tl.int16, bitcast=True)
            tl.store(dst, (bits & _SIGN16) ^ (hg ^ _SIGN16), mask=mask)
        else:
            g_neg = tl.load(g_ptr + offs_k, mask=k_mask, other=0) ^ _SIGN16
            tl.store(dst, (bits & _SIGN16) ^ g_neg[None, :], mask=mask)

    @triton.jit
    def _rows_epilogue_kernel(
        acc_ptr, h_ptr, out_ptr, N, stride_am, stride_om, ln_eps, LN: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """out[m, :] = cast(LN?(acc[m, :] · h)), h and the LayerNorm in fp32 (two passes, as F.layer_norm).
        grid = (M,) with LN (one program per row), else (M, cdiv(N, BLOCK))."""
        pid_m = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        a_row = acc_ptr + pid_m.to(tl.int64) * stride_am
        o_row = out_ptr + pid_m.to(tl.int64) * stride_om
        if LN:
            s1 = tl.full((BLOCK,), 0.0, tl.float32)
            for n0 in range(0, N, BLOCK):
                mask = n0 + offs < N
                hv = tl.load(h_ptr + n0 + offs, mask=mask, other=0.0).to(tl.float32)
                s1 += tl.load(a_row + n0 + offs, mask=mask, other=0.0).to(tl.float32) * hv
            mean = tl.reduce(s1, 0, _add) / N
            s2 = tl.full((BLOCK,), 0.0, tl.float32)
            for n0 in range(0, N, BLOCK):
                mask = n0 + offs < N
                hv = tl.load(h_ptr + n0 + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(a_row + n0 + offs, mask=mask, other=0.0).to(tl.float32) * hv
                d = tl.where(mask, v - mean, 0.0)
                s2 += d * d
            rstd = 1.0 / tl.sqrt(tl.reduce(s2, 0, _add) / N + ln_eps)
            for n0 in range(0, N, BLOCK):
                mask = n0 + offs < N
                hv = tl.load(h_ptr + n0 + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(a_row + n0 + offs, mask=mask, other=0.0).to(tl.float32) * hv
                tl.store(o_row + n0 + offs, _to_out((v - mean) * rstd, out_ptr.dtype.element_ty), mask=mask)
        else:
            offs_n = tl.program_id(1) * BLOCK + offs
            mask = offs_n < N
            hv = tl.load(h_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(a_row + offs_n, mask=mask, other=0.0).to(tl.float32) * hv
            tl.store(o_row + offs_n, _to_out(v, out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class GemvConfig:
    """Tile of the CUDA-core GEMV: BLOCK_N rows of S, BLOCK_KW words (32·BLOCK_KW of K) per step;
    split_k = 0 picks it from the shape."""

    block_n: int = 32
    block_kw: int = 8
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class MMConfig:
    """Tile of the tensor-core kernel; split_k = 0 picks it from the shape (1 when the tiles fill the GPU)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    split_k: int = 0
    num_warps: int = 8
    num_stages: int = 3
    swap_ab: bool = False  # weights as the MMA's A operand (yᵀ = S·(x ⊙ g)ᵀ): for few tokens


@dataclass(frozen=True)
class PlanesConfig:
    """Bit-plane CUDA-core GEMV (``_onebit_planes_kernel``): BLOCK_N rows × BLOCK_KW words per program step;
    split_k = 0 splits K until there are about ``waves`` programs per SM."""

    block_n: int = 64
    block_kw: int = 32
    split_k: int = 0
    waves: int = 4
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class LutConfig:
    """LUT CUDA-core GEMV (``_onebit_lut_kernel``): per ``bits`` inputs a table of the 2^bits signed partial
    sums, one gather and one add per ``bits``-bit field of a weight word. bits = 4 (nibbles): 64-byte tables,
    one L1 wavefront per warp gather; bits = 8 (bytes): 1 KB tables, up to 8 lines per warp gather. Tiles
    (BLOCK_N rows × BLOCK_KW words, a power of two) and split_k as :class:`PlanesConfig`."""

    block_n: int = 64
    block_kw: int = 16
    bits: int = 4
    split_k: int = 0
    waves: int = 4
    num_warps: int = 4
    num_stages: int = 1
    pdl: bool = False  # launch the GEMV as a programmatic dependent of the tables' kernel (where supported)


@dataclass(frozen=True)
class UnpackMMConfig:
    """Unpack S ⊙ g to a dense weight (x's 16-bit dtype, exact), cuBLAS ``x @ Wᵀ``, then one row pass for
    h (and the LayerNorm). ``fp32_acc``: ask cuBLAS for the fp32 result (``torch.mm(..., out_dtype=)``)
    instead of rounding it to x's dtype before h; falls back where that overload is missing. ``fold_h``
    (used where x, g and h share one 16-bit dtype, the result is that dtype and there is no LayerNorm):
    the dense weight is S ⊙ RN(h gᵀ), one rounding per weight, and cuBLAS's result is the output: no row
    pass (|Δy| <= u_x·Σ_k |x_k g_k h_n| more than the fp32 bound, plus the output rounding)."""

    block_n: int = 64
    block_k: int = 256
    num_warps: int = 4
    fp32_acc: bool = False
    fold_h: bool = False


#: Number of tokens up to which the CUDA-core GEMVs are used (measured: M = 1 only; tc16 wins from M = 4).
GEMV_CORE_MAX_M = 1
#: Weights of at most this many elements (N·K) take the plain CUDA-core GEMV at M = 1 (measured faster than
#: the bit-plane kernel at 576×1536 and 1536×576, whose split-K and plane pass cost more than they save).
GEMV_SMALL_WEIGHT = 1 << 20
#: Up to this many elements, when K <= N, too (measured at 2048×2048, SmolLM2-1.7B's attention projections:
#: 5.4 µs against the bit-plane kernel's 6.3; at 8192×2048, K > N, the single-split GEMV took 19.3 µs).
GEMV_SQUARE_WEIGHT = 1 << 22
#: From this many elements (N·K) the M = 1 rule takes the nibble-LUT GEMV (``lut4_n64_kw8_pdl``; measured,
#: H100: 4096×11008 11.3–11.8 µs against the bit-plane kernel's 13.2–13.4, 8192×8192 14.6–14.8 against
#: 15.4–15.6; at 2^22–2^24 elements a tie or up to 0.4 µs slower).
GEMV_LUT_MIN_WEIGHT = 1 << 25
#: Number of tokens up to which the tensor-core kernel runs with BLOCK_M = 16 and split-K (GEMV regime).
GEMV_TC_MAX_M = 16
#: Number of tokens from which the unpack-then-cuBLAS path is used (below: the Triton tensor-core GEMM).
UNPACK_MM_MIN_M = 128
_SM_COUNT_DEFAULT = 132

#: Every named variant (the probe and the tests run them all): name -> config. ``VARIANT_M_RANGE`` gives
#: the token counts each one is meant for (all of them compute any M correctly).
VARIANTS: dict = {
    "planes_n64_kw32": PlanesConfig(block_n=64, block_kw=32, num_warps=4),
    "planes_n128_kw32_w8": PlanesConfig(block_n=128, block_kw=32, num_warps=8),
    "planes_n32_kw32": PlanesConfig(block_n=32, block_kw=32, num_warps=4),
    "planes_n64_kw16_x8": PlanesConfig(block_n=64, block_kw=16, waves=8, num_warps=4),
    "lut_n64_kw16": LutConfig(block_n=64, block_kw=16, bits=8, num_warps=4),
    "lut4_n128_kw4": LutConfig(block_n=128, block_kw=4, num_warps=4),
    "lut4_n256_kw4_w8": LutConfig(block_n=256, block_kw=4, num_warps=8),
    "lut4_n64_kw8": LutConfig(block_n=64, block_kw=8, num_warps=4),
    "lut4_n128_kw8": LutConfig(block_n=128, block_kw=8, num_warps=4),
    "lut4_n64_kw16": LutConfig(block_n=64, block_kw=16, num_warps=4),  # 32 weight bytes in flight per thread
    "lut4_n128_kw4_x8": LutConfig(block_n=128, block_kw=4, waves=8, num_warps=4),  # twice the programs
    # eighth round: a split's weights in one tile, all requested by the first load (measured slower: 14.3 /
    # 21.7 µs against lut4_n64_kw8's 8.1 / 11.5 at 4096² / 4096×11008); and the tables' kernel overlapped
    # with the GEMV's first weight tile by a programmatic dependent launch (0.2–0.4 µs faster)
    "lut4_n32_kw64": LutConfig(block_n=32, block_kw=64, num_warps=4),
    "lut4_n64_kw8_pdl": LutConfig(block_n=64, block_kw=8, num_warps=4, pdl=True),
    "core_n32_kw8": GemvConfig(block_n=32, block_kw=8, num_warps=4),
    "tc16_n64_k256": MMConfig(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4),
    "tc16_n128_k128": MMConfig(block_m=16, block_n=128, block_k=128, group_m=1, num_warps=4),
    "tc16_n64_k256_swap": MMConfig(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4, swap_ab=True),
    "tc16_n128_k256_swap_w8": MMConfig(block_m=16, block_n=128, block_k=256, group_m=1, num_warps=8,
                                       swap_ab=True),
    "tc_m64_n128_k64": MMConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    "tc_m128_n128_k64_w8": MMConfig(block_m=128, block_n=128, block_k=64, num_warps=8),
    "unpack_mm": UnpackMMConfig(),
    "unpack_mm_f32acc": UnpackMMConfig(fp32_acc=True),
    "unpack_mm_hfold": UnpackMMConfig(fold_h=True),
    # Single-launch variants for few tokens (third round, measured): no pre-kernel and, with
    # split_k = 1, no split-K partials either (h and the fused post-LN are in the same launch).
    "core1_n32_kw8": GemvConfig(block_n=32, block_kw=8, split_k=1, num_warps=4),
    "core1_n16_kw8": GemvConfig(block_n=16, block_kw=8, split_k=1, num_warps=4),
    "core1_n64_kw8_w8": GemvConfig(block_n=64, block_kw=8, split_k=1, num_warps=8),
}
VARIANT_M_RANGE: dict = {
    "planes_n64_kw32": (1, 16), "planes_n128_kw32_w8": (1, 16), "planes_n32_kw32": (1, 16),
    "planes_n64_kw16_x8": (1, 16), "lut_n64_kw16": (1, 4), "core_n32_kw8": (1, 2),
    "lut4_n128_kw4": (1, 4), "lut4_n256_kw4_w8": (1, 4), "lut4_n64_kw8": (1, 4), "lut4_n128_kw8": (1, 4),
    "lut4_n64_kw16": (1, 4), "lut4_n128_kw4_x8": (1, 4), "lut4_n32_kw64": (1, 4), "lut4_n64_kw8_pdl": (1, 4),
    "tc16_n64_k256": (2, 16), "tc16_n128_k128": (2, 16), "tc16_n64_k256_swap": (2, 16),
    "tc16_n128_k256_swap_w8": (2, 16), "tc_m64_n128_k64": (17, 1 << 30), "tc_m128_n128_k64_w8": (17, 1 << 30),
    "unpack_mm": (1, 1 << 30), "unpack_mm_f32acc": (1, 1 << 30), "unpack_mm_hfold": (1, 1 << 30),
    "core1_n32_kw8": (1, 2), "core1_n16_kw8": (1, 2), "core1_n64_kw8_w8": (1, 2),
}


def select_config(m: int, n_out: int, k: int, sm_count: int = _SM_COUNT_DEFAULT):
    """The kernel and tile :func:`onebit_matmul` uses for ``m`` tokens, ``n_out`` outputs and K = ``k``.

    The rule comes from the H100 measurements in docs/kernels-onebit.md ("Dispatch rule"):

    - M = 1: the CUDA-core GEMVs. Small weights (N·K <= 2^20, SmolLM2's projections; or N·K <= 2^22 with
      K <= N) ``core1_n16_kw8`` (one launch, split-K 1: 3.0 / 3.9 µs against ``core_n32_kw8``'s 3.6 / 5.1
      at 576×1536 / 1536×576, 5.4 against the bit-plane kernel's 6.3 at 2048×2048);
      N·K >= 2^25 (GEMV_LUT_MIN_WEIGHT) the nibble-LUT GEMV ``lut4_n64_kw8_pdl`` (seventh round: 1.3
      instructions per weight bit against the bit planes' 3.2; 10–15 % faster at 4096×11008 and 8192²;
      eighth round: launched as a programmatic dependent of its tables' kernel, 0.2–0.4 µs less);
      else K > N ``planes_n32_kw32``; else ``planes_n64_kw32``.
    - 2 <= M <= 16: tensor cores, 16-row tiles. ``tc16_n64_k256_swap``, unless its 64-row tiles alone fill
      the GPU (cdiv(N, 64) >= SMs: no split-K, 1.3 waves at N = 11008), then ``tc16_n128_k128``.
    - 17 <= M < UNPACK_MM_MIN_M: ``tc_m64_n128_k64``; from UNPACK_MM_MIN_M: unpack, then cuBLAS; for
      small weights (N·K <= GEMV_SMALL_WEIGHT) with h folded into the dense weight (``unpack_mm_hfold``,
      where it applies: no row pass; at M = 4096, 17.5 / 15.6 µs against ``unpack_mm``'s 25.4 / 19.0 at
      576×1536 / 1536×576; on the large shapes within ±10 % of ``unpack_mm``, so not used there).
    """
    if m <= GEMV_CORE_MAX_M:
        if n_out * k <= GEMV_SMALL_WEIGHT or (n_out * k <= GEMV_SQUARE_WEIGHT and k <= n_out):
            return VARIANTS["core1_n16_kw8"]
        if n_out * k >= GEMV_LUT_MIN_WEIGHT:
            return VARIANTS["lut4_n64_kw8_pdl"]
        return VARIANTS["planes_n32_kw32" if k > n_out else "planes_n64_kw32"]
    if m <= GEMV_TC_MAX_M:
        if -(-n_out // 64) >= sm_count:
            return VARIANTS["tc16_n128_k128"]
        return VARIANTS["tc16_n64_k256_swap"]
    if m < UNPACK_MM_MIN_M:
        return VARIANTS["tc_m64_n128_k64"]
    if n_out * k <= GEMV_SMALL_WEIGHT:
        return VARIANTS["unpack_mm_hfold"]
    return VARIANTS["unpack_mm"]


def _as_config(config):
    """A config object from a VARIANTS name or a config (None: the dispatcher decides)."""
    if config is None or isinstance(config, (GemvConfig, MMConfig, PlanesConfig, LutConfig, UnpackMMConfig)):
        return config
    if isinstance(config, str) and config in VARIANTS:
        return VARIANTS[config]
    raise ValueError(f"config must be a name in VARIANTS ({', '.join(VARIANTS)}) or a config object, "
                     f"got {config!r}")


def _auto_split_k(tiles: int, k_steps: int, sm_count: int, max_split: int = 16) -> int:
    """Split K until there are about two programs per SM, keeping at least two K steps per program."""
    if tiles >= sm_count or k_steps < 4:
        return 1
    split = min(max_split, -(-2 * sm_count // tiles), k_steps // 2)
    return max(split, 1)


# ------------------------------------------------------------------------------------------------ host side


class _Workspace:
    """Scratch shared by the launches of one (device, stream), each used only inside one launch: int32
    counters (every launch leaves those it used at zero), an fp32 buffer for the fused LayerNorm's pre-LN
    values (written by the tiles, read by the last program of the same launch) and a 1-element dummy for
    pointer arguments a launch does not use. Launches on one stream are ordered, so they can share it."""

    __slots__ = ("cnt", "ypre", "dummy")

    def __init__(self, device: torch.device, n_cnt: int, n_ypre: int):
        self.cnt = torch.zeros(max(n_cnt, 1024), dtype=torch.int32, device=device)
        self.ypre = torch.empty(max(n_ypre, LN_FUSE_MAX_ELEMENTS), dtype=torch.float32, device=device)
        self.dummy = torch.empty(1, dtype=torch.float32, device=device)


_WORKSPACES: dict = {}
# Replaced workspaces stay alive: a CUDA graph captured with one keeps using its addresses.
_RETIRED_WORKSPACES: list = []
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream_id(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    if _raw_stream is not None:  # what Triton's launcher itself calls: no Stream object
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _workspace(device: torch.device, n_cnt: int, n_ypre: int) -> _Workspace:
    key = (device, _current_stream_id(device))
    ws = _WORKSPACES.get(key)
    if ws is None or ws.cnt.numel() < n_cnt or ws.ypre.numel() < n_ypre:
        if ws is not None:
            _RETIRED_WORKSPACES.append(ws)
            n_cnt, n_ypre = max(n_cnt, ws.cnt.numel()), max(n_ypre, ws.ypre.numel())
        ws = _WORKSPACES[key] = _Workspace(device, n_cnt, n_ypre)
    return ws


def as_int32_words(signs_packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed signs as int32 words (m, ceil(n / 32)) in the ``pack_bits_int32`` layout.

    int32 input is returned as is; uint8 (``pack_bits``, (m, ceil(n / 8))) is reinterpreted without a copy
    when a row is a whole number of words and 4-byte aligned, else padded with zero bytes (a copy; the
    padding bits lie past n and are never used).
    """
    if not isinstance(signs_packed, torch.Tensor) or signs_packed.dtype not in (torch.uint8, torch.int32):
        got = getattr(signs_packed, "dtype", type(signs_packed).__name__)
        raise TypeError(f"signs_packed must be a uint8 (8 per byte) or int32 (32 per word) tensor, got {got}")
    if signs_packed.ndim != 2:
        raise ValueError(f"signs_packed must be 2-D (m, packed_n), got shape {tuple(signs_packed.shape)}")
    per = 8 if signs_packed.dtype == torch.uint8 else 32
    if signs_packed.shape[1] != -(-n // per):
        raise ValueError(
            f"signs_packed must have ceil(n / {per}) = {-(-n // per)} columns for n = {n} "
            f"({signs_packed.dtype}), got {signs_packed.shape[1]}"
        )
    if signs_packed.dtype == torch.int32:
        return signs_packed
    b = signs_packed
    aligned = b.shape[1] % 4 == 0 and b.stride(1) == 1 and b.stride(0) % 4 == 0
    aligned = aligned and b.storage_offset() % 4 == 0 and b.data_ptr() % 4 == 0
    if not aligned:
        b = F.pad(b, (0, -b.shape[1] % 4)).contiguous()
    return b.view(torch.int32)


@dataclass
class _Problem:
    x2: torch.Tensor  # (M, K) view of x
    w: torch.Tensor  # (N, KW) int32
    g: torch.Tensor
    h: torch.Tensor
    lead: tuple
    m: int
    n_out: int
    k: int
    out_dtype: torch.dtype


def _prepare(x, signs_packed, g, h, n, out_dtype) -> _Problem:
    if not HAS_TRITON:
        raise RuntimeError("the OneBit kernels need Triton: pip install 'lowbit[triton]'")
    for name, t in (("x", x), ("g", g), ("h", h)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (in_features), got {n!r}")
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"x must have shape (..., n={n}), got {tuple(x.shape)}")
    w = as_int32_words(signs_packed, n)
    n_out = w.shape[0]
    if g.shape != (n,):
        raise ValueError(f"g must have shape (n,) = ({n},), got {tuple(g.shape)}")
    if h.shape != (n_out,):
        raise ValueError(f"h must have shape (m,) = ({n_out},) (rows of signs_packed), got {tuple(h.shape)}")
    devices = {t.device for t in (x, w, g, h)}
    if len(devices) != 1:
        raise ValueError(f"x, signs_packed, g and h must be on one device, got {sorted(map(str, devices))}")
    if not triton_usable(x.device):
        raise ValueError(
            f"the OneBit kernels run on CUDA (or under TRITON_INTERPRET=1), got a tensor on {x.device}"
        )
    if w.stride(1) != 1:
        w = w.contiguous()
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    x2 = x.reshape(-1, n)
    lead = tuple(x.shape[:-1])
    return _Problem(x2, w, g.contiguous(), h.contiguous(), lead, x2.shape[0], n_out, n, out_dtype)


def _check_eps(layernorm_eps):
    if layernorm_eps is None:
        return None
    number = isinstance(layernorm_eps, (int, float)) and not isinstance(layernorm_eps, bool)
    if not number or not layernorm_eps > 0:
        raise ValueError(f"layernorm_eps must be None or a number > 0, got {layernorm_eps!r}")
    return float(layernorm_eps)


def _ln_block(n_out: int) -> int:
    """LN_BLOCK of the fused LayerNorm tail: the whole row (next_pow2) up to LN_ONE_PASS_MAX, else chunks of
    LN_ONE_PASS_MAX."""
    return min(LN_ONE_PASS_MAX, triton.next_power_of_2(max(n_out, 16)))


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    """SM count of ``device`` (cached per device; _SM_COUNT_DEFAULT off CUDA)."""
    count = _SM_COUNTS.get(device)
    if count is None:
        if device.type == "cuda":
            count = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            count = _SM_COUNT_DEFAULT
        _SM_COUNTS[device] = count
    return count


def _split_words(kw_total: int, block_kw: int, n_tiles: int, cfg, sm_count: int) -> tuple[int, int]:
    """(split_k, words per split) for the CUDA-core GEMVs: about cfg.waves programs per SM; every split a
    whole number of BLOCK_KW blocks (so no block straddles two splits)."""
    k_blocks = triton.cdiv(kw_total, block_kw)
    split = cfg.split_k or -(-cfg.waves * sm_count // n_tiles)
    split = max(1, min(split, k_blocks))
    kw_per_split = triton.cdiv(k_blocks, split) * block_kw
    return triton.cdiv(kw_total, kw_per_split), kw_per_split


def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled (not interpreted) Triton with grid dependency control and the
    ``launch_pdl`` launch option, on a CUDA device of compute capability 9.0 or newer."""
    if _INTERPRETED or gdc_wait is None or torch.device(device).type != "cuda":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return "launch_pdl" in fields and torch.cuda.get_device_capability(device) >= (9, 0)


#: Tables per program of the LUT pre-kernel ``_xg_lut_kernel``, by bits per table index (1024 entries for
#: nibbles, 4096 for bytes).
LUT_PREP_TABLES = {4: 64, 8: 16}
_ADDRESS_HALF = 1 << 32  # _onebit_lut_kernel keeps the high 32 bits of a row's address for all its entries


def _lut_window(start: int, nbytes: int, align: int) -> int:
    """The smallest address >= ``start`` that is a multiple of ``align`` and from which ``nbytes`` do not
    cross a multiple of 2^32 (``nbytes`` <= 2^32 - align): the round-up, or the next multiple of 2^32."""
    first = -(-start // align) * align
    boundary = (first // _ADDRESS_HALF + 1) * _ADDRESS_HALF
    return first if first + nbytes <= boundary else boundary


def _lut_buffer(shape: tuple, device: torch.device) -> torch.Tensor:
    """An empty fp32 LUT buffer (M, KT, 2^bits) starting at a multiple of its table size (4·2^bits bytes)
    and not crossing a multiple of 2^32 bytes: ``_onebit_lut_kernel`` ORs an entry's byte offset into the
    low half of its table's address and takes the high half from the row. A fresh allocation almost
    always qualifies (the CUDA caching allocator aligns blocks to 512 bytes, CPU allocations are 64-byte
    aligned): one data_ptr() check; otherwise the window of a larger allocation found by _lut_window."""
    numel = shape[0] * shape[1] * shape[2]
    nbytes, align = 4 * numel, 4 * shape[2]
    lut = torch.empty(shape, dtype=torch.float32, device=device)
    if _lut_window(lut.data_ptr(), nbytes, align) == lut.data_ptr():
        return lut
    spare = torch.empty(2 * numel + shape[2], dtype=torch.float32, device=device)  # room for either move
    offset = (_lut_window(spare.data_ptr(), nbytes, align) - spare.data_ptr()) // 4
    return spare[offset:offset + numel].view(shape)


#: Opt-in (flip after measuring on the GPU): a plan launches each kernel through Triton's JIT dispatch once
#: per argument specialization, then calls the CompiledKernel's launcher directly (skipping the binder,
#: the cache-key computation and the option parsing of ``JITFunction.run``: most of the ~20-40 µs of host
#: time per launch). Needs Triton >= 3.3 (launcher arguments = all kernel parameters, constexprs included);
#: off in the interpreter and while Triton's launch hooks (profilers) are set.
DIRECT_LAUNCH = False
_DIRECT_SUPPORTED: bool | None = None


def _direct_launch_supported() -> bool:
    global _DIRECT_SUPPORTED
    if _DIRECT_SUPPORTED is None:
        ok = HAS_TRITON and not _INTERPRETED
        try:
            version = tuple(int(v) for v in triton.__version__.split(".")[:2])
            from triton import knobs  # noqa: F401  (Triton >= 3.4: where the launch hooks live)
        except (ImportError, ValueError, AttributeError):
            ok = False
        else:
            ok = ok and version >= (3, 3)
        _DIRECT_SUPPORTED = ok
    return _DIRECT_SUPPORTED


def _launch_hooks_set() -> bool:
    from triton import knobs

    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


def _direct_entry(kernel, compiled, meta: dict, n_args: int):
    """(launcher, function, packed metadata, constexpr values in parameter order) of a CompiledKernel
    returned by ``kernel[grid](...)``, or False where it does not look like one (then: the JIT path)."""
    try:
        names = list(kernel.arg_names)[n_args:]
        consts = tuple(meta[name] for name in names)
        run = compiled.run  # loads the module on first access
        return run, compiled.function, compiled.packed_metadata, consts
    except (AttributeError, KeyError, TypeError):
        return False


class OneBitPlan:
    """Everything about one product that depends only on the shapes, dtypes, device, LayerNorm and variant
    (not on the data): the kernel(s), grid, split-K, tile constants and buffer sizes, decided once.

    ``plan(x2, words, g, h)`` runs it: x2 (m, n) any strides, words int32 (n_out, ceil(n / 32)) with unit
    column stride (``as_int32_words``), g (n,) and h (n_out,) contiguous, all on ``device``; returns the
    (m, n_out) result of ``out_dtype``. Per call it allocates the output and, only where the variant
    needs them, the split-K partials (split_k > 1) and the planes / LUT buffer of a pre-kernel; the
    counters and the fused LayerNorm's fp32 buffer come from a per-(device, stream) workspace. Get one
    with :func:`onebit_matmul_plan` (cached); the results are those of :func:`onebit_matmul` bit for bit.
    """

    def __init__(self, m, n_out, k, x_dtype, g_dtype, out_dtype, device, eps, cfg, fuse_ln):
        if not HAS_TRITON:
            raise RuntimeError("the OneBit kernels need Triton: pip install 'lowbit[triton]'")
        self.m, self.n_out, self.k, self.kw = m, n_out, k, -(-k // 32)
        self.x_dtype, self.g_dtype, self.out_dtype = x_dtype, g_dtype, out_dtype
        self.device, self.eps, self.cfg = device, eps, cfg
        self.eps_arg = eps if eps is not None else 0.0
        self._direct: dict = {}  # DIRECT_LAUNCH: (kernel slot, argument specialization) -> launcher
        if fuse_ln is None:
            fuse_ln = eps is not None and m * n_out <= LN_FUSE_MAX_ELEMENTS
        self.fuse_ln = bool(fuse_ln) and eps is not None and not isinstance(cfg, UnpackMMConfig)
        # the kernels write fp32 when an unfused LayerNorm follows (F.layer_norm on the fp32 product)
        self.alloc_dtype = out_dtype if self.fuse_ln or eps is None else torch.float32
        self.n_ypre = m * n_out if self.fuse_ln else 0
        self.n_part = 0
        self.n_cnt = 0
        sm = _sm_count(device)
        ln_block = _ln_block(n_out)
        if isinstance(cfg, UnpackMMConfig):
            self._call = self._call_unpack_mm
        elif isinstance(cfg, GemvConfig):
            n_tiles = triton.cdiv(n_out, cfg.block_n)
            k_steps = triton.cdiv(self.kw, cfg.block_kw)
            split_k = cfg.split_k or _auto_split_k(m * n_tiles, k_steps, sm)
            split_k = max(1, min(split_k, k_steps))
            self.kw_per_split = triton.cdiv(k_steps, split_k) * cfg.block_kw
            self.split_k = triton.cdiv(self.kw, self.kw_per_split)  # no empty splits
            self.n_tiles = n_tiles
            self._set_scratch(m * n_tiles)
            self.grid = (m * n_tiles, self.split_k)
            self.meta = dict(BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw, LN=self.fuse_ln, LN_BLOCK=ln_block,
                             EVEN_K=k % (32 * cfg.block_kw) == 0, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)
            self._call = self._call_gemv
        elif isinstance(cfg, (PlanesConfig, LutConfig)):
            planes = isinstance(cfg, PlanesConfig)
            kind = "planes" if planes else "LUT"
            if cfg.block_kw < 1 or cfg.block_kw & (cfg.block_kw - 1) or m > 16:
                raise ValueError(
                    f"{kind} GEMV: block_kw must be a power of two and M <= 16, got {cfg}, M = {m}")
            if not planes and cfg.bits not in LUT_PREP_TABLES:
                raise ValueError(f"LUT GEMV: bits must be one of {tuple(LUT_PREP_TABLES)}, got {cfg.bits}")
            n_tiles = triton.cdiv(n_out, cfg.block_n)
            self.split_k, self.kw_per_split = _split_words(self.kw, cfg.block_kw, n_tiles, cfg, sm)
            self._set_scratch(n_tiles)
            self.grid = (n_tiles, self.split_k)
            self.meta = dict(BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw,
                             LN=self.fuse_ln, LN_BLOCK=ln_block, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)
            # words padded to whole blocks: planes and tables there are zeros, so no tile needs K masks
            self.kwp = triton.cdiv(self.kw, cfg.block_kw) * cfg.block_kw
            if not planes:
                self.kt = 32 // cfg.bits * self.kwp  # tables per token
                block_b = LUT_PREP_TABLES[cfg.bits]
                self.prep_grid = (m, triton.cdiv(self.kt, block_b))
                self.prep_meta = dict(BLOCK_B=block_b, BITS=cfg.bits, num_warps=4)
                pdl = cfg.pdl and _pdl_supported(device)
                self.prep_meta.update(PDL=pdl)
                self.meta.update(BITS=cfg.bits, VEC=False, PREFETCH=self.kw_per_split > cfg.block_kw, PDL=pdl)
                if pdl:
                    self.meta.update(launch_pdl=True)
                # rows of words at 16-byte multiples (checked per call) and whole tiles: 16-byte loads
                self.meta_vec = dict(self.meta, VEC=self.kw % cfg.block_kw == 0)
                self._call = self._call_lut
            else:
                self.block_w = min(64, triton.next_power_of_2(self.kwp))
                self.prep_grid = (m, triton.cdiv(self.kwp, self.block_w))
                self.prep_meta = dict(BLOCK_W=self.block_w, num_warps=4)
                self._call = self._call_planes
        elif isinstance(cfg, MMConfig):
            if cfg.block_k % 32 or cfg.block_k < 32:
                raise ValueError(f"block_k must be a multiple of 32, got {cfg.block_k}")
            split3 = not (x_dtype in (torch.bfloat16, torch.float16) and g_dtype == x_dtype)
            self.g_as_int16 = not split3
            dot_dtype = tl.bfloat16 if split3 or x_dtype == torch.bfloat16 else tl.float16
            tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n_out, cfg.block_n)
            k_steps = triton.cdiv(k, cfg.block_k)
            split_k = cfg.split_k or _auto_split_k(tiles, k_steps, sm)
            split_k = max(1, min(split_k, k_steps))
            self.k_per_split = triton.cdiv(k_steps, split_k) * cfg.block_k
            self.split_k = triton.cdiv(k, self.k_per_split)
            self._set_scratch(tiles)
            self.grid = (tiles, self.split_k)
            self.meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                             GROUP_M=cfg.group_m, SPLIT3=split3, DOT_DTYPE=dot_dtype, LN=self.fuse_ln,
                             LN_BLOCK=ln_block,
                             F32_DOT=_INTERPRETED, SWAP_AB=cfg.swap_ab and not split3,
                             EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            self._call = self._call_mm
        else:
            raise TypeError(f"not a kernel config: {cfg!r}")

    def _set_scratch(self, tiles: int) -> None:
        self.n_part = self.split_k * self.m * self.n_out if self.split_k > 1 else 0
        self.n_cnt = tiles + 1

    @property
    def launches(self) -> int:
        """Triton launches per call (the unpack path: 2 plus cuBLAS)."""
        cfg = self.cfg
        if isinstance(cfg, (PlanesConfig, LutConfig, UnpackMMConfig)):
            return 2
        return 1

    def __repr__(self) -> str:
        return (f"OneBitPlan(m={self.m}, n_out={self.n_out}, k={self.k}, cfg={self.cfg}, "
                f"split_k={getattr(self, 'split_k', None)}, fuse_ln={self.fuse_ln})")

    def __call__(self, x2: torch.Tensor, w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        vkey = None
        if DIRECT_LAUNCH and _direct_launch_supported():
            # what Triton specializes on among the arguments that vary between calls of one plan (the
            # buffers the plan allocates are always 16-byte aligned; dtypes of x and g are the plan's)
            vkey = (x2.data_ptr() & 15, x2.stride(0), x2.stride(1), w.data_ptr() & 15, w.stride(0),
                    g.data_ptr() & 15, h.data_ptr() & 15, h.dtype)
        out = self._call(x2, w, g, h, vkey)
        if self.eps is not None and not self.fuse_ln and not isinstance(self.cfg, UnpackMMConfig):
            out = F.layer_norm(out, (self.n_out,), eps=self.eps).to(self.out_dtype)
        return out

    def _launch(self, slot: int, kernel, grid, args: tuple, meta: dict, vkey) -> None:
        """``kernel[grid](*args, **meta)``; with DIRECT_LAUNCH, only the first launch per argument
        specialization goes through Triton's JIT dispatch, later ones call the CompiledKernel's launcher it
        returned (what ``JITFunction.run`` does after its cache lookup, Triton >= 3.3)."""
        if vkey is None:
            kernel[grid](*args, **meta)
            return
        key = (slot, vkey)
        entry = self._direct.get(key)
        if entry is None:
            compiled = kernel[grid](*args, **meta)
            self._direct[key] = _direct_entry(kernel, compiled, meta, len(args))
            return
        if entry is False or _launch_hooks_set():
            kernel[grid](*args, **meta)
            return
        run, function, packed, consts = entry
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            _current_stream_id(self.device), function, packed, None, None, None, *args, *consts)

    def _scratch(self):
        ws = _workspace(self.device, self.n_cnt, self.n_ypre)
        part = (torch.empty(self.n_part, dtype=torch.float32, device=self.device) if self.n_part
                else ws.dummy)
        return ws.cnt, part, ws.ypre if self.fuse_ln else ws.dummy

    def _out(self) -> torch.Tensor:
        return torch.empty((self.m, self.n_out), dtype=self.alloc_dtype, device=self.device)

    def _call_gemv(self, x2, w, g, h, vkey):
        out = self._out()
        cnt, part, ypre = self._scratch()
        self._launch(0, _onebit_gemv_kernel, self.grid, (
            x2, w, g, h, out, part, cnt, ypre,
            self.m, self.n_out, self.k, self.kw, self.kw_per_split, self.split_k, self.n_tiles,
            x2.stride(0), x2.stride(1), w.stride(0), self.n_out, 1, self.eps_arg), self.meta, vkey)
        return out

    def _call_mm(self, x2, w, g, h, vkey):
        out = self._out()
        cnt, part, ypre = self._scratch()
        self._launch(0, _onebit_mm_kernel, self.grid, (
            x2, w, g.view(torch.int16) if self.g_as_int16 else g, h, out, part, cnt, ypre,
            self.m, self.n_out, self.k, self.kw, self.k_per_split, self.split_k,
            x2.stride(0), x2.stride(1), w.stride(0), self.n_out, 1, self.eps_arg), self.meta, vkey)
        return out

    def _call_planes(self, x2, w, g, h, vkey):
        out = self._out()
        xgp = torch.empty((self.m, 32, self.kwp), dtype=torch.float32, device=self.device)
        self._launch(1, _xg_planes_kernel, self.prep_grid, (
            x2, g, xgp, self.k, self.kwp, x2.stride(0), x2.stride(1)), self.prep_meta, vkey)
        cnt, part, ypre = self._scratch()
        self._launch(0, _onebit_planes_kernel, self.grid, (
            xgp, w, h, out, part, cnt, ypre,
            self.m, self.n_out, self.kw, self.kwp, self.kw_per_split, self.split_k,
            w.stride(0), self.n_out, 1, self.eps_arg), self.meta, vkey)
        return out

    def _call_lut(self, x2, w, g, h, vkey):
        out = self._out()
        lut = _lut_buffer((self.m, self.kt, 1 << self.cfg.bits), self.device)
        self._launch(1, _xg_lut_kernel, self.prep_grid, (
            x2, g, lut, self.k, self.kt, x2.stride(0), x2.stride(1)), self.prep_meta, vkey)
        cnt, part, ypre = self._scratch()
        self._launch(0, _onebit_lut_kernel, self.grid, (
            lut, w, h, out, part, cnt, ypre,
            self.m, self.n_out, self.kw, self.kt, self.kw_per_split, self.split_k,
            w.stride(0), self.n_out, 1, self.eps_arg), self.meta_vec if w.stride(0) % 4 == 0 else self.meta,
            vkey)
        return out

    def _call_unpack_mm(self, x2, w, g, h, vkey):
        return _launch_unpack_mm(x2, w, g, h, self.n_out, self.k, self.out_dtype, self.cfg, self.eps)


@functools.lru_cache(maxsize=512)
def _cached_plan(m, n_out, k, x_dtype, g_dtype, out_dtype, device, eps, cfg, fuse_ln) -> OneBitPlan:
    return OneBitPlan(m, n_out, k, x_dtype, g_dtype, out_dtype, device, eps, cfg, fuse_ln)


def _resolve_config(cfg, m: int, n_out: int, k: int, device: torch.device, eps, out_dtype, x_dtype):
    if cfg is None:
        cfg = select_config(m, n_out, k, _sm_count(device))
        if isinstance(cfg, UnpackMMConfig) and (eps is not None or out_dtype != x_dtype):
            cfg = VARIANTS["unpack_mm_f32acc"]
    return cfg


def onebit_matmul_plan(
    m: int,
    n_out: int,
    n: int,
    *,
    device: torch.device | str,
    x_dtype: torch.dtype,
    g_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    layernorm_eps: float | None = None,
    config=None,
) -> OneBitPlan:
    """The cached launch plan of ``onebit_matmul`` for ``m`` tokens, S of (n_out, n), x of ``x_dtype``, g of
    ``g_dtype`` (default x's), the result in ``out_dtype`` (default x's), on ``device``. ``config`` as in
    :func:`onebit_matmul` (None: ``select_config``'s choice, resolved now). Same plan object for the same
    arguments; ``plan(x2, words, g, h)`` gives ``onebit_matmul``'s result bit for bit."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out_dtype = out_dtype or x_dtype
    eps = _check_eps(layernorm_eps)
    cfg = _resolve_config(_as_config(config), m, n_out, n, device, eps, out_dtype, x_dtype)
    return _cached_plan(m, n_out, n, x_dtype, g_dtype or x_dtype, out_dtype, device, eps, cfg, None)


def onebit_linear_packed(
    x: torch.Tensor,
    words: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    n: int,
    *,
    out_dtype: torch.dtype | None = None,
    layernorm_eps: float | None = None,
    config=None,
) -> torch.Tensor:
    """``onebit_matmul`` for callers that hold checked operands (the packed ``OneBitLinear``): ``words``
    int32 (N, ceil(n / 32)) with unit column stride (``as_int32_words``, converted once), g (n,) and h (N,)
    of a float dtype on x's device, x (..., n). Skips the argument checks and takes the launch parameters
    from the plan cache: per call, one reshape, one cache lookup, the output allocation and the launch."""
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    n_out = words.shape[0]
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return torch.empty((*x.shape[:-1], n_out), dtype=out_dtype, device=x.device)
    device = x.device
    cfg = config
    if cfg is None:
        cfg = select_config(m, n_out, n, _sm_count(device))
        if isinstance(cfg, UnpackMMConfig) and (layernorm_eps is not None or out_dtype != x.dtype):
            cfg = VARIANTS["unpack_mm_f32acc"]
    elif not isinstance(cfg, (GemvConfig, MMConfig, PlanesConfig, LutConfig, UnpackMMConfig)):
        cfg = _as_config(cfg)
    plan = _cached_plan(m, n_out, n, x.dtype, g.dtype, out_dtype, device, layernorm_eps, cfg, None)
    y = plan(x2, words, g, h)
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], n_out)


def unpack_weight(signs_packed: torch.Tensor, g: torch.Tensor, n: int, dtype: torch.dtype,
                  *, config: UnpackMMConfig | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
    """W = S ⊙ g (m, n) of ``dtype`` from packed signs: exactly ±g_k (``dtype`` must hold g's values
    exactly: g's own dtype, or float32). One Triton launch; the GEMM path's transient weight.
    With ``h`` (m,) of g's 16-bit dtype (= ``dtype``): W = S ⊙ RN(h gᵀ), each weight rounded once."""
    cfg = config or UnpackMMConfig()
    w = as_int32_words(signs_packed, n)
    if w.stride(1) != 1:
        w = w.contiguous()
    if dtype not in (torch.float32, g.dtype) or dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or g's dtype ({g.dtype}), got {dtype}")
    if cfg.block_k % 32 or cfg.block_k < 32:
        raise ValueError(f"block_k must be a multiple of 32, got {cfg.block_k}")
    n_out = w.shape[0]
    wd = torch.empty((n_out, n), dtype=dtype, device=w.device)
    wide = dtype == torch.float32
    g_arg = g.contiguous() if wide else g.contiguous().view(torch.int16)
    wd_arg = wd.view(torch.int32) if wide else wd.view(torch.int16)
    if h is not None:
        if wide or h.dtype != dtype or h.shape != (n_out,):
            raise ValueError(f"h must be ({n_out},) of the 16-bit dtype {dtype} (g's), got {h.dtype} "
                             f"{tuple(h.shape)}")
        h = h.contiguous()
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(n, cfg.block_k))
    _unpack_weight_kernel[grid](
        w, g_arg, wd_arg, h if h is not None else g_arg, n_out, n, w.shape[1], w.stride(0), wd.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, WIDE=wide, FOLD_H=h is not None,
        DTYPE16=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, num_warps=cfg.num_warps,
    )
    return wd


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with the fp32 accumulator returned unrounded (cuBLAS out_dtype overload where it exists;
    else the same exact products in fp32)."""
    global _MM_OUT_DTYPE
    if a.dtype != torch.float32 and a.is_cuda and _MM_OUT_DTYPE is not False:
        try:
            y = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return y
        except (TypeError, RuntimeError):  # decided once (outside any graph capture: the first call)
            _MM_OUT_DTYPE = False
    return torch.mm(a.float(), b.float())


_MM_OUT_DTYPE: bool | None = None  # does this torch have torch.mm(..., out_dtype=) on CUDA?


def _mm_16_one_rounding(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in a's 16-bit dtype with the fp32 sum rounded once to that dtype.

    PyTorch lets cuBLAS reduce split-K partials in the 16-bit output type by default
    (``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction``), and optionally accumulate
    fp16 in fp16 (``allow_fp16_accumulation``): extra roundings of unknown number that the documented error
    bound (one rounding of the fp32 sum) does not cover; they are switched off for this one call and
    restored. (Host-side flags, read when cuBLAS is called: also right under CUDA-graph capture.)"""
    mm = torch.backends.cuda.matmul
    tag = "bf16" if a.dtype == torch.bfloat16 else "fp16"
    attr = f"allow_{tag}_reduced_precision_reduction"
    saved = {}
    for name, off in ((attr, False), ("allow_fp16_accumulation", False)):
        if name == "allow_fp16_accumulation" and tag != "fp16":
            continue
        try:
            cur = getattr(mm, name)
        except AttributeError:  # an older torch without the flag: nothing to switch
            continue
        if cur != off:
            if name == attr:  # keep the split-K sub-flag of newer torch as it was
                try:
                    saved[name] = (cur, getattr(mm, f"{attr}_split_k"))
                except AttributeError:
                    saved[name] = cur
            else:
                saved[name] = cur
            setattr(mm, name, off)
    try:
        return torch.mm(a, b)
    finally:
        for name, value in saved.items():
            setattr(mm, name, value)


def _launch_unpack_mm(x2, w, g, h, n_out, k, out_dtype, cfg: UnpackMMConfig, eps: float | None):
    m = x2.shape[0]
    same16 = x2.dtype in (torch.bfloat16, torch.float16) and g.dtype == x2.dtype
    if cfg.fold_h and same16 and eps is None and out_dtype == x2.dtype and h.dtype == x2.dtype:
        # h folded into the dense weight (one rounding each): cuBLAS's result is the output
        return _mm_16_one_rounding(x2, unpack_weight(w, g, k, x2.dtype, config=cfg, h=h).t())
    wd = unpack_weight(w, g, k, x2.dtype if same16 else torch.float32, config=cfg)
    if not same16:  # x ⊙ g is not exact in 16 bits: exact fp32 operands instead (x fp32 is exact)
        acc = torch.mm(x2.float(), wd.t())
    elif cfg.fp32_acc:
        acc = _mm_fp32(x2, wd.t())
    else:
        acc = _mm_16_one_rounding(x2, wd.t())  # fp32 accumulation in cuBLAS, rounded once to x's dtype
    del wd  # the transient dense weight is freed before the row pass
    out = torch.empty((m, n_out), dtype=out_dtype, device=x2.device)
    if eps is not None:
        block = min(2048, triton.next_power_of_2(max(n_out, 16)))
        grid = (m,)
    else:
        block = 1024
        grid = (m, triton.cdiv(n_out, block))
    _rows_epilogue_kernel[grid](
        acc, h, out, n_out, acc.stride(0), out.stride(0), eps if eps is not None else 0.0,
        LN=eps is not None, BLOCK=block, num_warps=4,
    )
    return out


def _run(p: _Problem, cfg, eps: float | None, fuse_ln: bool | None) -> torch.Tensor:
    if p.m == 0:
        return torch.empty((*p.lead, p.n_out), dtype=p.out_dtype, device=p.x2.device)
    plan = _cached_plan(p.m, p.n_out, p.k, p.x2.dtype, p.g.dtype, p.out_dtype, p.x2.device, eps, cfg, fuse_ln)
    return plan(p.x2, p.w, p.g, p.h).reshape(*p.lead, p.n_out)


def onebit_matmul(
    x: torch.Tensor,
    signs_packed: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    n: int,
    *,
    out_dtype: torch.dtype | None = None,
    layernorm_eps: float | None = None,
    config=None,
) -> torch.Tensor:
    """y = h ⊙ ((x ⊙ g) · Sᵀ) from packed signs, fp32 accumulation; optionally LayerNorm(y) (no affine).

    Equals ``lowbit.quant.binary.onebit_matmul_reference`` within the fp32 summation bound (see
    tests/kernels/test_onebit.py), cast to ``out_dtype``. Chooses the kernel by the number of tokens M
    (``select_config``): the bit-plane CUDA-core GEMV for M <= GEMV_CORE_MAX_M, the tensor-core kernel
    with 16-row tiles and split-K up to GEMV_TC_MAX_M, the Triton tensor-core GEMM below UNPACK_MM_MIN_M,
    and unpack-then-cuBLAS from there. On that last path, when the result is x's 16-bit dtype without
    LayerNorm, cuBLAS rounds the fp32 sum to x's dtype before h is applied: one more rounding,
    |Δy| <= u_x·|y| on top of the bound (u_x = 2^-8 for bf16, 2^-11 for fp16); for small weights (and
    x, g, h of one 16-bit dtype) h is folded into the dense weight instead, one rounding per weight:
    |Δy| <= u_x·|y| + (1 + u_x)²·(u_x + γ)·|h|·Σ|x ⊙ g| (``UnpackMMConfig(fold_h=True)``). Otherwise it
    keeps the fp32 sum (``UnpackMMConfig(fp32_acc=True)``) and the bound is the same as the other
    kernels'.

    Args:
        x: (..., n) float32 / bfloat16 / float16, any strides; M = x.numel() / n tokens.
        signs_packed: S (m, ceil(n / 32)) int32 (``pack_bits_int32``, preferred) or (m, ceil(n / 8)) uint8
            (``pack_bits``; used without a copy when ceil(n / 8) is a multiple of 4).
        g: (n,) input scale; h: (m,) output scale (float32 / bfloat16 / float16). g of x's dtype (bf16 or
            fp16) is folded into the unpacked weights (exact); other combinations take the fp32 path
            (x ⊙ g in fp32, split in three bf16 parts), which is exact too but does 3× the MMA work.
        n: in_features (the unpadded length of a sign row).
        out_dtype: dtype of the result (default x.dtype).
        layernorm_eps: if given, return F.layer_norm(y, (m,), eps=layernorm_eps) computed in fp32 from the
            fp32 y (the OneBit post-LayerNorm), fused into the kernel when M·m <= LN_FUSE_MAX_ELEMENTS.
        config: None (the dispatcher), a name in ``VARIANTS`` or a config object (GemvConfig, PlanesConfig,
            LutConfig, MMConfig, UnpackMMConfig): forces that kernel and tile.

    Returns:
        (..., m) of ``out_dtype`` on x's device. M = 0 gives an empty result.

    Raises:
        TypeError / ValueError for a wrong dtype, shape or device (CUDA, or any device under
        TRITON_INTERPRET=1); RuntimeError without Triton.
    """
    cfg = _as_config(config)
    p = _prepare(x, signs_packed, g, h, n, out_dtype)
    eps = _check_eps(layernorm_eps)
    cfg = _resolve_config(cfg, p.m, p.n_out, p.k, p.x2.device, eps, p.out_dtype, p.x2.dtype)
    return _run(p, cfg, eps, None)


def onebit_gemv(
    x: torch.Tensor,
    signs_packed: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    n: int,
    *,
    config: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    layernorm_eps: float | None = None,
    fuse_layernorm: bool | None = None,
) -> torch.Tensor:
    """The CUDA-core GEMV kernel for any M (one token per program row; meant for M = 1 or 2).
    Arguments as :func:`onebit_matmul`; ``config`` sets the tile, ``fuse_layernorm`` forces the LN path."""
    p = _prepare(x, signs_packed, g, h, n, out_dtype)
    return _run(p, config or GemvConfig(), _check_eps(layernorm_eps), fuse_layernorm)


def onebit_mm(
    x: torch.Tensor,
    signs_packed: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    n: int,
    *,
    config: MMConfig | None = None,
    out_dtype: torch.dtype | None = None,
    layernorm_eps: float | None = None,
    fuse_layernorm: bool | None = None,
) -> torch.Tensor:
    """The tensor-core kernel for any M. Arguments as :func:`onebit_matmul`; ``config`` sets the tile
    (default: ``select_config``'s choice for M > 16), ``fuse_layernorm`` forces the LN path."""
    p = _prepare(x, signs_packed, g, h, n, out_dtype)
    if config is None:
        config = VARIANTS["tc_m128_n128_k64_w8" if p.m >= 64 else "tc_m64_n128_k64"]
    return _run(p, config, _check_eps(layernorm_eps), fuse_layernorm)
