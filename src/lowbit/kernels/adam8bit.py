"""Fused Triton kernel for the 8-bit Adam / AdamW step, many tensors per launch.

Contract (per element, fp32 arithmetic in exactly this order; s.* are fp32 scalars):

    g   = grad;  p = param;  m = code_s[m_code] * m_absmax;  v = code_u[v_code] * v_absmax
    g   = g + p * s.weight_decay                        (Adam, L2 decay, when weight_decay != 0)
    m'  = m * s.beta1 + g * s.one_minus_beta1
    v'  = v * s.beta2 + (g * g) * s.one_minus_beta2
    p   = p * s.decay_factor                            (AdamW, decoupled decay, when weight_decay != 0)
    p'  = p - s.step_size * (m' / (sqrt(v') * s.inv_bc2_sqrt + s.eps))
    (m_code', m_absmax') = quantize_blockwise(m', code_s, BLOCK);  same for v' with code_u

code_s / code_u are the 8-bit dynamic maps ``dynamic_map(True)`` / ``dynamic_map(False)``. The kernel must
equal ``lowbit.optim.functional.adam8bit_reference_step`` (and, for tensors kept in fp32 state,
``adam_reference_step``), whose last line is ``lowbit.quant.codebook.quantize_blockwise``. Every operation is
an IEEE fp32 operation in both (division and square root correctly rounded: ``div_rn``, ``sqrt_rn``; no FMA
contraction: the launch passes ``enable_fp_fusion=False``), so parameters, codes and absmaxes are
bit-identical to the reference. Exceptions: non-finite values, and subnormal fp32 intermediates, which a
GPU may flush to zero (realistic optimizer states do not reach them).

Memory traffic is what the step costs: one program handles ``BLOCKS_PER_PROG`` quantization blocks of
``BLOCK`` elements of one tensor and reads param, grad, the two code bytes and the two block absmaxes once,
writes param, codes and absmaxes once (16 bytes per fp32 parameter, 10 per bf16 one, against 28 / 16 for
fp32-state AdamW). Tensors are addressed by element offsets from one base pointer per operand (the table is
built by the launcher), so that all parameters of one dtype and hyper-parameter set go in one launch; programs
whose blocks lie entirely inside their tensor run without masks (vector loads), the tails in a second launch.

Arithmetic and table lookups, not bytes, are what the step costs on an H100 (an L1 gather from a 256-entry
table costs about as much time as an element's whole memory traffic). Dequantization is one gather per moment
(``code[byte]``). The nearest code is found without searching the 255 boundaries (``_nearest_dynamic``): the
binade of |xn| (its exponent bits) selects, through tables of 25 and 150 entries that stay in L1, the linear
formula floor(a * A + C) of the map's decade around it (the codes of a decade are the centres of equal bins);
that rank is exact unless the formula lands within its rounding error of a bin edge, and those lanes (about
0.2%) are settled by two comparisons with the exact boundary table (masked loads: the other lanes issue no
memory traffic). The result is the exact ``torch.bucketize`` answer of the reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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
    "VARIANTS",
    "KernelVariant",
    "adam8bit_multi_tensor_step",
    "get_variant",
    "quantize_dynamic_blockwise",
    "triton_usable",
]

HAS_TRITON = triton is not None

# Columns of the per-tensor offset table (int64): element offsets of p, g, m, m_absmax, v, v_absmax from
# their base tensors, then numel and a pad.
_TABLE_COLS = 8

_P_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_usable(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device``: CUDA with Triton, or any device with
    ``TRITON_INTERPRET=1`` (the CPU interpreter, slow: for tests)."""
    if not HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return torch.device(device).type == "cuda"


if HAS_TRITON:

    @triton.jit
    def _nearest_dynamic(xn, thr_ptr, coef_ptr, bound_ptr, SIGNED: tl.constexpr, FIX_BRANCH: tl.constexpr):
        """Index of the 8-bit dynamic-map value nearest to fp32 ``xn``, ties to the lower index: the exact
        ``bucketize(xn, bound)``, for tables from ``_search_tables``.

        The magnitude a = |xn| lies in binade 2^(E-127) (E its exponent bits); each binade holds at most one
        of the boundaries between the map's decades, thr[E]; on each side of it the rank of the nearest
        magnitude is floor(a * A + C) capped at RMAX (the codes of a decade are the centres of equal bins),
        with (A, C, RMAX) = coef[2E + side]. The rank is exact unless a * A + C is within its rounding error
        (about 1e-4) of an integer, or a equals the decade boundary (a tie on the negative side); those
        lanes (0.2%) are settled by comparing with the exact boundaries, masked loads for the rest.
        """
        a = tl.abs(xn)
        e = tl.minimum(tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 103, 0), 24)  # binades 2^-24 .. 2^0
        t = tl.load(thr_ptr + e)
        k = 2 * e + (a > t).to(tl.int32)
        # One fused multiply-add: z need not be bit-exact, only within the "near" margin (its error is below
        # 1e-4 with or without the fusion; the margin is 1e-3).
        z = tl.fma(a, tl.load(coef_ptr + k), tl.load(coef_ptr + 50 + k))
        # floor(z) by rounding z - 1/2 to an integer with the 1.5 * 2^23 trick (no conversion instruction,
        # those run at 1/8 rate); it differs from floor only when z is an integer, which is flagged below.
        zf = ((z - 0.5) + 12582912.0) - 12582912.0
        near = (z - zf < 2.5e-4) | (z - zf > 1.0 - 2.5e-4) | (a == t)
        rank = tl.minimum(zf, tl.load(coef_ptr + 100 + k))
        rank = (rank + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000  # int(rank): 0 <= rank < 2^23
        if SIGNED:
            guess = tl.maximum(tl.where(xn < 0, 127 - rank, 127 + rank), 0)  # no -1.0: its nearest is index 0
        else:
            guess = tl.where(xn < 0, 0, rank)
        if FIX_BRANCH:
            # Most tiles have no lane near a bin edge at all: skip the fix-up's loads and compares there.
            if tl.max(near.to(tl.int32)) != 0:
                guess = _fix_near(xn, guess, near, bound_ptr)
        else:
            guess = _fix_near(xn, guess, near, bound_ptr)
        return guess

    @triton.jit
    def _fix_near(xn, guess, near, bound_ptr):
        """Lanes flagged ``near``: move ``guess`` by one where the exact boundaries say so."""
        lo = tl.load(bound_ptr + tl.maximum(guess - 1, 0), mask=near, other=0.0)
        hi = tl.load(bound_ptr + tl.minimum(guess, 254), mask=near, other=0.0)
        up = near & (xn > hi) & (guess < 255)
        down = near & (xn <= lo) & (guess > 0)
        return guess + up.to(tl.int32) - down.to(tl.int32)

    @triton.jit
    def _quantize_blocks(
        x, mask, thr_ptr, coef_ptr, bound_ptr, SIGNED: tl.constexpr, FIX_BRANCH: tl.constexpr
    ):
        """(BPP, BLOCK) fp32 tile -> (uint8 codes, (BPP,) fp32 absmax); lanes outside ``mask`` ignored."""
        x = tl.where(mask, x, 0.0)
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(1.0, tl.maximum(absmax, 1.1754943508222875e-38))  # 1 / max(absmax, 2^-126)
        idx = _nearest_dynamic(x * scale[:, None], thr_ptr, coef_ptr, bound_ptr, SIGNED, FIX_BRANCH)
        return idx.to(tl.uint8), absmax

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
    def _offset(tab, col, ALIGN: tl.constexpr):
        """Element offset in column ``col``; a multiple of ALIGN (16 bytes' worth) if the launcher says so."""
        off = tl.load(tab + col)
        if ALIGN > 1:
            off = tl.multiple_of(off, ALIGN)
        return off

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
        table_ptr,  # int64 (n_tensors, 8): offsets of p, g, m, m_absmax, v, v_absmax from the bases; numel
        prog_ptr,  # int32 (n_programs, 2): tensor row, first block of this program
        p_base,
        g_base,
        m_base,  # uint8 codes (8-bit state) or fp32 moments
        ma_base,  # fp32 block absmaxes (8-bit state; unused otherwise)
        v_base,
        va_base,
        code_s_ptr,  # fp32 (256,) the signed map
        code_u_ptr,
        thr_s_ptr,  # fp32 search tables of the signed map (``_search_tables``)
        coef_s_ptr,
        thr_u_ptr,
        coef_u_ptr,
        bound_s_ptr,  # fp32 (255,) decision boundaries of the signed map
        bound_u_ptr,
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
        MASKED: tl.constexpr,  # False: every element of this launch's programs lies inside its tensor
        FIX_BRANCH: tl.constexpr,  # skip the exact fix-up of the nearest code in tiles that need none
        ALIGN_P: tl.constexpr,  # offsets are multiples of these (16 bytes' worth of elements), or 1
        ALIGN_S: tl.constexpr,
        ALIGN_A: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = tl.load(prog_ptr + 2 * pid).to(tl.int64)
        first_block = tl.load(prog_ptr + 2 * pid + 1).to(tl.int64)
        tab = table_ptr + row * 8
        p_ptr = p_base + _offset(tab, 0, ALIGN_P)
        g_ptr = g_base + _offset(tab, 1, ALIGN_P)
        m_ptr = m_base + _offset(tab, 2, ALIGN_S)
        v_ptr = v_base + _offset(tab, 4, ALIGN_S)
        numel = tl.load(tab + 6)

        blk = first_block + tl.arange(0, BLOCKS_PER_PROG)  # (BPP,)
        offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (BPP, BLOCK)
        mask = offs < numel
        blk_mask = blk * BLOCK < numel

        p = _load(p_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
        g = _load(g_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
        if STATE_8BIT:
            ma_ptr = ma_base + _offset(tab, 3, ALIGN_A)
            va_ptr = va_base + _offset(tab, 5, ALIGN_A)
            m_code = _load(m_ptr + offs, mask, 0, MASKED).to(tl.int32)
            v_code = _load(v_ptr + offs, mask, 0, MASKED).to(tl.int32)
            m_absmax = _load(ma_ptr + blk, blk_mask, 0.0, MASKED)
            v_absmax = _load(va_ptr + blk, blk_mask, 0.0, MASKED)
            m = tl.load(code_s_ptr + m_code) * m_absmax[:, None]
            v = tl.load(code_u_ptr + v_code) * v_absmax[:, None]
            if MASKED:  # lanes past the end read code 0, which is not 0.0 in the signed map
                m = tl.where(mask, m, 0.0)
                v = tl.where(mask, v, 0.0)
        else:
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
            m_code, m_absmax = _quantize_blocks(m, mask, thr_s_ptr, coef_s_ptr, bound_s_ptr, True,
                                                FIX_BRANCH)
            v_code, v_absmax = _quantize_blocks(v, mask, thr_u_ptr, coef_u_ptr, bound_u_ptr, False,
                                                FIX_BRANCH)
            _store(m_ptr + offs, m_code, mask, MASKED)
            _store(v_ptr + offs, v_code, mask, MASKED)
            _store(ma_ptr + blk, m_absmax, blk_mask, MASKED)
            _store(va_ptr + blk, v_absmax, blk_mask, MASKED)
        else:
            _store(m_ptr + offs, m, mask, MASKED)
            _store(v_ptr + offs, v, mask, MASKED)

    @triton.jit
    def _quantize_kernel(
        x_ptr, codes_ptr, absmax_ptr, thr_ptr, coef_ptr, bound_ptr, numel,
        SIGNED: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
    ):
        blk = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
        offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        codes, absmax = _quantize_blocks(x, mask, thr_ptr, coef_ptr, bound_ptr, SIGNED, False)
        tl.store(codes_ptr + offs, codes, mask=mask)
        tl.store(absmax_ptr + blk, absmax, mask=blk * BLOCK < numel)


def _search_tables(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables of ``_nearest_dynamic`` for the 8-bit dynamic map: thr (25,) float32 and coef (150,) float32 =
    [A (50), C (50), RMAX (50)], indexed by 2 * binade + (a > thr[binade]) for the binades 2^-24 .. 2^0.

    Magnitude pieces, low to high: the code 0 (rank 0), the decades 10^-6 .. 10^0 (n codes each, ranks r0 ..
    r0 + n - 1 at the centres of n equal bins of [0.1, 1] * 10^-e, so rank = floor(a * 10^e * n / 0.9 + r0 -
    n / 9) capped at r0 + n - 1), the code 1.0. The edges between pieces are exact decision boundaries; the
    function checks that no binade holds two of them.
    """
    code = dynamic_map(signed, 8)
    bound = decision_boundaries(code).double()
    zero = 127 if signed else 0
    pieces = [(0.0, 0.5, 0.0)]  # (A, C, RMAX); C = rank + 0.5 keeps a constant piece away from "near"
    tops = [0]  # rank of the top code of each piece
    r0 = 1
    for e in range(6, -1, -1):
        n = 2 ** ((6 if signed else 7) - e)
        pieces.append((10.0**e * n / 0.9, r0 - n / 9.0, float(r0 + n - 1)))
        tops.append(r0 + n - 1)
        r0 += n
    pieces.append((0.0, r0 + 0.5, float(r0)))  # 1.0: rank 128 (signed) / 255 (unsigned)
    edges = [bound[zero + top].item() for top in tops]  # edges[i] separates pieces i and i + 1
    n_binades = 25
    thr = torch.full((n_binades,), 4.0, dtype=torch.float64)  # 4.0: no edge in this binade
    coef = torch.zeros(3, 2 * n_binades, dtype=torch.float64)
    for b in range(n_binades):
        lo, hi = 2.0 ** (b - 24), 2.0 ** (b - 23)
        inside = [i for i, t in enumerate(edges) if lo <= t < hi]
        if len(inside) > 1:  # pragma: no cover - a property of the map, checked here once
            raise AssertionError(f"binade {b} holds {len(inside)} decade boundaries")
        piece = 0 if b == 0 else sum(1 for t in edges if t < lo)
        sides = (piece, piece)
        if inside:
            thr[b] = edges[inside[0]]
            sides = (piece, piece + 1)
        for side, i in enumerate(sides):
            coef[:, 2 * b + side] = torch.tensor(pieces[i], dtype=torch.float64)
    return thr.float(), coef.reshape(-1).float()


@functools.cache
def _tables(device: torch.device) -> dict[bool, tuple[torch.Tensor, ...]]:
    """{signed: (code (256,), thr (25,), coef (150,), bound (255,))} on ``device``, float32."""
    out = {}
    for signed in (True, False):
        code = dynamic_map(signed, 8)
        thr, coef = _search_tables(signed)
        out[signed] = tuple(t.to(device) for t in (code, thr, coef, decision_boundaries(code)))
    return out


def _check_block(block_size: int, blocks_per_prog: int) -> None:
    for name, val in (("block_size", block_size), ("blocks_per_prog", blocks_per_prog)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two, got {val!r}")
    if block_size < 16:
        raise ValueError(f"block_size must be at least 16 for the Triton kernel, got {block_size}")


def _launch_options(device: torch.device) -> dict:
    # No FMA contraction: the reference rounds every product and sum separately.
    return {} if device.type != "cuda" else {"enable_fp_fusion": False}


def _require_triton(name: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs Triton: pip install 'lowbit[triton]'")


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
    _require_triton("quantize_dynamic_blockwise")
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
    _, thr, coef, bound = _tables(x.device)[bool(signed)]
    grid = (triton.cdiv(n_blocks, blocks_per_prog),)
    _quantize_kernel[grid](
        x, codes, absmax, thr, coef, bound, n,
        SIGNED=bool(signed), BLOCK=block_size, BLOCKS_PER_PROG=blocks_per_prog, **_launch_options(x.device),
    )
    return codes, absmax


@dataclass(frozen=True)
class KernelVariant:
    """Tiling of the fused step: ``blocks_per_prog`` quantization blocks per program, ``num_warps`` warps per
    program, ``fix_branch``: skip the exact nearest-code fix-up in tiles where no lane needs it (a branch on a
    tile-wide reduction; the result is the same bits either way)."""

    blocks_per_prog: int = 1
    num_warps: int = 1
    fix_branch: bool = True


# Named tilings, all bit-identical; ``lowbit bench optim`` times each (``--variants``). "v1" is the kernel
# the first H100 probe measured (0.77x torch fused AdamW).
VARIANTS: dict[str, KernelVariant] = {
    "default": KernelVariant(1, 1, True),
    "v1": KernelVariant(1, 1, False),
    "w2": KernelVariant(1, 2, True),
    "b2w2": KernelVariant(2, 2, True),
    "b4w4": KernelVariant(4, 4, True),
    "b4w4-nobranch": KernelVariant(4, 4, False),
}


def get_variant(variant: str | KernelVariant | None) -> KernelVariant:
    """A ``KernelVariant`` from its name in ``VARIANTS`` (None: "default") or itself."""
    if variant is None:
        return VARIANTS["default"]
    if isinstance(variant, KernelVariant):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _programs(numels: tuple[int, ...], block: int, bpp: int) -> tuple[torch.Tensor, int]:
    """int32 (n_programs, 2) rows (tensor index, first block): first every program whose ``block * bpp``
    elements all lie inside its tensor, then one tail program per tensor that needs one; and the number of
    full programs."""
    full, tail = [], []
    for i, n in enumerate(numels):
        n_full = n // (block * bpp)
        first = torch.arange(0, n_full * bpp, bpp, dtype=torch.int32)
        full.append(torch.stack([torch.full_like(first, i), first], dim=1))
        if n_full * block * bpp < n:
            tail.append(torch.tensor([[i, n_full * bpp]], dtype=torch.int32))
    return torch.cat(full + tail).contiguous(), sum(len(f) for f in full)


@dataclass
class _Plan:
    """Everything a launch needs that does not change from step to step: the device tables and the
    compile-time flags. Keyed by the tensors' addresses and sizes (``_plan_key``)."""

    table: torch.Tensor  # int64 (n_tensors, 8)
    progs: torch.Tensor  # int32 (n_programs, 2)
    n_full: int
    align: tuple[int, int, int]  # ALIGN_P, ALIGN_S, ALIGN_A
    # No tensor of the caller is kept here (a kept gradient would pin its memory and the next gradient would
    # land elsewhere): the base pointers are the operands' first tensors, passed at each launch.


class _PlanCache:
    """Launch plans by key. Gradients set to None and re-allocated usually land at the same addresses, so
    a training loop builds its plans once; the validation of the tensors runs only when a plan is built."""

    def __init__(self, maxsize: int = 64):
        self._plans: dict = {}
        self._maxsize = maxsize

    def get(self, key):
        return self._plans.get(key)

    def put(self, key, plan: _Plan) -> None:
        if len(self._plans) >= self._maxsize:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()


_PLANS = _PlanCache()


def _build_plan(params, operands, state_8bit, block_size, bpp, device) -> _Plan:
    """Check every tensor (dtype, device, contiguity, size) and build the offset and program tables."""
    n_blocks = [-(-p.numel() // block_size) for p in params]
    columns, aligned = [], []
    for k, (name, tensors) in enumerate(operands):
        is_absmax = k in (3, 5)
        if k in (0, 1):
            dt = params[0].dtype
        elif is_absmax and not state_8bit:
            dt = torch.float32  # fp32 state: the moment tensors stand in for the (unused) absmax operands
        else:
            dt = torch.float32 if (is_absmax or not state_8bit) else torch.uint8
        base = tensors[0]
        size = base.element_size()
        col = []
        for i, t in enumerate(tensors):
            n = n_blocks[i] if (is_absmax and state_8bit) else params[i].numel()
            if t.dtype != dt or t.device != device or not t.is_contiguous() or t.numel() != n:
                raise ValueError(
                    f"tensor {i}: {name} must be a contiguous {dt} tensor of {n} elements on {device}, got "
                    f"{t.dtype}, {t.numel()} elements on {t.device}, contiguous={t.is_contiguous()}"
                )
            col.append((t.data_ptr() - base.data_ptr()) // size)
        columns.append(col)
        aligned.append(16 // size if all(t.data_ptr() % 16 == 0 for t in tensors) else 1)
    numels = [p.numel() for p in params]
    rows = [[c[i] for c in columns] + [numels[i], 0] for i in range(len(params))]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _TABLE_COLS).to(device)
    progs, n_full = _programs(tuple(numels), block_size, bpp)
    align = (min(aligned[0], aligned[1]), min(aligned[2], aligned[4]), min(aligned[3], aligned[5]))
    return _Plan(table, progs.to(device), n_full, align)


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
    variant: str | KernelVariant | None = None,
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
        block_size: elements per absmax block (power of two >= 16).
        variant: tiling, a name of ``VARIANTS`` or a ``KernelVariant`` (None: "default"); every variant gives
            the same bits.

    One launch for all tensors (two when some tensor ends in a partial tile). The tensors are checked when
    their launch plan is built, i.e. the first time these addresses and sizes are seen.
    """
    _require_triton("adam8bit_multi_tensor_step")
    if not params:
        return
    var = get_variant(variant)
    _check_block(block_size, var.blocks_per_prog)
    state_8bit = exp_avg_absmaxes is not None
    if state_8bit != (exp_avg_sq_absmaxes is not None):
        raise ValueError("exp_avg_absmaxes and exp_avg_sq_absmaxes must both be given or both be None")
    lists = [grads, exp_avgs, exp_avg_sqs] + ([exp_avg_absmaxes, exp_avg_sq_absmaxes] if state_8bit else [])
    if any(len(lst) != len(params) for lst in lists):
        raise ValueError("params, grads and state lists must have the same length")
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _P_DTYPES:
        raise TypeError(f"params must be float32, bfloat16 or float16, got {dtype}")
    operands = (
        ("param", params),
        ("grad", grads),
        ("exp_avg", exp_avgs),
        ("exp_avg_absmax", exp_avg_absmaxes if state_8bit else exp_avgs),
        ("exp_avg_sq", exp_avg_sqs),
        ("exp_avg_sq_absmax", exp_avg_sq_absmaxes if state_8bit else exp_avg_sqs),
    )
    # The key holds what the plan depends on; dtypes of the state tensors are checked at build time (a tensor
    # of another dtype at the same address and size would need the caller to swap state tensors in place).
    key = (device, dtype, state_8bit, block_size, var.blocks_per_prog,
           tuple(t.dtype for t in grads),
           tuple(t.data_ptr() for _, ts in operands for t in ts),
           tuple(t.numel() for _, ts in operands[1:] for t in ts),
           tuple(p.numel() for p in params))
    plan = _PLANS.get(key)
    if plan is None:
        if sum(p.numel() for p in params) == 0:
            return
        plan = _build_plan(params, operands, state_8bit, block_size, var.blocks_per_prog, device)
        _PLANS.put(key, plan)
    tables = _tables(device)
    (code_s, thr_s, coef_s, bound_s), (code_u, thr_u, coef_u, bound_u) = tables[True], tables[False]
    p_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    scalars = (beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, inv_bc2_sqrt, weight_decay,
               decay_factor)
    n_progs = plan.progs.shape[0]
    # Full programs without masks (vector loads), then the tails with masks; the table lists them in order.
    for masked, start, count in ((False, 0, plan.n_full), (True, plan.n_full, n_progs - plan.n_full)):
        if count == 0:
            continue
        _adam_kernel[(count,)](
            plan.table, plan.progs[start:] if start else plan.progs, *(ts[0] for _, ts in operands),
            code_s, code_u, thr_s, coef_s, thr_u, coef_u, bound_s, bound_u, *scalars,
            P_DTYPE=p_dtype,
            STATE_8BIT=state_8bit,
            DECOUPLED=bool(decoupled),
            HAS_WD=weight_decay != 0.0,
            BLOCK=block_size,
            BLOCKS_PER_PROG=var.blocks_per_prog,
            MASKED=masked,
            FIX_BRANCH=var.fix_branch,
            ALIGN_P=plan.align[0],
            ALIGN_S=plan.align[1],
            ALIGN_A=plan.align[2],
            num_warps=var.num_warps,
            **_launch_options(device),
        )
