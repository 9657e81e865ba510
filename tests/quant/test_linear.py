import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import compute_scale, qmax, quantize, quantize_with_scale, round_to_int

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
U = 2.0**-24  # unit roundoff of fp32
N_SE = 5  # Monte Carlo tests allow this many standard errors

GRANULARITY_CASES = [("tensor", None), ("channel", None), ("token", None), ("group", 8), ("group", 4)]


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _data(shape, device, seed, dtype=torch.float32):
    g = _gen("cpu", seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))  # varied magnitudes
    return x.to(device=device, dtype=dtype)


def _rtn_tol(scale, bits):
    # v = fl(x / s) (+ z) is off by <= (|x / s| + z) · u <= 2 · 2^bits · u code units, and fl(c · s) adds
    # another |c| · u; the total is below 4 · 2^bits · u code units, i.e. 4 · 2^bits · u · s.
    return scale / 2 + 4 * 2**bits * U * scale


def _oracle_scale(x, bits, granularity, group_size):
    """Scales computed with explicit loops over the scale groups."""
    q = qmax(bits)
    x = x.float()
    if granularity == "tensor":
        return (x.abs().max() / q).reshape([1] * x.ndim)
    if granularity == "channel":
        return torch.stack([x[i].abs().max() / q for i in range(x.shape[0])]).reshape(-1, *[1] * (x.ndim - 1))
    rows = x.reshape(-1, x.shape[-1])
    if granularity == "token":
        out = torch.stack([r.abs().max() / q for r in rows])
        return out.reshape(*x.shape[:-1], 1)
    out = torch.stack(
        [rows[i, j : j + group_size].abs().max() / q for i in range(rows.shape[0])
         for j in range(0, x.shape[-1], group_size)]
    )
    return out.reshape(*x.shape[:-1], x.shape[-1] // group_size, 1)


def test_qmax_formula():
    for bits in range(2, 9):
        assert qmax(bits) == 2 ** (bits - 1) - 1
    assert qmax(4) == 7


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        qmax(bits)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 8), bits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity,group_size", GRANULARITY_CASES)
@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 8)])
def test_scale_matches_loop_oracle_and_layout(device, granularity, group_size, shape):
    x = _data(shape, device, seed=1)
    bits = 4
    qt = quantize(x, bits, granularity=granularity, group_size=group_size)
    ref_scale = _oracle_scale(x.cpu(), bits, granularity, group_size)
    assert qt.scale.shape == ref_scale.shape
    assert qt.scale.dtype == torch.float32 and qt.scale.device.type == device
    torch.testing.assert_close(qt.scale.cpu(), ref_scale, rtol=0, atol=0)
    scale = compute_scale(x, bits, granularity, group_size)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=0, atol=0)
    # keepdim layout: codes * scale broadcasts and equals dequantize() after reshaping to x's shape
    assert qt.codes.dtype == torch.int8 and qt.zero_point is None and qt.shape == x.shape
    torch.testing.assert_close((qt.codes * qt.scale).reshape(x.shape), qt.dequantize(), rtol=0, atol=0)
    # codes are round-to-nearest of x / s, laid out per granularity
    x_view = x.reshape(qt.codes.shape)
    expected = torch.round(x_view / qt.scale).clamp(-7, 7).to(torch.int8)
    torch.testing.assert_close(qt.codes, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity,group_size", GRANULARITY_CASES)
def test_code_ranges(device, bits, granularity, group_size):
    x = _data((8, 32), device, seed=bits)
    q = qmax(bits)
    sym = quantize(x, bits, granularity=granularity, group_size=group_size)
    assert sym.codes.dtype == torch.int8
    assert int(sym.codes.min()) >= -q and int(sym.codes.max()) <= q
    # the absmax element of every scale group maps to ±qmax exactly
    absmax_codes = sym.codes.abs().amax(dim=-1)
    assert bool((absmax_codes == q).all() if granularity in ("token", "group") else absmax_codes.max() == q)

    asym = quantize(x, bits, granularity=granularity, group_size=group_size, symmetric=False)
    assert asym.codes.dtype == torch.uint8
    assert int(asym.codes.max()) <= 2**bits - 1
    zp = asym.zero_point
    assert zp.dtype == torch.int32 and zp.shape == asym.scale.shape
    assert int(zp.min()) >= 0 and int(zp.max()) <= 2**bits - 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("offset", [0.0, 3.0, -3.0])
def test_asymmetric_zero_exact(device, bits, offset):
    # the range always includes 0 (also for all-positive / all-negative data) so 0 is represented exactly
    x = _data((4, 16), device, seed=7) + offset
    x[:, 5] = 0.0
    qt = quantize(x, bits, granularity="token", symmetric=False)
    deq = qt.dequantize()
    assert bool((deq[:, 5] == 0).all())
    assert bool((qt.codes[:, 5].to(torch.int32) == qt.zero_point[:, 0]).all())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(2, 8),
    case=st.sampled_from(GRANULARITY_CASES),
    symmetric=st.booleans(),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    log_mag=st.floats(-20.0, 20.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_rtn_error_bound_property(seed, bits, case, symmetric, rows, groups, log_mag, dtype):
    granularity, group_size = case
    if dtype == torch.float16:
        log_mag = max(min(log_mag, 6.0), -6.0)  # keep fp16 data in its normal range
    x = (_data((rows, 8 * groups), "cpu", seed) * math.exp(log_mag)).to(dtype)
    qt = quantize(x, bits, granularity=granularity, group_size=group_size, symmetric=symmetric)
    x32 = x.float().reshape(qt.codes.shape)
    err = (x32 - qt.dequantize().reshape(qt.codes.shape)).abs()
    assert bool(torch.isfinite(qt.scale).all())
    assert bool((err <= _rtn_tol(qt.scale, bits)).all()), float((err / qt.scale).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computed_in_fp32(device, dtype):
    x = _data((4, 32), device, seed=3, dtype=dtype)
    for sym in (True, False):
        qt = quantize(x, 4, granularity="group", group_size=8, symmetric=sym)
        ref = quantize(x.float(), 4, granularity="group", group_size=8, symmetric=sym)
        torch.testing.assert_close(qt.codes, ref.codes, rtol=0, atol=0)
        torch.testing.assert_close(qt.scale, ref.scale, rtol=0, atol=0)
        assert qt.dequantize().dtype == torch.float32
        out = qt.dequantize(dtype)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out, ref.dequantize().to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity,group_size", GRANULARITY_CASES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero(device, granularity, group_size, symmetric):
    x = torch.zeros(4, 16, device=device)
    x[1, :8] = torch.linspace(-1, 1, 8, device=device)  # some groups nonzero, the others all zero
    for data in (torch.zeros_like(x), x):
        for stochastic in (False, True):
            qt = quantize(data, 4, granularity=granularity, group_size=group_size, symmetric=symmetric,
                          stochastic=stochastic, generator=_gen(device, 0))
            deq = qt.dequantize()
            assert bool(torch.isfinite(qt.scale).all()) and bool(torch.isfinite(deq).all())
            zero_groups = _oracle_scale(data.cpu(), 4, granularity, group_size).to(device) == 0
            # documented choice: an all-zero group has scale 1.0 and codes 0 (at the zero point if asymmetric)
            assert bool((qt.scale[zero_groups] == 1.0).all())
            assert bool((qt.scale[~zero_groups] < 1.0).all())
            zero_code = 0 if symmetric else qt.zero_point
            assert bool(((qt.codes == zero_code) | ~zero_groups).all())
            assert bool((deq[data == 0] == 0).all())


def test_empty_tensor():
    qt = quantize(torch.zeros(0, 8), 4, granularity="token")
    assert qt.codes.shape == (0, 8) and qt.dequantize().shape == (0, 8)
    qt = quantize(torch.zeros(0, 8), 4)
    assert float(qt.scale) == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_stochastic_rounding_unbiased(device, bits, symmetric):
    # N identical rows quantized per token: every row has the same scale, independent noise.
    n_draws = 4000
    row = torch.randn(1, 64, generator=_gen("cpu", 11)).to(device)
    x = row.expand(n_draws, -1).contiguous()
    kwargs = dict(granularity="token", symmetric=symmetric, stochastic=True)
    qt = quantize(x, bits, **kwargs, generator=_gen(device, 5))
    deq = qt.dequantize()
    s = qt.scale[0, 0]
    # each draw is one of the two neighbouring grid points
    assert bool(((deq - x).abs() <= s * (1 + 4 * 2**bits * U)).all())
    mean = deq.mean(0)
    se = s / (2 * math.sqrt(n_draws))  # Bernoulli of step s has variance <= s^2 / 4
    inside = torch.ones_like(row[0], dtype=torch.bool)
    if not symmetric:  # unbiased inside the grid range [-z s, (2^b - 1 - z) s] (module docstring)
        z = qt.zero_point[0, 0].float()
        inside = (row[0] >= -z * s) & (row[0] <= (2**bits - 1 - z) * s)
        assert int(inside.sum()) >= 48  # the test must cover most of the data
    dev = (mean - row[0]).abs()[inside]
    assert bool((dev <= N_SE * se + 4 * 2**bits * U * s).all()), float(dev.max() / se)
    # and reproducible from the generator
    again = quantize(x, bits, **kwargs, generator=_gen(device, 5))
    torch.testing.assert_close(again.codes, qt.codes, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_round_to_int(device):
    v = _data((2000,), device, seed=2) * 10
    r = round_to_int(v)
    assert r.dtype == v.dtype
    assert bool(((r - v).abs() <= 0.5).all()) and bool((r == torch.round(r)).all())
    s = round_to_int(v, stochastic=True, generator=_gen(device, 1))
    assert bool(((s == torch.floor(v)) | (s == torch.floor(v) + 1)).all())
    # unbiased: E[s - v] = 0, each term has variance <= 1/4
    n_draws = 2000
    frac = torch.full((n_draws,), 0.3, device=device)
    draws = round_to_int(frac, stochastic=True, generator=_gen(device, 2))
    assert abs(float(draws.mean()) - 0.3) <= N_SE * 0.5 / math.sqrt(n_draws)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_with_scale(device, bits):
    x = _data((4, 16), device, seed=4)
    scale = compute_scale(x, bits, "token")
    codes = quantize_with_scale(x, scale, bits)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    torch.testing.assert_close(codes, quantize(x, bits, granularity="token").codes, rtol=0, atol=0)
    # a too-small (e.g. learned) scale clamps to [-qmax, qmax]
    q = qmax(bits)
    clamped = quantize_with_scale(x, scale / 4, bits)
    assert int(clamped.max()) == q and int(clamped.min()) == -q
    assert bool((clamped == torch.round(x / (scale / 4)).clamp(-q, q)).all())
    # float scale and stochastic path
    sc = quantize_with_scale(x, 0.1, bits, stochastic=True, generator=_gen(device, 0))
    v = (x / 0.1).clamp(-q, q)
    assert bool(((sc.float() - v).abs() < 1 + 1e-5).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(granularity="row"), "granularity"),
        (dict(granularity="group"), "group_size"),
        (dict(granularity="group", group_size=0), "group_size"),
        (dict(granularity="group", group_size=5), "group_size"),
        (dict(granularity="token", group_size=4), "group_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(4, 16), 4, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="channel"):
        quantize(torch.randn(16), 4, granularity="channel")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quantize(torch.ones(4, 4, dtype=torch.int32), 4)


def test_tensor_granularity_any_rank():
    for shape in [(), (5,), (2, 3, 4)]:
        x = torch.randn(shape)
        qt = quantize(x, 8)
        assert qt.scale.shape == torch.Size([1] * len(shape))
        assert bool(((x - qt.dequantize()).abs() <= _rtn_tol(qt.scale, 8)).all())


def test_channel_keeps_dim0_of_nd_weight():
    x = _data((3, 2, 4), "cpu", seed=9)
    qt = quantize(x, 4, granularity="channel")
    assert qt.scale.shape == (3, 1, 1)
    for i, j, k in itertools.product(range(3), range(2), range(4)):
        assert float(qt.scale[i, 0, 0]) == float(x[i].abs().max() / 7)
        assert abs(float(x[i, j, k] - qt.dequantize()[i, j, k])) <= float(_rtn_tol(qt.scale[i, 0, 0], 4))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity,group_size", GRANULARITY_CASES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_equals_cpu_bit_for_bit(bits, granularity, group_size, symmetric):
    # every operation is elementwise fp32 with correctly rounded division (or an exact max), so the
    # device must not change a bit: kernels are held to the same reference.
    x = _data((16, 64), "cpu", seed=bits, dtype=torch.bfloat16)
    ref = quantize(x, bits, granularity=granularity, group_size=group_size, symmetric=symmetric)
    got = quantize(x.cuda(), bits, granularity=granularity, group_size=group_size, symmetric=symmetric)
    torch.testing.assert_close(got.codes.cpu(), ref.codes, rtol=0, atol=0)
    torch.testing.assert_close(got.scale.cpu(), ref.scale, rtol=0, atol=0)
    if not symmetric:
        torch.testing.assert_close(got.zero_point.cpu(), ref.zero_point, rtol=0, atol=0)
    got_codes = quantize_with_scale(x.cuda(), 0.01, bits).cpu()
    torch.testing.assert_close(got_codes, quantize_with_scale(x, 0.01, bits), rtol=0, atol=0)
