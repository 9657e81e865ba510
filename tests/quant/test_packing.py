import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import pack_bits, pack_bits_int32, pack_int4, unpack_bits, unpack_bits_int32, unpack_int4

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

shapes = st.tuples(st.lists(st.integers(1, 3), max_size=2), st.integers(0, 70)).map(lambda t: (*t[0], t[1]))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_signs(shape, seed):
    return torch.randint(0, 2, shape, generator=_gen(seed), dtype=torch.int8) * 2 - 1


# ---------------------------------------------------------------- INT4


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]))
def test_int4_round_trip_property(shape, seed, dtype):
    codes = torch.randint(-8, 8, shape, generator=_gen(seed)).to(dtype)
    packed = pack_int4(codes)
    n = shape[-1]
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], (n + 1) // 2)
    out = unpack_int4(packed, n)
    assert out.dtype == torch.int8
    torch.testing.assert_close(out, codes.to(torch.int8), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 6, 7])
def test_int4_layout_oracle(device, n):
    codes = torch.randint(-8, 8, (3, n), generator=_gen(n)).to(device=device, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.device.type == device
    c, p = codes.cpu().tolist(), packed.cpu().tolist()
    for r in range(3):
        row = c[r] + [0] * (n % 2)  # odd n: padded with a 0 code
        for i in range(len(p[r])):
            # low nibble = even index, two's complement nibbles
            assert p[r][i] == (row[2 * i] & 0xF) | ((row[2 * i + 1] & 0xF) << 4)
    torch.testing.assert_close(unpack_int4(packed, n), codes, rtol=0, atol=0)
    # without n the padding comes back as a trailing 0 code
    full = unpack_int4(packed)
    assert full.shape[-1] == 2 * packed.shape[-1]
    if n % 2:
        assert bool((full[..., -1] == 0).all())


def test_int4_errors():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_int4(torch.tensor([0, 8], dtype=torch.int8))
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_int4(torch.tensor([-9, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="codes must be an integer"):
        pack_int4(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="codes must have"):
        pack_int4(torch.tensor(1, dtype=torch.int8))
    packed = pack_int4(torch.zeros(2, 7, dtype=torch.int8))
    with pytest.raises(TypeError, match="packed must be"):
        unpack_int4(packed.to(torch.int8), 7)
    for bad_n in (5, 9, -1, 7.0):
        with pytest.raises(ValueError, match="n must be"):
            unpack_int4(packed, bad_n)


# ---------------------------------------------------------------- 1-bit signs


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["bool", torch.int8, torch.int32, torch.float32, torch.float16, torch.bfloat16]))
def test_bits_round_trip_property(shape, seed, kind):
    signs = _random_signs(shape, seed)
    inp = signs > 0 if kind == "bool" else signs.to(kind)
    n = shape[-1]
    for pack, unpack, per, dtype in ((pack_bits, unpack_bits, 8, torch.uint8),
                                     (pack_bits_int32, unpack_bits_int32, 32, torch.int32)):
        packed = pack(inp)
        assert packed.dtype == dtype and packed.shape == (*shape[:-1], -(-n // per))
        out = unpack(packed, n)
        assert out.dtype == torch.int8
        torch.testing.assert_close(out, signs, rtol=0, atol=0)
        torch.testing.assert_close(unpack(packed, n, dtype=torch.float32), signs.float(), rtol=0, atol=0)
        torch.testing.assert_close(unpack(packed, n, dtype=torch.bool), signs > 0, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 8, 13, 32, 45, 64])
def test_bits_layout_oracle(device, n):
    signs = _random_signs((2, n), n).to(device)
    s = signs.cpu().tolist()
    packed8, packed32 = pack_bits(signs), pack_bits_int32(signs)
    assert packed8.device.type == device and packed32.device.type == device
    for pk, per in ((packed8.cpu().tolist(), 8), (packed32.cpu().tolist(), 32)):
        for r in range(2):
            for e in range(len(pk[r]) * per):
                word = pk[r][e // per] & ((1 << per) - 1)  # two's complement int32 -> its 32 bits
                bit = (word >> (e % per)) & 1
                # bit j of word i is element per·i + j; +1 -> 1, -1 (and padding) -> 0
                assert bit == (1 if e < n and s[r][e] == 1 else 0)
    torch.testing.assert_close(unpack_bits(packed8, n), signs, rtol=0, atol=0)
    torch.testing.assert_close(unpack_bits_int32(packed32, n), signs, rtol=0, atol=0)
    # default n: padded length, padding reads as -1
    assert unpack_bits(packed8).shape[-1] == 8 * packed8.shape[-1]
    assert bool((unpack_bits(packed8)[..., n:] == -1).all())


def test_int32_uses_sign_bit():
    signs = -torch.ones(32, dtype=torch.int8)
    signs[31] = 1  # only bit 31 set: the most negative int32
    packed = pack_bits_int32(signs)
    assert int(packed[0]) == -(2**31)
    torch.testing.assert_close(unpack_bits_int32(packed, 32), signs, rtol=0, atol=0)
    assert int(pack_bits_int32(torch.ones(32))[0]) == -1  # all 32 bits set


def test_bits_errors():
    for bad in (torch.tensor([1, 0, -1]), torch.tensor([1.0, 0.5]), torch.tensor([2, -1], dtype=torch.int8)):
        with pytest.raises(ValueError, match="signs must contain only"):
            pack_bits(bad)
        with pytest.raises(ValueError, match="signs must contain only"):
            pack_bits_int32(bad)
    with pytest.raises(TypeError, match="signs must be"):
        pack_bits([1, -1])
    with pytest.raises(ValueError, match="signs must have"):
        pack_bits(torch.tensor(True))
    packed = pack_bits(torch.ones(2, 13))
    with pytest.raises(TypeError, match="packed must be"):
        unpack_bits(packed.to(torch.int32), 13)
    with pytest.raises(TypeError, match="packed must be"):
        unpack_bits_int32(packed, 13)
    for bad_n in (8, 17, 0, 13.0):
        with pytest.raises(ValueError, match="n must be"):
            unpack_bits(packed, bad_n)
