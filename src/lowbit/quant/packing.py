"""Bit packing along the last dimension: signed INT4 two per byte, 1-bit signs eight per byte or 32 per int32.

Layouts (element e of the last dim, n elements):
- ``pack_int4``:  byte i = (code[2i] & 0xF) | (code[2i+1] & 0xF) << 4  (low nibble = even index), two's
  complement nibbles, so codes in [-8, 7]. Shape (..., n) -> (..., ceil(n / 2)) uint8.
- ``pack_bits``:  bit j of byte i = [sign of element 8i + j is +1]  (+1 -> 1, -1 -> 0).
  Shape (..., n) -> (..., ceil(n / 8)) uint8.
- ``pack_bits_int32``: bit j of word i = [element 32i + j is +1]; bit 31 is the int32 sign bit.
  Shape (..., n) -> (..., ceil(n / 32)) int32.

When n is not a multiple of the elements per byte/word, the last byte/word is padded (with code 0, or with
bit 0 = -1 for signs); pass the true n to the unpack function to drop the padding (n defaults to the
padded length). Value checks (codes in range, signs ±1) synchronize with the device once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pack_bits", "pack_bits_int32", "pack_int4", "unpack_bits", "unpack_bits_int32", "unpack_int4"]

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_unpack(packed: torch.Tensor, n: int | None, per_item: int, dtype: torch.dtype) -> int:
    if not isinstance(packed, torch.Tensor) or packed.dtype != dtype:
        got = getattr(packed, "dtype", type(packed).__name__)
        raise TypeError(f"packed must be a {dtype} tensor, got {got}")
    if packed.ndim < 1:
        raise ValueError("packed must have at least 1 dim")
    m = packed.shape[-1]
    if n is None:
        return m * per_item
    if isinstance(n, bool) or not isinstance(n, int) or -(-n // per_item) != m or n < 0:
        raise ValueError(
            f"n must be an int with ceil(n / {per_item}) == packed.shape[-1] ({m}), "
            f"i.e. in [{max(per_item * (m - 1) + 1, 0)}, {per_item * m}], got {n!r}"
        )
    return n


def _pad_last(t: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    pad = -t.shape[-1] % multiple
    return F.pad(t, (0, pad), value=value) if pad else t


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed INT4 codes, two per uint8 along the last dim (low nibble = even index).

    Args:
        codes: integer tensor (int8/16/32/64 or uint8), values in [-8, 7], at least 1 dim (..., n).

    Returns:
        uint8 (..., ceil(n / 2)); an odd n is padded with a 0 code (unpack with n to drop it).
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"codes must be an integer tensor (int8/int16/int32/int64/uint8), "
            f"got {getattr(codes, 'dtype', type(codes).__name__)}"
        )
    if codes.ndim < 1:
        raise ValueError("codes must have at least 1 dim")
    c = codes.to(torch.int16)
    if c.numel() and not bool(((c >= -8) & (c <= 7)).all()):
        raise ValueError("codes must lie in [-8, 7] (signed INT4)")
    c = _pad_last(c, 2, 0) & 0xF
    c = c.reshape(*c.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., m) -> int8 codes (..., n) in [-8, 7].

    ``n`` (default 2·m) must satisfy ceil(n / 2) == m; pass it for an odd original length.
    """
    n = _check_unpack(packed, n, 2, torch.uint8)
    p = packed.to(torch.int16)
    nibbles = torch.stack((p & 0xF, p >> 4), dim=-1)  # (..., m, 2), 0..15
    signed = (nibbles ^ 8) - 8  # two's complement nibble -> [-8, 7]
    return signed.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.int8)


def _sign_bits(signs: torch.Tensor) -> torch.Tensor:
    """±1 (or bool) -> int64 bits (+1 -> 1, -1/False -> 0), with a clear error for other values."""
    if not isinstance(signs, torch.Tensor):
        raise TypeError(f"signs must be a tensor, got {type(signs).__name__}")
    if signs.ndim < 1:
        raise ValueError("signs must have at least 1 dim")
    if signs.dtype == torch.bool:
        return signs.to(torch.int64)
    if signs.is_complex():
        raise TypeError(f"signs must be bool, integer or floating ±1, got {signs.dtype}")
    if signs.numel() and not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError("signs must contain only +1 and -1 (or be a bool tensor)")
    return (signs > 0).to(torch.int64)


def _pack_bits_to(signs: torch.Tensor, width: int) -> torch.Tensor:
    bits = _pad_last(_sign_bits(signs), width, 0)
    bits = bits.reshape(*bits.shape[:-1], -1, width)
    weights = torch.bitwise_left_shift(torch.ones(width, dtype=torch.int64, device=bits.device),
                                       torch.arange(width, device=bits.device))
    return (bits * weights).sum(dim=-1)  # int64 in [0, 2^width)


def _unpack_bits_from(words: torch.Tensor, width: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    shifts = torch.arange(width, device=words.device)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1  # (..., m, width)
    out = bits.reshape(*words.shape[:-1], -1)[..., :n]
    if dtype == torch.bool:
        return out.bool()
    return (2 * out - 1).to(dtype)


def pack_bits(signs: torch.Tensor) -> torch.Tensor:
    """Pack ±1 signs eight per uint8 along the last dim: bit j of byte i <- element 8i + j (+1 -> 1).

    Args:
        signs: bool (True = +1) or integer/floating tensor holding only ±1 (ValueError otherwise), (..., n).

    Returns:
        uint8 (..., ceil(n / 8)); padding bits are 0 (= -1).
    """
    return _pack_bits_to(signs, 8).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int | None = None, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., m) -> ±1 of ``dtype`` (..., n) (bool dtype: True = +1).

    ``n`` (default 8·m) must satisfy ceil(n / 8) == m.
    """
    n = _check_unpack(packed, n, 8, torch.uint8)
    return _unpack_bits_from(packed, 8, n, dtype)


def pack_bits_int32(signs: torch.Tensor) -> torch.Tensor:
    """Pack ±1 signs 32 per int32 along the last dim: bit j of word i <- element 32i + j (+1 -> 1).

    Returns int32 (..., ceil(n / 32)); bit 31 is the two's complement sign bit of the word.
    """
    words = _pack_bits_to(signs, 32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's complement int32
    return words.to(torch.int32)


def unpack_bits_int32(
    packed: torch.Tensor, n: int | None = None, dtype: torch.dtype = torch.int8
) -> torch.Tensor:
    """Inverse of :func:`pack_bits_int32`: int32 (..., m) -> ±1 of ``dtype`` (..., n); ceil(n / 32) == m."""
    n = _check_unpack(packed, n, 32, torch.int32)
    # Sign extension to int64 keeps the low 32 bits, so shifting by j < 32 reads bit j of the word.
    return _unpack_bits_from(packed, 32, n, dtype)
