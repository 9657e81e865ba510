"""Tests for lowbit.quant.codebook: the dynamic map and block-wise codebook quantization."""

import math
import zlib

import pytest
import torch

from lowbit.quant import codebook
from lowbit.quant.codebook import decision_boundaries, dequantize_blockwise, dynamic_map, quantize_blockwise

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _oracle_codes(x: torch.Tensor, code: torch.Tensor, block_size: int):
    """Brute force: normalize as the spec says, then argmin |xn - code| in float64 (exact for these values:
    where two distances are close, xn lies between the two codes and the differences are exact), first
    index on ties."""
    flat = x.reshape(-1).float().cpu()
    n = flat.numel()
    nb = -(-n // block_size)
    blocks = torch.nn.functional.pad(flat, (0, nb * block_size - n)).view(nb, block_size)
    absmax = blocks.abs().amax(1)
    scale = torch.ones_like(absmax) / absmax.clamp_min(2.0**-126)
    xn = (blocks * scale[:, None]).reshape(-1)[:n]
    dist = (xn.double()[:, None] - code.double().cpu()[None, :]).abs()  # (n, K)
    return dist.argmin(dim=1).to(torch.uint8), absmax, xn


# -- dynamic_map ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_dynamic_map_structure(signed, bits):
    code = dynamic_map(signed, bits)
    assert code.dtype == torch.float32 and code.shape == (2**bits,)
    assert bool((code[1:] > code[:-1]).all())
    assert 0.0 in code.tolist() and code[-1].item() == 1.0
    if signed:
        assert code[0].item() < 0 and code[0].item() > -1.0  # -1 is not in the map (its slot holds +1)
        neg, pos = code[: 2 ** (bits - 1) - 1], code[2 ** (bits - 1) : -1]
        torch.testing.assert_close(neg.flip(0), -pos, rtol=0, atol=0)  # symmetric except +1
    else:
        assert code[0].item() == 0.0


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_decades(signed):
    """Each decade [10^-(e+1), 10^-e] holds 2^f codes at the centres of 2^f equal bins (tree quantization)."""
    code = dynamic_map(signed, 8).double()
    pos = code[(code > 0) & (code < 1)]
    for e in range(7):
        f = (6 - e) if signed else (7 - e)
        in_decade = pos[(pos > 10.0 ** -(e + 1)) & (pos < 10.0**-e)]
        assert in_decade.numel() == 2**f
        j = torch.arange(2**f, dtype=torch.float64)
        expected = 10.0**-e * (0.1 + 0.9 * (j + 0.5) / 2**f)
        # float32 evaluation of the recipe: a few roundings of 2^-24 relative each
        torch.testing.assert_close(in_decade, expected, rtol=4 * 2.0**-24, atol=0)


def test_dynamic_map_known_values():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert signed[127].item() == 0.0 and signed[255].item() == 1.0
    assert signed[0].item() == pytest.approx(-(1 - 0.9 / 128), rel=1e-7)  # -0.99296875
    assert signed[128].item() == pytest.approx(0.55e-6, rel=1e-6)  # 10^-6 * (0.1 + 0.45)
    assert unsigned[1].item() == pytest.approx(0.325e-6, rel=1e-6)  # 10^-6 * (0.1 + 0.9 / 4)
    assert unsigned[254].item() == pytest.approx(1 - 0.9 / 256, rel=1e-7)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    ours = dynamic_map(signed)
    theirs = bnb_functional.create_dynamic_map(signed=signed).float()
    ulp = torch.nextafter(ours.abs(), torch.tensor(2.0)) - ours.abs()
    assert float(((ours - theirs).abs() / ulp).max()) <= 2.0  # documented: at most 2 ulp apart


def test_dynamic_map_errors():
    with pytest.raises(ValueError, match="bits"):
        dynamic_map(True, 9)
    with pytest.raises(ValueError, match="bits"):
        dynamic_map(True, 1)
    with pytest.raises(TypeError, match="signed"):
        dynamic_map("yes")


# -- decision boundaries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_decision_boundaries_round_down_midpoints(signed):
    code = dynamic_map(signed)
    b = decision_boundaries(code)
    mid = (code[:-1].double() + code[1:].double()) / 2
    assert b.dtype == torch.float32 and b.shape == (255,)
    assert bool((b.double() <= mid).all())
    up = torch.nextafter(b, torch.full_like(b, math.inf))
    assert bool((up.double() > mid).all())  # the largest float32 <= midpoint


def test_decision_boundaries_errors():
    with pytest.raises(ValueError, match="increasing"):
        decision_boundaries(torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="float32"):
        decision_boundaries(torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        decision_boundaries(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        decision_boundaries([0.0, 1.0])


# -- quantize_blockwise ------------------------------------------------------------------------------------


def _test_inputs(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    g = generator
    return {
        "normal": torch.randn(n, generator=g),
        "heavy_tailed": torch.randn(n, generator=g) ** 3,
        "wide_range": torch.randn(n, generator=g) * torch.logspace(-9, 0, n)[torch.randperm(n, generator=g)],
        "positive": torch.rand(n, generator=g) ** 4,
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [256, 64, 100, 1])
@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "wide_range", "positive"])
def test_quantize_equals_bruteforce_argmin(device, signed, block_size, kind):
    g = torch.Generator().manual_seed(zlib.crc32(repr((signed, block_size, kind)).encode()))
    x = _test_inputs(3 * 256 + 77, g)[kind].to(device)
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, code, block_size)
    expected_codes, expected_absmax, _ = _oracle_codes(x, code, block_size)
    assert codes.dtype == torch.uint8 and codes.device.type == device
    torch.testing.assert_close(absmax.cpu(), expected_absmax, rtol=0, atol=0)
    torch.testing.assert_close(codes.cpu(), expected_codes, rtol=0, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_at_every_boundary(signed):
    """Normalized values on every decision boundary and 1-3 float32 steps either side: exact argmin, and an
    exact midpoint goes to the lower index."""
    code = dynamic_map(signed)
    b = decision_boundaries(code)
    pts = [b, code]
    for _ in range(3):
        pts += [torch.nextafter(pts[-2], torch.tensor(math.inf)),
                torch.nextafter(pts[-2], torch.tensor(-math.inf))]
    xn = torch.cat(pts)
    xn = torch.cat([xn, -xn]).clamp(-1, 1)
    # one element 1.0 per block of 256 keeps absmax = 1, so the normalized value is xn itself
    blocks = torch.nn.functional.pad(xn, (0, (-xn.numel()) % 255)).view(-1, 255)
    x = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    codes, absmax = quantize_blockwise(x, code, 256)
    assert bool((absmax == 1).all())
    expected, _, _ = _oracle_codes(x, code, 256)
    torch.testing.assert_close(codes, expected, rtol=0, atol=0)


def test_quantize_tie_goes_to_lower_index():
    code = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    # 1.0 (absmax), then the midpoints of (0, 0.25), (-1, -0.5), (0.25, 1), (-0.5, 0)
    x = torch.tensor([1.0, 0.125, -0.75, 0.625, -0.25])
    codes, _ = quantize_blockwise(x, code, 5)
    assert codes.tolist() == [4, 2, 0, 3, 1]


@pytest.mark.parametrize("n", [1, 255, 256, 257, 3 * 256 + 17])
def test_partial_last_block(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    codes, absmax = quantize_blockwise(x, dynamic_map(), 256)
    nb = -(-n // 256)
    assert codes.shape == (n,) and absmax.shape == (nb,)
    assert absmax[-1].item() == x[(nb - 1) * 256 :].abs().max().item()  # the last block's own elements only
    y = dequantize_blockwise(codes, absmax, dynamic_map(), 256, (n,))
    assert y.shape == (n,)


def test_all_zero_block_no_nan():
    x = torch.zeros(3, 256)
    x[1] = torch.randn(256)
    for signed in (True, False):
        code = dynamic_map(signed)
        codes, absmax = quantize_blockwise(x, code, 256)
        assert absmax[0].item() == 0.0 and absmax[2].item() == 0.0
        y = dequantize_blockwise(codes, absmax, code, 256, x.shape)
        assert bool(torch.isfinite(y).all())
        assert bool((y[0] == 0).all()) and bool((y[2] == 0).all())
        assert bool((code[codes.view(3, 256)[0].long()] == 0).all())  # the code of 0.0 itself


def test_subnormal_absmax_is_finite():
    x = torch.tensor([1e-39, -5e-40, 0.0, 3e-40])  # absmax below 2^-126
    codes, absmax = quantize_blockwise(x, dynamic_map(), 4)
    y = dequantize_blockwise(codes, absmax, dynamic_map(), 4, (4,))
    assert bool(torch.isfinite(y).all()) and float((y - x).abs().max()) <= 1e-39


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_bound(device, signed):
    """|x - deq(x)| <= absmax * (half the gap of the code interval holding xn) + float32 rounding; outside the
    table's range (xn < code[0]) the error is the distance to the end."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4096, generator=g) * torch.logspace(-6, 0, 4096)
    if not signed:
        x = x.abs()
    x = x.to(device)
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, code, 256)
    y = dequantize_blockwise(codes, absmax, code, 256, x.shape)
    _, _, xn = _oracle_codes(x, code, 256)
    c = code.double()
    k = torch.bucketize(xn.double(), c).clamp(1, c.numel() - 1)  # xn in [c[k-1], c[k]]
    half_gap = (c[k] - c[k - 1]) / 2
    beyond = (c[0] - xn.double()).clamp_min(0)  # signed map: xn below -0.99297
    scale = absmax.double().cpu().repeat_interleave(256)[: x.numel()]
    bound = scale * (torch.maximum(half_gap, beyond) + 4 * 2.0**-24) + 1e-45
    err = (x.double().cpu() - y.double().cpu()).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes(dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(dtype)
    codes, absmax = quantize_blockwise(x, dynamic_map(), 128)
    ref_codes, ref_absmax = quantize_blockwise(x.float(), dynamic_map(), 128)
    assert absmax.dtype == torch.float32
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


def test_shapes_and_noncontiguous():
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(4))
    code = dynamic_map()
    codes_t, absmax_t = quantize_blockwise(x.t(), code, 64)  # non-contiguous: flattened in row-major order
    codes_c, absmax_c = quantize_blockwise(x.t().contiguous(), code, 64)
    assert torch.equal(codes_t, codes_c) and torch.equal(absmax_t, absmax_c)
    y = dequantize_blockwise(codes_t, absmax_t, code, 64, x.t().shape)
    assert y.shape == (30, 40)


def test_chunked_path_equals_one_chunk(monkeypatch):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(5))
    code = dynamic_map()
    whole = quantize_blockwise(x, code, 64)
    deq_whole = dequantize_blockwise(*whole, code, 64, x.shape)
    monkeypatch.setattr(codebook, "_CHUNK_ELEMENTS", 3 * 64)
    chunked = quantize_blockwise(x, code, 64)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert torch.equal(deq_whole, dequantize_blockwise(*chunked, code, 64, x.shape))


def test_empty_tensor():
    codes, absmax = quantize_blockwise(torch.zeros(0), dynamic_map(), 256)
    assert codes.shape == (0,) and absmax.shape == (0,)
    assert dequantize_blockwise(codes, absmax, dynamic_map(), 256, (0,)).shape == (0,)


def test_quantize_errors():
    code = dynamic_map()
    with pytest.raises(TypeError, match="float32, bfloat16"):
        quantize_blockwise(torch.arange(10), code)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_blockwise([1.0, 2.0], code)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            quantize_blockwise(torch.randn(10), code, bad)
    with pytest.raises(ValueError, match="code"):
        quantize_blockwise(torch.randn(10), code.double())
    with pytest.raises(ValueError, match="increasing"):
        quantize_blockwise(torch.randn(10), code.flip(0))


def test_dequantize_errors():
    code = dynamic_map()
    codes, absmax = quantize_blockwise(torch.randn(300), code, 256)
    with pytest.raises(ValueError, match="needs 301"):
        dequantize_blockwise(codes, absmax, code, 256, (301,))
    with pytest.raises(ValueError, match="absmax has 2 elements"):
        dequantize_blockwise(codes, absmax, code, 100, (300,))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blockwise(codes.int(), absmax, code, 256, (300,))
    with pytest.raises(TypeError, match="float32"):
        dequantize_blockwise(codes, absmax.double(), code, 256, (300,))
