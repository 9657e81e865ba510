"""Fused Triton kernel for the 8-bit Adam / AdamW step, many tensors per launch.

Contract (per element, fp32 arithmetic in exactly this order; s.* are fp32 scalars):

    g   = grad;  p = param;  m = code_s[m_code] * m_absmax;  v = code_u[v_code] * v_absmax
    g   = g + p * s.weight_decay                        (Adam, L2 decay, when weight_decay != 0)
    m'  = m * s.beta1 + g * s.one_minus_beta1
    v'  = v * s.beta2 + (g * g) * s.one_minus_beta2
    p   = p * s.decay_factor                            (AdamW, decoupled decay, when weight_decay != 0)
    p'  = p - s.step_size * (m' / (sqrt(v') * s.inv_bias_correction2_sqrt + s.eps))
    (m_code', m_absmax') = quantize_blockwise(m', code_s, BLOCK);  same for v' with code_u

It must equal ``lowbit.optim.functional.adam8bit_reference_step`` (and, for tensors kept in fp32 state,
``adam_reference_step``), which uses ``lowbit.quant.codebook.quantize_blockwise`` for the last line. Every
operation is an IEEE fp32 operation in both (division and square root correctly rounded: ``div_rn``,
``sqrt_rn``; no FMA contraction: the launch passes ``enable_fp_fusion=False``), so parameters, codes and
absmax are bit-identical to the reference. Exceptions: non-finite values, and subnormal fp32 intermediates
where the GPU may flush to zero (not reached by realistic optimizer states).

One program handles ``BLOCKS_PER_PROG`` quantization blocks of ``BLOCK`` elements of one tensor; it reads
param, grad, the two code bytes and the two block absmaxes once and writes param, codes and absmaxes once
(16 bytes per fp32 parameter, 10 per bf16 one). Tensors are addressed through a table of raw addresses so
that all parameters of one dtype and hyper-parameter set go in one launch.

The nearest-code search uses the structure of the 8-bit dynamic map (``dynamic_map(signed, 8)``): the
decimal exponent band and the linear bin inside it give an index that is off by at most one, which two
comparisons against the exact decision boundaries (``decision_boundaries``) correct. The result is the
exact ``torch.bucketize`` answer of the reference; the launcher refuses any other code table.
"""

from __future__ import annotations

import functools
import os

import torch

from lowbit.quant.codebook import decision_boundaries, dynamic_map

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

__all__ = [
    "HAS_TRITON",
    "adam8bit_multi_tensor_step",
    "quantize_dynamic_blockwise",
    "triton_usable",
]

HAS_TRITON = triton is not None

# Columns of the per-tensor address table (int64).
_COL_P, _COL_G, _COL_M, _COL_MABS, _COL_V, _COL_VABS, _COL_NUMEL = range(7)
_TABLE_COLS = 8

_P_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device``: CUDA with Triton, or any device with
    ``TRITON_INTERPRET=1`` (the CPU interpreter, slow: for tests)."""
    if not HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return torch.device(device).type == "cuda"


if HAS_TRITON:

    @triton.jit
    def _nearest_code(xn, bound_ptr, SIGNED: tl.constexpr):
        """Index of the nearest value of the 8-bit dynamic map to fp32 ``xn``, ties to the lower index.

        A guess from the map's structure (band e: magnitudes in [10^-(e+1), 10^-e], 2^f equal bins with the
        code values at the bin centres, f = 6 - e signed / 7 - e unsigned), then one step of correction
        against the exact boundaries: index = #{k : bound[k] < xn}.
        """
        a = tl.abs(xn)
        # Band by comparisons (in registers); y = a * 10^e lies in about [0.1, 1]. Thresholds and y carry a
        # few fp32 roundings: that only moves the guess by one near a bin edge, which the correction fixes.
        y = a
        if SIGNED:
            n_bins = tl.full(xn.shape, 64.0, tl.float32)
        else:
            n_bins = tl.full(xn.shape, 128.0, tl.float32)
        threshold = 1.0
        for _ in tl.static_range(6):
            threshold = threshold * 0.1
            below = a < threshold
            y = tl.where(below, y * 10.0, y)
            n_bins = tl.where(below, n_bins * 0.5, n_bins)
        j = tl.floor((y - 0.1) * (n_bins / 0.9))
        j = tl.minimum(tl.maximum(j, 0.0), n_bins - 1.0)
        # q: rank among the positive values (signed: n_bins - 1 below this band; unsigned: n_bins - 2).
        if SIGNED:
            q = (n_bins - 1.0 + j).to(tl.int32)
        else:
            q = (n_bins - 2.0 + j).to(tl.int32)
        q = tl.where(a < 1e-7, -1, q)  # below every band: the code 0.0
        if not SIGNED:
            q = tl.where(xn < 0, -1, q)  # the unsigned map's nearest value to a negative number is 0.0
        if SIGNED:
            guess = tl.where(xn < 0, 127 - (q + 1), 127 + (q + 1))
        else:
            guess = q + 1
        guess = tl.minimum(tl.maximum(guess, 0), 255)
        lo = tl.load(bound_ptr + tl.maximum(guess - 1, 0))
        hi = tl.load(bound_ptr + tl.minimum(guess, 254))
        up = (xn > hi) & (guess < 255)
        down = (xn <= lo) & (guess > 0)
        return guess + up.to(tl.int32) - down.to(tl.int32)

    @triton.jit
    def _to_param_dtype(x, P_DTYPE: tl.constexpr):
        """fp32 -> param dtype, round to nearest even (torch's rounding). bf16 is rounded by hand: the CPU
        interpreter truncates in ``.to(tl.bfloat16)``, the GPU rounds; the bit formula is the same on both."""
        if P_DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(P_DTYPE)

    @triton.jit
    def _quantize_blocks(x, mask, bound_ptr, SIGNED: tl.constexpr):
        """(BPP, BLOCK) fp32 tile -> (uint8 codes, (BPP,) fp32 absmax); masked lanes ignored."""
        x = tl.where(mask, x, 0.0)
        absmax = tl.max(tl.abs(x), axis=1)
        safe = tl.where(absmax > 0, absmax, 1.0)
        xn = tl.math.div_rn(x, safe[:, None])
        idx = _nearest_code(xn, bound_ptr, SIGNED)
        return idx.to(tl.uint8), absmax

    @triton.jit
    def _ptr(tab, col, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """Column ``col`` of an address-table row as a typed pointer (16-byte aligned when ALIGNED, which
        lets the compiler use vector loads)."""
        addr = tl.load(tab + col)
        if ALIGNED:
            addr = tl.multiple_of(addr, 16)
        return addr.to(tl.pointer_type(DTYPE))

    @triton.jit
    def _load(ptrs, mask, other, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptrs, mask=mask, other=other)
        else:
            return tl.load(ptrs)

    @triton.jit
    def _store(ptrs, value, mask, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptrs, value, mask=mask)
        else:
            tl.store(ptrs, value)

    @triton.jit
    def _adam_kernel(
        table_ptr,  # int64 (n_tensors, 8): addresses of p, g, m, m_absmax, v, v_absmax; numel
        prog_ptr,  # int32 (n_programs, 2): tensor row, first block of this program
        code_s_ptr,  # fp32 (256,) signed dynamic map
        code_u_ptr,  # fp32 (256,) unsigned dynamic map
        bound_s_ptr,  # fp32 (255,) decision boundaries of code_s
        bound_u_ptr,  # fp32 (255,) decision boundaries of code_u
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        step_size,
        inv_bc2_sqrt,
        weight_decay,
        decay_factor,
        P_DTYPE: tl.constexpr,
        STATE_8BIT: tl.constexpr,
        DECOUPLED: tl.constexpr,
        HAS_WD: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCKS_PER_PROG: tl.constexpr,
        MASKED: tl.constexpr,  # False: every element of this launch's programs is inside its tensor
        ALIGNED: tl.constexpr,  # every address is a multiple of 16 bytes
    ):
        pid = tl.program_id(0)
        row = tl.load(prog_ptr + 2 * pid).to(tl.int64)
        first_block = tl.load(prog_ptr + 2 * pid + 1).to(tl.int64)
        tab = table_ptr + row * 8
        p_ptr = _ptr(tab, 0, P_DTYPE, ALIGNED)
        g_ptr = _ptr(tab, 1, P_DTYPE, ALIGNED)
        numel = tl.load(tab + 6)

        blk = first_block + tl.arange(0, BLOCKS_PER_PROG)  # (BPP,)
        offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (BPP, BLOCK)
        mask = offs < numel
        blk_mask = blk * BLOCK < numel

        p = _load(p_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
        g = _load(g_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
        if STATE_8BIT:
            mc_ptr = _ptr(tab, 2, tl.uint8, ALIGNED)
            ma_ptr = _ptr(tab, 3, tl.float32, ALIGNED)
            vc_ptr = _ptr(tab, 4, tl.uint8, ALIGNED)
            va_ptr = _ptr(tab, 5, tl.float32, ALIGNED)
            m_code = _load(mc_ptr + offs, mask, 0, MASKED).to(tl.int32)
            v_code = _load(vc_ptr + offs, mask, 0, MASKED).to(tl.int32)
            m_absmax = _load(ma_ptr + blk, blk_mask, 0.0, MASKED)
            v_absmax = _load(va_ptr + blk, blk_mask, 0.0, MASKED)
            # Lanes past the end read code 0, whose value is not 0.0 in the signed map: zero them.
            m = tl.where(mask, tl.load(code_s_ptr + m_code) * m_absmax[:, None], 0.0)
            v = tl.where(mask, tl.load(code_u_ptr + v_code) * v_absmax[:, None], 0.0)
        else:
            m_ptr = _ptr(tab, 2, tl.float32, ALIGNED)
            v_ptr = _ptr(tab, 4, tl.float32, ALIGNED)
            m = _load(m_ptr + offs, mask, 0.0, MASKED)
            v = _load(v_ptr + offs, mask, 0.0, MASKED)

        if HAS_WD:
            if not DECOUPLED:
                g = g + p * weight_decay
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        if HAS_WD:
            if DECOUPLED:
                p = p * decay_factor
        denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
        p = p - step_size * tl.math.div_rn(m, denom)
        _store(p_ptr + offs, _to_param_dtype(p, P_DTYPE), mask, MASKED)

        if STATE_8BIT:
            m_code, m_absmax = _quantize_blocks(m, mask, bound_s_ptr, True)
            v_code, v_absmax = _quantize_blocks(v, mask, bound_u_ptr, False)
            _store(mc_ptr + offs, m_code, mask, MASKED)
            _store(vc_ptr + offs, v_code, mask, MASKED)
            _store(ma_ptr + blk, m_absmax, blk_mask, MASKED)
            _store(va_ptr + blk, v_absmax, blk_mask, MASKED)
        else:
            _store(m_ptr + offs, m, mask, MASKED)
            _store(v_ptr + offs, v, mask, MASKED)

    @triton.jit
    def _quantize_kernel(
        x_ptr, codes_ptr, absmax_ptr, bound_ptr, numel,
        SIGNED: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
    ):
        blk = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
        offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        codes, absmax = _quantize_blocks(x, mask, bound_ptr, SIGNED)
        tl.store(codes_ptr + offs, codes, mask=mask)
        tl.store(absmax_ptr + blk, absmax, mask=blk * BLOCK < numel)


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code_s, code_u, bound_s, bound_u) on ``device``: the 8-bit dynamic maps and their boundaries."""
    code_s, code_u = dynamic_map(True, 8), dynamic_map(False, 8)
    return tuple(t.to(device) for t in (code_s, code_u, decision_boundaries(code_s), decision_boundaries(code_u)))


def _check_block(block_size: int, blocks_per_prog: int) -> None:
    for name, val in (("block_size", block_size), ("blocks_per_prog", blocks_per_prog)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two, got {val!r}")
    if block_size < 16:
        raise ValueError(f"block_size must be at least 16 for the Triton kernel, got {block_size}")


def _launch_options(device: torch.device) -> dict:
    # No FMA contraction: the reference rounds every product and sum separately.
    return {} if device.type != "cuda" else {"enable_fp_fusion": False}


def quantize_dynamic_blockwise(
    x: torch.Tensor, signed: bool = True, block_size: int = 256, blocks_per_prog: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``quantize_blockwise(x, dynamic_map(signed, 8), block_size)``, equal to it bit for bit.

    Args:
        x: contiguous fp32 / bf16 / fp16 tensor, any shape, on CUDA (or any device under TRITON_INTERPRET=1).
        signed: which 8-bit dynamic map.
        block_size: power of two >= 16.

    Returns:
        codes_u8 (x.numel(),) uint8 and absmax (ceil(numel / block_size),) float32.
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_dynamic_blockwise needs Triton: pip install 'lowbit[triton]'")
    if x.dtype not in _P_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    _check_block(block_size, blocks_per_prog)
    n = x.numel()
    n_blocks = -(-n // block_size)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, absmax
    _, _, bound_s, bound_u = _tables(x.device)
    grid = (triton.cdiv(n_blocks, blocks_per_prog),)
    _quantize_kernel[grid](
        x, codes, absmax, bound_s if signed else bound_u, n,
        SIGNED=bool(signed), BLOCK=block_size, BLOCKS_PER_PROG=blocks_per_prog,
        **_launch_options(x.device),
    )
    return codes, absmax


class _ProgramTableCache:
    """Device tables keyed by what they depend on; the programs table only on numels (fixed over training),
    the address table on the addresses (grads set to None and re-allocated often land at the same place)."""

    def __init__(self, maxsize: int = 64):
        self._progs: dict = {}
        self._addrs: dict = {}
        self._maxsize = maxsize

    @staticmethod
    def _put(cache: dict, key, value, maxsize: int):
        if len(cache) >= maxsize:
            cache.pop(next(iter(cache)))
        cache[key] = value

    def programs(
        self, numels: tuple[int, ...], block: int, bpp: int, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """int32 (n_programs, 2) rows (tensor index, first block): first every program whose
        ``block * bpp`` elements all lie inside its tensor, then one tail program per tensor that needs
        one; and the number of full programs."""
        key = (numels, block, bpp, device)
        entry = self._progs.get(key)
        if entry is None:
            full, tail = [], []
            for i, n in enumerate(numels):
                n_full = n // (block * bpp)
                first = torch.arange(0, n_full * bpp, bpp, dtype=torch.int32)
                full.append(torch.stack([torch.full_like(first, i), first], dim=1))
                if n_full * block * bpp < n:
                    tail.append(torch.tensor([[i, n_full * bpp]], dtype=torch.int32))
            table = torch.cat(full + tail).contiguous().to(device)
            entry = (table, sum(len(f) for f in full))
            self._put(self._progs, key, entry, self._maxsize)
        return entry

    def addresses(self, rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
        key = (rows, device)
        table = self._addrs.get(key)
        if table is None:
            table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _TABLE_COLS).to(device)
            self._put(self._addrs, key, table, self._maxsize)
        return table


_CACHE = _ProgramTableCache()


def adam8bit_multi_tensor_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    exp_avg_absmaxes: list[torch.Tensor] | None,
    exp_avg_sq_absmaxes: list[torch.Tensor] | None,
    *,
    beta1: float,
    beta2: float,
    one_minus_beta1: float,
    one_minus_beta2: float,
    eps: float,
    step_size: float,
    inv_bc2_sqrt: float,
    weight_decay: float,
    decay_factor: float,
    decoupled: bool,
    block_size: int = 256,
    blocks_per_prog: int = 4,
    num_warps: int = 4,
) -> None:
    """One fused Adam(W) step, in place, for tensors that share dtype, device and scalars (module docstring).

    8-bit state (``exp_avg_absmaxes`` given): ``exp_avgs`` / ``exp_avg_sqs`` are (numel,) uint8 codes of the
    signed / unsigned 8-bit dynamic map, the absmax lists (ceil(numel / block_size),) float32.
    fp32 state (absmax lists None): ``exp_avgs`` / ``exp_avg_sqs`` are float32 tensors of numel elements.
    The scalars are fp32 values (``lowbit.optim.functional.adam_scalars``).

    Args:
        params: contiguous fp32 / bf16 / fp16 tensors, all of one dtype, on one device (CUDA, or CPU under
            TRITON_INTERPRET=1); updated in place.
        grads: contiguous, same dtype and numel as their param.
    """
    if not HAS_TRITON:
        raise RuntimeError("adam8bit_multi_tensor_step needs Triton: pip install 'lowbit[triton]'")
    if not params:
        return
    _check_block(block_size, blocks_per_prog)
    state_8bit = exp_avg_absmaxes is not None
    if state_8bit != (exp_avg_sq_absmaxes is not None):
        raise ValueError("exp_avg_absmaxes and exp_avg_sq_absmaxes must both be given or both be None")
    lists = [grads, exp_avgs, exp_avg_sqs] + ([exp_avg_absmaxes, exp_avg_sq_absmaxes] if state_8bit else [])
    if any(len(lst) != len(params) for lst in lists):
        raise ValueError("params, grads and state lists must have the same length")
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _P_DTYPES:
        raise TypeError(f"params must be float32, bfloat16 or float16, got {dtype}")
    state_dtype = torch.uint8 if state_8bit else torch.float32
    rows = []
    for i, p in enumerate(params):
        g, m, v = grads[i], exp_avgs[i], exp_avg_sqs[i]
        n = p.numel()
        for name, t, dt in (("param", p, dtype), ("grad", g, dtype), ("exp_avg", m, state_dtype),
                            ("exp_avg_sq", v, state_dtype)):
            if t.dtype != dt or t.device != device or not t.is_contiguous() or t.numel() != n:
                raise ValueError(
                    f"tensor {i}: {name} must be a contiguous {dt} tensor of {n} elements on {device}, got "
                    f"{t.dtype}, {t.numel()} elements on {t.device}, contiguous={t.is_contiguous()}"
                )
        if state_8bit:
            ma, va = exp_avg_absmaxes[i], exp_avg_sq_absmaxes[i]
            n_blocks = -(-n // block_size)
            for name, t in (("exp_avg_absmax", ma), ("exp_avg_sq_absmax", va)):
                if t.dtype != torch.float32 or t.device != device or not t.is_contiguous() or t.numel() != n_blocks:
                    raise ValueError(f"tensor {i}: {name} must be contiguous float32 of {n_blocks} elements on "
                                     f"{device}")
            rows.append((p.data_ptr(), g.data_ptr(), m.data_ptr(), ma.data_ptr(), v.data_ptr(), va.data_ptr(), n, 0))
        else:
            rows.append((p.data_ptr(), g.data_ptr(), m.data_ptr(), 0, v.data_ptr(), 0, n, 0))
    numels = tuple(r[_COL_NUMEL] for r in rows)
    if sum(numels) == 0:
        return
    table = _CACHE.addresses(tuple(rows), device)
    progs, n_full = _CACHE.programs(numels, block_size, blocks_per_prog, device)
    code_s, code_u, bound_s, bound_u = _tables(device)
    p_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    aligned = all(addr % 16 == 0 for row in rows for addr in row[:_COL_NUMEL])
    scalars = (beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, inv_bc2_sqrt, weight_decay,
               decay_factor)
    # Full programs without masks (vector loads), then the tails with masks; the table lists them in order.
    for masked, start, count in ((False, 0, n_full), (True, n_full, progs.shape[0] - n_full)):
        if count == 0:
            continue
        _adam_kernel[(count,)](
            table, progs[start:], code_s, code_u, bound_s, bound_u, *scalars,
            P_DTYPE=p_dtype,
            STATE_8BIT=state_8bit,
            DECOUPLED=bool(decoupled),
            HAS_WD=weight_decay != 0.0,
            BLOCK=block_size,
            BLOCKS_PER_PROG=blocks_per_prog,
            MASKED=masked,
            ALIGNED=aligned,
            num_warps=num_warps,
            **_launch_options(device),
        )

