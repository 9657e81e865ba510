"""Codebook quantization: the dynamic (tree) map and block-wise absmax quantization.

A *code* is a sorted 1-D float32 table of at most 256 values; a code byte ``c`` stands for ``code[c]``.
Block-wise quantization (Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization", eq. 1-2)
cuts the flattened tensor into blocks of ``block_size`` elements, normalizes each block by its absolute
maximum and stores, for every element, the index of the code value nearest to the normalized value:

    absmax_b = max_{i in b} |x_i|                          (fp32, exact)
    s_b      = 1 / max(absmax_b, 2^-126)                   (fp32 division, correctly rounded)
    xn_i     = x_i * s_b                                   (fp32 multiplication)
    codes_i  = argmin_k |xn_i - code[k]|                   (exact nearest; a tie goes to the LOWER index k)
    x_i     ~= code[codes_i] * absmax_b                    (one fp32 multiplication)

One division per block and a multiplication per element (as bitsandbytes does) keeps the fused kernels cheap;
``xn`` is within one ulp of x / absmax and may exceed 1 in magnitude by that ulp (the nearest code is then
still the end of the table). The floor 2^-126 (smallest normal float32) keeps s finite: an all-zero block
gets xn = 0 (the code nearest 0, no NaN), and a block whose absmax is subnormal (< 1.2e-38) is scaled by
2^126 instead of 1/absmax (its codes are then smaller than they could be; its values are below 1.2e-38).

"Nearest" is exact: the index is the number of decision boundaries strictly below ``xn_i``, where boundary k
is the largest float32 that is <= the exact midpoint (code[k] + code[k+1]) / 2 (``decision_boundaries``).
For a float32 ``xn`` this gives the same answer as comparing with the exact real midpoint, so the result
equals a brute-force argmin of |xn - code[k]| in exact arithmetic, ties to the lower index. A tie happens
only when ``xn`` is exactly a midpoint that float32 can represent; the lower index is the code value closer
to -inf (for negative ``xn`` the one of larger magnitude). The Triton kernels (lowbit.kernels.adam8bit)
reproduce these bytes exactly.

The dynamic map (``dynamic_map``) follows the dynamic tree quantization of Dettmers (2016, arXiv 1511.04561)
as used in Dettmers et al. 2021: a byte is [sign bit] [e zero bits] [indicator 1] [f fraction bits]; the run
of e zeros is a decimal exponent, the fraction is linear inside [0.1, 1]:

    value = sign * 10^(-e) * (0.1 + 0.9 * (j + 1/2) / 2^f),   j = 0 .. 2^f - 1

signed, ``bits`` = b:   e = 0 .. b-2, f = b-2-e   ->  2^(b-1) - 1 positive values, their negatives,
                        0 (all magnitude bits zero) and 1.0 (the pattern "negative zero" is reused for +1)
unsigned:               the sign bit becomes a fraction bit, e = 0 .. b-2, f = b-1-e  ->  2^b - 2 values,
                        plus 0 and 1.0

Each value is evaluated in float32, in this order (a fixed recipe, so that any implementation can recompute
an entry from its index bit for bit):

    t = (j + 1/2) / 2^f            exact
    value = D_e * (0.1f + 0.9f * t)   with D_e = fl32(10^-e), 0.1f = fl32(0.1), 0.9f = fl32(0.9), each *, +
                                      rounded to float32

For b = 8 this is bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`` (the table
bitsandbytes' 8-bit optimizers use): the same 256 values, in the same sorted order, up to float32 rounding —
bitsandbytes evaluates the formula in different float32 steps (``torch.linspace``, means, products). The two
tables differ by at most 2 ulp (relative 1.2e-7) in any entry; about half the entries are identical. The
signed map has +1 but not -1 (its most negative value is -0.99296875 for b = 8): a block's most negative
element, when it sets the absmax, is stored as -0.99297 * absmax, as in bitsandbytes.

Dtypes: inputs fp32, bf16, fp16 (fp64 is accepted and computed in fp32); all arithmetic is fp32; codes are
uint8 and absmax is fp32. Non-finite inputs are not checked (checking would synchronize the device): a block
holding inf or NaN gets a non-finite absmax and meaningless codes.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "decision_boundaries",
    "dequantize_blockwise",
    "dynamic_map",
    "quantize_blockwise",
]

# Elements per chunk in quantize/dequantize: bounds the fp32 and int32 temporaries (about 12 bytes per
# element) to ~200 MB whatever the tensor size.
_CHUNK_ELEMENTS = 1 << 24

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# fl32(10^-e) of the dynamic map, written as literals (correctly rounded, as a kernel's constants are).
_DECADES = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6)
# Smallest normal float32: the floor of the absmax before taking its reciprocal.
_MIN_NORMAL = 2.0**-126


def dynamic_map(signed: bool = True, bits: int = 8) -> torch.Tensor:
    """The dynamic (tree) quantization map: ``2**bits`` sorted float32 values (see the module docstring).

    Args:
        signed: True -> values in [-1, 1] (first Adam moment); False -> values in [0, 1] (second moment).
        bits: 2 .. 8. The table has exactly ``2**bits`` distinct values and contains 0 and 1.

    Returns:
        (2**bits,) float32 on the CPU, strictly increasing. For bits=8 signed: index 127 is 0.0, index 255 is
        1.0, index 0 is -0.99296875 (approximately); unsigned: index 0 is 0.0, index 255 is 1.0.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    f32 = torch.float32
    mags = []
    for e in range(bits - 1):  # e = number of zero bits before the indicator bit
        f = (bits - 2 - e) if signed else (bits - 1 - e)  # fraction bits left
        t = (torch.arange(2**f, dtype=torch.float64) + 0.5) / 2**f  # exact in float32 (f <= 7)
        decade = torch.tensor(_DECADES[e], dtype=f32)
        mags.append(decade * (torch.tensor(0.1, dtype=f32) + torch.tensor(0.9, dtype=f32) * t.to(f32)))
    magnitudes = torch.cat(mags).tolist()
    values = magnitudes + ([-m for m in magnitudes] if signed else []) + [0.0, 1.0]
    code = torch.tensor(sorted(values), dtype=torch.float32)
    if code.numel() != 2**bits or not bool((code[1:] > code[:-1]).all()):  # pragma: no cover - by design
        raise AssertionError("dynamic map construction is inconsistent")
    return code


def _check_code(code: torch.Tensor) -> None:
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a torch.Tensor, got {type(code).__name__}")
    if code.dtype != torch.float32 or code.ndim != 1 or not 2 <= code.numel() <= 256:
        raise ValueError(
            "code must be a 1-D float32 tensor of 2..256 values, got "
            f"dtype={code.dtype}, shape={tuple(code.shape)}"
        )


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def decision_boundaries(code: torch.Tensor) -> torch.Tensor:
    """Float32 decision boundaries of ``code``: boundary k is the largest float32 <= (code[k] + code[k+1])/2.

    ``torch.bucketize(xn, decision_boundaries(code))`` (right=False) is then the exact nearest-code index of
    a float32 ``xn`` with ties to the lower index. The midpoint is formed in float64, which is exact when
    neighbouring code values are within a factor 2^29 of each other (every dynamic map is).

    Args:
        code: (K,) float32, strictly increasing, 2 <= K <= 256, any device.

    Returns:
        (K-1,) float32 on code's device, strictly increasing.

    Raises:
        ValueError: code is not a 1-D float32 tensor of 2..256 strictly increasing values.
    """
    _check_code(code)
    c64 = code.double()
    if not bool((c64[1:] > c64[:-1]).all()) or not bool(torch.isfinite(c64).all()):
        raise ValueError("code must be finite and strictly increasing")
    mid64 = (c64[:-1] + c64[1:]) * 0.5
    mid32 = mid64.float()
    rounded_up = mid32.double() > mid64
    return torch.where(rounded_up, torch.nextafter(mid32, torch.full_like(mid32, -math.inf)), mid32)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax codebook quantization of ``x`` (the math is in the module docstring).

    Args:
        x: any shape, fp32 / bf16 / fp16 / fp64, any device; flattened in row-major order (a non-contiguous
            tensor is copied). Blocks are consecutive runs of ``block_size`` flat elements; the last block may
            be partial.
        code: (K,) float32 sorted code, K <= 256 (e.g. ``dynamic_map()``); moved to x's device if needed.
        block_size: elements per block, a positive int (default 256, bitsandbytes' optimizer block).

    Returns:
        codes_u8: (x.numel(),) uint8, index into ``code``.
        absmax: (ceil(x.numel() / block_size),) float32, the absolute maximum of each block (0.0 for an
            all-zero block, whose elements get the index of the code value nearest 0 — no NaN).

    Raises:
        TypeError: x is not a floating-point tensor of a supported dtype.
        ValueError: bad code or block_size.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    _check_block_size(block_size)
    boundaries = decision_boundaries(code).to(x.device)
    x_flat = x.reshape(-1)
    n = x_flat.numel()
    n_blocks = -(-n // block_size)
    codes_u8 = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    chunk_blocks = max(1, _CHUNK_ELEMENTS // block_size)
    for b0 in range(0, n_blocks, chunk_blocks):
        b1 = min(n_blocks, b0 + chunk_blocks)
        e0, e1 = b0 * block_size, min(n, b1 * block_size)
        x_chunk = x_flat[e0:e1].float()
        pad = (b1 - b0) * block_size - (e1 - e0)  # only the last chunk can end in a partial block
        if pad:
            x_chunk = torch.nn.functional.pad(x_chunk, (0, pad))
        x_blocks = x_chunk.view(b1 - b0, block_size)  # (nb, block_size)
        am = x_blocks.abs().amax(dim=1)  # (nb,)
        scale = torch.div(torch.ones_like(am), am.clamp_min(_MIN_NORMAL))  # tensor / tensor: IEEE everywhere
        xn = x_blocks * scale[:, None]
        idx = torch.bucketize(xn, boundaries, out_int32=True).view(-1)
        codes_u8[e0:e1] = idx[: e1 - e0].to(torch.uint8)
        absmax[b0:b1] = am
    return codes_u8, absmax


def dequantize_blockwise(
    codes_u8: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    shape: tuple[int, ...] | torch.Size,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: ``x_i = code[codes_i] * absmax[i // block_size]`` (fp32 product).

    Args:
        codes_u8: uint8, numel = prod(shape) (any shape; read in flat order). Every byte must be < len(code).
        absmax: (ceil(prod(shape) / block_size),) float32 (any shape with that numel).
        code: (K,) float32 code the bytes index; moved to codes_u8's device if needed.
        block_size: the block size used to quantize, a positive int.
        shape: shape of the result.

    Returns:
        float32 tensor of ``shape`` on codes_u8's device.

    Raises:
        TypeError / ValueError: wrong dtypes, or element / block counts that do not match ``shape``.
    """
    if not isinstance(codes_u8, torch.Tensor) or codes_u8.dtype != torch.uint8:
        raise TypeError(f"codes_u8 must be a uint8 tensor, got {getattr(codes_u8, 'dtype', type(codes_u8))}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be a float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    _check_code(code)
    _check_block_size(block_size)
    shape = torch.Size(shape)
    n = shape.numel()
    if codes_u8.numel() != n:
        raise ValueError(f"codes_u8 has {codes_u8.numel()} elements but shape {tuple(shape)} needs {n}")
    n_blocks = -(-n // block_size)
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"absmax has {absmax.numel()} elements but {n} elements in blocks of {block_size} need {n_blocks}"
        )
    device = codes_u8.device
    code = code.to(device)
    codes_flat = codes_u8.reshape(-1)
    absmax_flat = absmax.reshape(-1).to(device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    chunk_blocks = max(1, _CHUNK_ELEMENTS // block_size)
    for b0 in range(0, n_blocks, chunk_blocks):
        b1 = min(n_blocks, b0 + chunk_blocks)
        e0, e1 = b0 * block_size, min(n, b1 * block_size)
        values = code.index_select(0, codes_flat[e0:e1].int())
        full = (e1 - e0) // block_size  # whole blocks of this chunk, then at most one partial block
        out_chunk = out[e0:e1]
        out_chunk[: full * block_size].view(full, block_size).copy_(
            values[: full * block_size].view(full, block_size) * absmax_flat[b0 : b0 + full, None]
        )
        if full * block_size < e1 - e0:
            out_chunk[full * block_size :] = values[full * block_size :] * absmax_flat[b0 + full]
    return out.view(shape)
