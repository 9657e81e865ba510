"""lowbit.kernels.hadamard_quant against lowbit.quant: HQ codes, bit splitting, LSS gather, rotation back.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is first
imported), on small shapes; the gpu-marked tests run full shapes on CUDA.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need Triton (lowbit[triton])")

import lowbit.kernels.hadamard_quant as hq  # noqa: E402
from lowbit.quant import (  # noqa: E402
    bit_split,
    hadamard_transform,
    leverage_score_probabilities,
    quantize,
    quantize_with_scale,
)

CPU = pytest.param("cpu", id="cpu-interpret")
GPU = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
U32 = 2.0**-24
F8 = torch.float8_e4m3fn


def _rows(n_rows, n_cols, dtype, device, seed=0, spread=3.0):
    """Gaussian rows whose magnitudes span 10^-spread .. 10^spread (tokens differ by orders)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n_cols, generator=g) * torch.logspace(-spread, spread, n_rows)[:, None]
    return x.to(device=device, dtype=dtype)


def _transform_slack(x, block):
    """Bound on |kernel x̂ - reference x̂| per element: both are fp32 evaluations of the same block sums
    (butterflies: log2(b) roundings, dot: one per accumulation step plus the bf16 pieces of an fp32 input),
    each within (log2(b) + 3)·u·Σ_block|x| / sqrt(b), u = 2^-24."""
    if block in (None, 1):
        return torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    r, c = x.shape
    blocks = x.double().abs().reshape(r, c // block, block).sum(-1, keepdim=True)
    err = 2 * (math.log2(block) + 3) * U32 * blocks / math.sqrt(block)
    return err.expand(r, c // block, block).reshape(r, c)


def _assert_codes_match(codes, ref_codes, v_ref, tol_v):
    """Codes equal, except a difference of one where the reference's pre-rounding value v_ref is within
    tol_v of a .5 rounding boundary (or of the clamp at ±7.5, which never binds)."""
    diff = (codes.float() - ref_codes.float()).abs()
    assert float(diff.max()) <= 1.0
    frac = (v_ref.abs() - v_ref.abs().floor() - 0.5).abs()
    allowed = frac <= tol_v
    bad = (diff > 0) & ~allowed
    assert not bool(bad.any()), f"{int(bad.sum())} codes differ away from a rounding boundary"
    # Boundary cases are rare for continuous data: at most 1% (a failing kernel differs almost everywhere).
    assert float((diff > 0).float().mean()) <= 0.01


def _reference(x, block, granularity, round_rotated=False):
    src = x if round_rotated else x.float()
    xh = hadamard_transform(src, block) if block not in (None, 1) else src
    q = quantize(xh, 4, granularity="token" if granularity == "row" else "tensor")
    return q, xh.float()


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block", [None, 2, 32, 128])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_hadamard_quantize_matches_reference(device, dtype, block, granularity, monkeypatch):
    if device == "cpu":  # split each row over two programs (atomic absmax / Σ codes²), as on the GPU
        monkeypatch.setitem(hq._HQ_CONFIG, "chunk", 128)
    shape = (24, 256) if device == "cpu" else (4096, 4096)
    x = _rows(*shape, dtype, device, seed=block or 1, spread=1.5 if dtype == torch.float16 else 3.0)
    out = hq.hadamard_quantize(x, block, granularity=granularity, transposed_dtype=torch.int8)
    q, xh = _reference(x, block, granularity)
    assert out.codes.dtype == F8 and out.codes.shape == x.shape
    assert out.scale.shape == q.scale.shape and out.scale.dtype == torch.float32
    slack = _transform_slack(x, block)
    # The absmax and the scale move by at most the transform slack of the largest element.
    amax_ref = xh.abs().amax(dim=1)
    amax_tol = slack.amax(dim=1).float()
    assert bool(((out.absmax - amax_ref).abs() <= amax_tol).all())
    amax_tol = amax_tol[:, None] if granularity == "row" else amax_tol.amax().reshape(1, 1)
    scale_tol = amax_tol / 7 + 2 * U32 * q.scale  # plus the rounding of the division
    assert bool(((out.scale - q.scale).abs() <= scale_tol).all())
    v_ref = xh.double() / q.scale.double()
    tol_v = slack / q.scale.double() + v_ref.abs() * (scale_tol / q.scale).double() + 4 * U32 * v_ref.abs()
    _assert_codes_match(out.codes, q.codes, v_ref, tol_v)
    torch.testing.assert_close(out.codes_t.t(), out.codes.float().to(torch.int8), rtol=0, atol=0)
    torch.testing.assert_close(out.code_sumsq, (out.codes.float() ** 2).sum(1), rtol=0, atol=0)
    if dtype != torch.float32 and block not in (None, 1) and device == "cpu":
        # bf16 / fp16 inputs: every block sum is exact here, so the codes are the reference's bit for bit.
        torch.testing.assert_close(out.codes.float(), q.codes.float(), rtol=0, atol=0)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_rotated_matches_transform_in_input_dtype(device, dtype):
    x = _rows(32, 128, dtype, device, seed=7, spread=1.0)
    out = hq.hadamard_quantize(x, 32, granularity="row", codes_dtype=torch.int8, round_rotated=True)
    q, xh = _reference(x, 32, "row", round_rotated=True)
    torch.testing.assert_close(out.scale, q.scale, rtol=0, atol=0)
    # x̂ rounded to the input dtype is the same value as the reference's (exact block sums, one rounding).
    torch.testing.assert_close(out.codes, q.codes, rtol=0, atol=0)
    torch.testing.assert_close(hq.row_absmax(x, 32, round_rotated=True), xh.abs().amax(1), rtol=0, atol=0)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("block", [None, 16])
def test_given_scale_matches_quantize_with_scale_and_clips(device, block):
    x = _rows(20, 64, torch.float32, device, seed=3, spread=0.5)
    xh = hadamard_transform(x, block) if block else x
    scale = xh.abs().median() / 8  # small: about half of the values clip at ±7
    out = hq.hadamard_quantize(x, block, scale=scale, codes_dtype=torch.int8)
    ref = quantize_with_scale(xh, scale, 4)
    v_ref = xh.double() / scale.double()
    tol_v = _transform_slack(x, block) / scale.double() + 4 * U32 * v_ref.abs()
    _assert_codes_match(out.codes, ref, v_ref, tol_v)
    assert int(out.codes.abs().eq(7).sum()) > out.codes.numel() // 4
    assert out.absmax is None and out.scale.shape == (1, 1)


@pytest.mark.parametrize("device", [CPU, GPU])
def test_ties_round_half_to_even(device):
    # No rotation: x / s lands exactly on k + 0.5 (s = 1, absmax 7); torch.round rounds those to even.
    v = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.0, -0.5, -1.5, -2.5, -6.5, 0.0, 3.0, -7.0, 6.49])
    x = v.repeat(16, 1).to(device)
    out = hq.hadamard_quantize(x, None, granularity="row", codes_dtype=torch.int8)
    ref = quantize(x, 4, granularity="token")
    torch.testing.assert_close(out.codes, ref.codes, rtol=0, atol=0)
    torch.testing.assert_close(out.scale, ref.scale, rtol=0, atol=0)
    assert out.codes[0].tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 0, -2, -2, -6, 0, 3, -7, 6]


@pytest.mark.parametrize("device", [CPU, GPU])
def test_zero_rows_and_tensor(device):
    x = torch.zeros(17, 32, device=device, dtype=torch.bfloat16)  # bf16: exact block sums, exact scales
    x[3] = torch.linspace(-1, 1, 32, device=device)
    out = hq.hadamard_quantize(x, 16, granularity="row", codes_dtype=torch.int8)
    ref = quantize(hadamard_transform(x.float(), 16), 4, granularity="token")
    torch.testing.assert_close(out.scale, ref.scale, rtol=0, atol=0)
    torch.testing.assert_close(out.codes, ref.codes, rtol=0, atol=0)
    assert float(out.scale[0]) == 1.0 and int(out.codes[0].abs().sum()) == 0
    zero = hq.hadamard_quantize(torch.zeros(16, 32, device=device), 16, granularity="tensor")
    assert float(zero.scale) == 1.0 and float(zero.codes.float().abs().sum()) == 0.0
    empty = hq.hadamard_quantize(torch.zeros(0, 32, device=device), 16)
    assert empty.codes.shape == (0, 32)


def test_argument_errors():
    x = torch.randn(16, 64)
    with pytest.raises(TypeError, match="x must have dtype"):
        hq.hadamard_quantize(x.to(torch.int32), 16)
    with pytest.raises(ValueError, match="must be 2-D"):
        hq.hadamard_quantize(x.reshape(2, 8, 64), 16)
    with pytest.raises(ValueError, match="contiguous rows"):
        hq.hadamard_quantize(x.t(), 16)
    with pytest.raises(ValueError, match="power of two <= 128"):
        hq.hadamard_quantize(x, 24)
    with pytest.raises(ValueError, match="multiple of block_size"):
        hq.hadamard_quantize(torch.randn(16, 48), 32)
    with pytest.raises(ValueError, match="multiple of max"):
        hq.hadamard_quantize(torch.randn(16, 40), 8)
    with pytest.raises(ValueError, match="granularity"):
        hq.hadamard_quantize(x, 16, granularity="group")
    with pytest.raises(TypeError, match="codes_dtype"):
        hq.hadamard_quantize(x, 16, codes_dtype=torch.float16)
    with pytest.raises(ValueError, match="one-element"):
        hq.hadamard_quantize(x, 16, scale=torch.ones(2))


# ---------------------------------------------------------------------------------------------- bit split


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_bit_split_matches_reference_given_the_same_noise(device, dtype, granularity):
    shape = (19, 300) if device == "cpu" else (4096, 11008)
    g = _rows(*shape, dtype, device, seed=5, spread=4.0)
    gen = torch.Generator(device=device).manual_seed(11)
    ref = bit_split(g, gen, granularity=granularity)
    gen = torch.Generator(device=device).manual_seed(11)
    noise = torch.rand(g.shape, generator=gen, device=device)  # the draw bit_split made
    out = hq.bit_split_quantize(g, granularity=granularity, noise=noise, write_packed=True, write_fp8=True)
    hi, lo = hq.unpack_hi_lo(out.hl)
    for got, want in ((hi, ref.hi), (lo, ref.lo), (out.scale_hi, ref.scale_hi), (out.scale_lo, ref.scale_lo)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(out.v, (14 * ref.hi.int() + ref.lo.int()).to(torch.int8), rtol=0, atol=0)
    torch.testing.assert_close(out.hi_f8.float(), ref.hi.float(), rtol=0, atol=0)
    torch.testing.assert_close(out.lo_f8.float(), ref.lo.float(), rtol=0, atol=0)
    torch.testing.assert_close(out.sumsq_hi, (ref.hi.float() ** 2).sum(1), rtol=0, atol=0)
    torch.testing.assert_close(out.sumsq_lo, (ref.lo.float() ** 2).sum(1), rtol=0, atol=0)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bit_split_folds_column_scales_in_the_same_pass(device, dtype):
    # col_scale: the same pass also splits g ⊙ cs (fp32 products) with its own row scales and the same noise,
    # bit for bit lowbit.quant.bit_split(g.float() * cs, noise=u); the split of g itself is unchanged.
    shape = (19, 300) if device == "cpu" else (4096, 11008)
    g = _rows(*shape, dtype, device, seed=6, spread=4.0)
    cs = torch.logspace(-3, 1, shape[1], device=device)[torch.randperm(shape[1], device=device)]
    noise = torch.rand(g.shape, generator=torch.Generator(device=device).manual_seed(12), device=device)
    out = hq.bit_split_quantize(g, noise=noise, col_scale=cs)
    plain = hq.bit_split_quantize(g, noise=noise)
    torch.testing.assert_close(out.v, plain.v, rtol=0, atol=0)
    ref = bit_split(g.float() * cs, noise=noise)
    v2, s2_hi, s2_lo = out.folded
    torch.testing.assert_close(v2, (14 * ref.hi.int() + ref.lo.int()).to(torch.int8), rtol=0, atol=0)
    torch.testing.assert_close(s2_hi, ref.scale_hi, rtol=0, atol=0)
    torch.testing.assert_close(s2_lo, ref.scale_lo, rtol=0, atol=0)
    # the in-kernel noise is shared too: the folded split equals a separate split of g ⊙ cs, same seed
    seeded = hq.bit_split_quantize(g, seed=9, col_scale=cs)
    alone = hq.bit_split_quantize((g.float() * cs).contiguous(), seed=9)
    torch.testing.assert_close(seeded.folded[0], alone.v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="col_scale"):
        hq.bit_split_quantize(g, noise=noise, col_scale=cs[:-1])
    with pytest.raises(ValueError, match="col_scale"):
        hq.bit_split_quantize(g, noise=noise, col_scale=cs, granularity="tensor")


@pytest.mark.parametrize("device", [CPU, GPU])
def test_bit_split_exact_where_the_fast_division_does_not_apply(device):
    # The kernel divides by multiplying with the row's reciprocal plus two FMA corrections, exact while the
    # scales and nonzero quotients are normal numbers; a program with a row outside that (a nonzero |g| under
    # 2^-96 of its row's scale, a scale under 2^-96) takes the correctly rounded division instead. Rows of
    # both kinds, and an all-zero row, in one tensor: every code equals the reference's, folded split too.
    g = _rows(40, 300, torch.float32, device, seed=8, spread=2.0)
    g[2, 5] = g[2].abs().max() * 2.0**-110  # quotient g / s_lo: a subnormal number
    g[17] = g[17] * 1e-39  # s_hi and s_lo subnormal: 1 / s_lo overflows
    g[26] = 0.0
    g[33, 7] = -g[33].abs().max() * 2.0**-140
    cs = torch.logspace(-2, 1, 300, device=device)
    noise = torch.rand(g.shape, generator=torch.Generator(device=device).manual_seed(3), device=device)
    noise[2, 5] = noise[33, 7] = 0.0  # floor(q + 0) sees the sign of a subnormal q
    out = hq.bit_split_quantize(g, noise=noise, write_packed=True, col_scale=cs)
    ref = bit_split(g, noise=noise)
    hi, lo = hq.unpack_hi_lo(out.hl)
    torch.testing.assert_close(hi, ref.hi, rtol=0, atol=0)
    torch.testing.assert_close(lo, ref.lo, rtol=0, atol=0)
    torch.testing.assert_close(out.scale_lo, ref.scale_lo, rtol=0, atol=0)
    ref2 = bit_split(g * cs, noise=noise)
    torch.testing.assert_close(out.folded[0], (14 * ref2.hi.int() + ref2.lo.int()).to(torch.int8), rtol=0,
                               atol=0)
    assert int(ref.lo[33, 7]) == -1  # the case the guard is for: floor of a tiny negative quotient


@pytest.mark.parametrize("device", [CPU, GPU])
def test_bit_split_in_kernel_noise_is_unbiased_and_seeded(device):
    # Rows of one repeated value c: the mean reconstruction of a row estimates c. Per element the stochastic
    # half has variance <= s_lo^2 / 4, so the row mean of n elements has std <= s_lo / (2 sqrt(n)).
    n = 1024 if device == "cpu" else 1 << 16
    c = torch.tensor([0.3, -1.7, 2.9, 0.05, -0.61, 5.2, -3.33, 1.0], dtype=torch.float64)
    g = torch.empty(8, n, dtype=torch.float64)
    g[:] = c[:, None]
    g[:, 0] = 7.0  # sets s_hi = 1 in every row, so the other elements are not multiples of s_hi
    g = g.float().to(device)
    out = hq.bit_split_quantize(g, seed=123, write_packed=True)
    hi, lo = hq.unpack_hi_lo(out.hl)
    recon = hi.double() * out.scale_hi.double() + lo.double() * out.scale_lo.double()
    mean = recon[:, 1:].mean(1)
    std = out.scale_lo.double().reshape(-1) / (2 * math.sqrt(n - 1))
    assert bool(((mean - g[:, 1].double()).abs() <= 5 * std + 1e-6).all())
    again = hq.bit_split_quantize(g, seed=123, write_packed=True)
    other = hq.bit_split_quantize(g, seed=124, write_packed=True)
    torch.testing.assert_close(again.hl, out.hl, rtol=0, atol=0)
    assert not torch.equal(other.hl, out.hl)
    seed_t = torch.tensor([123], device=device)
    torch.testing.assert_close(hq.bit_split_quantize(g, seed=seed_t).v, out.v, rtol=0, atol=0)


def test_bit_split_argument_errors():
    g = torch.randn(16, 32)
    with pytest.raises(ValueError, match="granularity"):
        hq.bit_split_quantize(g, granularity="channel")
    with pytest.raises(ValueError, match="noise must be"):
        hq.bit_split_quantize(g, noise=torch.rand(16, 31))


# ---------------------------------------------------------------------------------------------- gather


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gather_scaled_rows_matches_index_and_multiply(device, out_dtype):
    g = _rows(40, 96, torch.float32, device, seed=2)
    bs = hq.bit_split_quantize(g, seed=1, write_packed=True)
    hi, lo = hq.unpack_hi_lo(bs.hl)
    x_codes = torch.randint(-7, 8, (40, 80), device=device).to(F8)
    src = torch.tensor([0, 3, 3, 39, 17, 5, 22], device=device)
    half = torch.tensor([0, 0, 1, 1, 0, 1, 0], device=device)
    factor = torch.rand(7, device=device) * 1e-3
    a, b = hq.gather_scaled_rows(bs.hl, x_codes, src, factor, half=half, out_dtype=out_dtype)
    want_a = torch.where(half[:, None] == 0, hi[src], lo[src]).to(out_dtype)
    want_b = (x_codes[src].float() * factor[:, None]).to(out_dtype)  # one fp32 product, RNE to out_dtype
    torch.testing.assert_close(a, want_a, rtol=0, atol=0)
    torch.testing.assert_close(b, want_b, rtol=0, atol=0)
    a_v, _ = hq.gather_scaled_rows(bs.v, x_codes, src, factor)
    torch.testing.assert_close(a_v, bs.v[src].to(torch.bfloat16), rtol=0, atol=0)
    a0, b0 = hq.gather_scaled_rows(bs.v, x_codes, src[:0], factor[:0])
    assert a0.shape == (0, 96) and b0.shape == (0, 80)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_gather_with_a_device_count_zeroes_the_rows_after_it(device, transposed):
    g = _rows(40, 96, torch.float32, device, seed=2)
    bs = hq.bit_split_quantize(g, seed=1, write_packed=True)
    x_codes = torch.randint(-7, 8, (40, 80), device=device).to(F8)
    # The rows after the count hold garbage (out-of-range indices, NaN factors): they must not be read.
    src = torch.tensor([0, 3, 3, 39, 17, 10**6, -5, 10**9], device=device)
    half = torch.tensor([0, 0, 1, 1, 0, 7, 7, 7], device=device)
    factor = torch.tensor([1e-3, 2e-3, 3e-3, 4e-3, 5e-3, float("nan"), float("inf"), 1.0], device=device)
    for kept in (0, 3, 5):
        count = torch.tensor([kept], dtype=torch.int32, device=device)
        a, b = hq.gather_scaled_rows(bs.hl, x_codes, src, factor, half=half, out_dtype=torch.float16,
                                     transposed=transposed, count=count)
        want_a, want_b = hq.gather_scaled_rows(bs.hl, x_codes, src[:kept], factor[:kept], half=half[:kept],
                                               out_dtype=torch.float16, transposed=transposed)
        if transposed:
            a, b = a.t(), b.t()
            want_a, want_b = want_a.t(), want_b.t()
        assert a.shape == (8, 96) and b.shape == (8, 80)
        torch.testing.assert_close(a[:kept], want_a, rtol=0, atol=0)
        torch.testing.assert_close(b[:kept], want_b, rtol=0, atol=0)
        assert not a[kept:].any() and not b[kept:].any()


@pytest.mark.parametrize("device", [CPU, GPU])
def test_leverage_sample_with_a_capacity_does_not_sync_and_keeps_the_same_rows(device):
    n = 40 if device == "cpu" else 16384
    ssq_hi, ssq_lo, s_hi, s_lo, x_ssq, sx = _lss_inputs(n, device)
    synced = hq.leverage_sample_compact(ssq_hi, ssq_lo, s_hi, s_lo, x_ssq, sx, 0.5, seed=3)
    cap = hq.lss_capacity(2 * n, 0.5)
    free = hq.leverage_sample_compact(ssq_hi, ssq_lo, s_hi, s_lo, x_ssq, sx, 0.5, seed=3, capacity=cap)
    assert free.count == cap and free.src.numel() == cap and int(free.kept) == synced.count <= cap
    r = synced.count
    assert torch.equal(free.src[:r], synced.src) and torch.equal(free.half[:r], synced.half)
    assert torch.equal(free.factor[:r], synced.factor) and torch.equal(free.factor_max, synced.factor_max)


def test_lss_capacity_bound():
    # k + 8 sqrt(k) + 16 rounded up to 16, never more than the rows; Chernoff: P(overflow) < e^-32.
    assert hq.lss_capacity(0, 0.5) == 0
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        hq.lss_capacity(100, 0.0)
    assert hq.lss_capacity(32, 0.5) == 32
    for rows, keep in [(2 * 16384, 0.5), (2 * 8192, 0.25), (160, 0.5), (10**6, 0.1)]:
        cap = hq.lss_capacity(rows, keep)
        k = keep * rows
        t = cap - k
        assert cap % 16 == 0 or cap == rows
        assert t >= 8 * math.sqrt(k) + 16 or cap == rows
        assert cap == rows or math.exp(-t * t / (2 * (k + t / 3))) < math.exp(-32)


# ---------------------------------------------------------------------------------------------- sampling


def _lss_inputs(n, device, seed=0, per_token=True):
    g = torch.Generator().manual_seed(seed)
    ssq_hi = torch.randint(0, 400, (n,), generator=g).float()
    ssq_lo = torch.randint(0, 400, (n,), generator=g).float()
    ssq_hi[:3] = 0  # all-zero gradient rows: p = 0, never kept
    ssq_lo[:3] = 0
    s_hi = torch.logspace(-4, 1, n if per_token else 1)[torch.randperm(n if per_token else 1, generator=g)]
    s_hi = s_hi.reshape(-1, 1)
    s_lo = s_hi / 14
    x_ssq = torch.randint(1, 300, (n,), generator=g).float()
    x_scale = torch.tensor([[0.02]])
    return [t.to(device) for t in (ssq_hi, ssq_lo, s_hi, s_lo, x_ssq, x_scale)]


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("keep_ratio", [0.3, 0.5, 1.0])
def test_leverage_sample_compact(device, keep_ratio):
    n = 40 if device == "cpu" else 16384
    ssq_hi, ssq_lo, s_hi, s_lo, x_ssq, sx = _lss_inputs(n, device)
    out = hq.leverage_sample_compact(ssq_hi, ssq_lo, s_hi, s_lo, x_ssq, sx, keep_ratio, seed=3)
    norm_g = torch.cat((s_hi.double().reshape(-1) * ssq_hi.double().sqrt(), s_lo.double().reshape(-1) *
                        ssq_lo.double().sqrt()))
    scores = norm_g * torch.cat([sx.double() * x_ssq.double().sqrt()] * 2).reshape(-1)
    p_ref = leverage_score_probabilities(scores, keep_ratio * 2 * n).double()
    # fp32 scores (5 roundings) and fp32 sums over the 2N rows in the closed form: relative (2N + 10)·u.
    tol = (2 * n + 10) * U32 * p_ref + 1e-7
    assert bool(((out.p.double() - p_ref).abs() <= tol).all())
    assert bool((out.p[scores == 0] == 0).all())
    # compaction: increasing stacked index, factor = s_h · s_x / p of the row, count = number kept
    j = out.src.long() + n * out.half.long()
    assert out.count == out.src.numel() and bool((j[1:] > j[:-1]).all())
    assert bool((out.p[j] > 0).all()) and bool((out.p[(out.p == 1)] == 1).all())
    assert bool(torch.isin(torch.nonzero(out.p == 1).squeeze(1), j).all())  # p = 1 rows are always kept
    s_h = torch.where(out.half == 0, s_hi.reshape(-1)[out.src.long()], s_lo.reshape(-1)[out.src.long()])
    torch.testing.assert_close(out.factor, (s_h * sx.reshape(())) / out.p[j], rtol=0, atol=0)
    torch.testing.assert_close(out.factor_max, out.factor.amax().reshape(1), rtol=0, atol=0)
    # the number kept is a sum of Bernoulli(p): within 5 standard deviations of Σ p
    mean, var = float(out.p.double().sum()), float((out.p.double() * (1 - out.p.double())).sum())
    assert abs(out.count - mean) <= 5 * math.sqrt(var) + 1e-9


@pytest.mark.parametrize("device", [CPU, GPU])
def test_gather_pow2_round_is_exact_in_fp8_and_unbiased(device):
    # 4 factors x 64 repeats of one source row: the power-of-two roundings of the repeats are independent,
    # each with relative std <= 1/sqrt(8), so their mean is within 5 · 0.354 / 8 of the factor.
    reps = 64
    g = _rows(4, 128, torch.float32, device, seed=8)
    bs = hq.bit_split_quantize(g, seed=2, write_packed=True)
    x_codes = torch.randint(1, 8, (4, 96), device=device).to(F8)  # nonzero: every entry shows its factor
    base = torch.tensor([3.0e-3, 7.7e-2, 1.1, 2.3e-7], device=device)  # the last one under the window
    factor = base.repeat_interleave(reps)
    src = torch.arange(4, device=device).repeat_interleave(reps)
    half = torch.zeros_like(src)
    a_t, b_t, t = hq.gather_scaled_rows(bs.hl, x_codes, src, factor, half=half, out_dtype=F8, transposed=True,
                                        pad_to=16, pow2_round=(factor.amax().reshape(1), 5))
    assert a_t.shape == (128, 4 * reps) and b_t.shape == (96, 4 * reps)
    hi, _ = hq.unpack_hi_lo(bs.hl)
    torch.testing.assert_close(a_t.float().t(), hi[src].float(), rtol=0, atol=0)
    t = float(t)
    assert math.log2(t).is_integer() and 32 < float(base.max()) / t <= 64
    fhat = b_t.float().t() / x_codes[src].float()  # per row one power of two in [2^-9, 2^6], or 0
    row = fhat[:, 0]
    assert bool((fhat == row[:, None]).all())
    pos = row[row > 0]
    assert bool((torch.log2(pos) == torch.round(torch.log2(pos))).all())
    assert bool((pos >= 2.0**-9).all()) and bool((pos <= 64).all())
    mean = (row * t).reshape(4, reps).double().mean(1)
    rel = (mean - base.double()).abs() / base.double()
    assert bool((rel[:3] <= 5 * math.sqrt(1 / 8) / math.sqrt(reps)).all())
    # under the window: 2^-9·t with probability v / 2^-9 (v = 2.3e-7 / t), else 0: mean within 5 sigma
    q = float(base[3]) / t / 2.0**-9
    assert abs(float(mean[3]) / (2.0**-9 * t) - q) <= 5 * math.sqrt(q * (1 - q) / reps)


# ---------------------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("in_dtype", [torch.int32, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [None, 16, 128])
def test_hadamard_rows_matches_fp64_transform(device, in_dtype, block, monkeypatch):
    if device == "cpu":
        monkeypatch.setitem(hq._HQ_CONFIG, "chunk", 128)
    r, c = (24, 256) if device == "cpu" else (4096, 4096)
    gen = torch.Generator().manual_seed(4)
    if in_dtype == torch.int32:
        x = torch.randint(-(2**22), 2**22, (r, c), generator=gen, dtype=torch.int32)
    else:
        x = torch.randn(r, c, generator=gen).to(in_dtype)
    x = x.to(device)
    rs = torch.rand(r, generator=gen).to(device) + 0.5
    sc = torch.tensor([0.375], device=device)
    out = hq.hadamard_rows(x, block, row_scale=rs, scale=sc, out_dtype=torch.float32)
    xs = x.double() * rs.double()[:, None] * 0.375
    ref = hadamard_transform(xs, block) if block else xs
    # fp32 block sums (three exact bf16 pieces for int32 / fp32 input) and two scale products.
    tol = _transform_slack(xs, block) + 4 * U32 * ref.abs()
    assert bool(((out.double() - ref).abs() <= tol).all())
    out_bf16 = hq.hadamard_rows(x, block, row_scale=rs, scale=sc, out_dtype=torch.bfloat16)
    # then one rounding to bf16: unit roundoff 2^-8 of the fp32 value
    assert bool(((out_bf16.double() - ref).abs() <= tol + 2.0**-8 * (ref.abs() + tol)).all())


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [None, 32])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_transposed_codes_equal_the_codes(device, dtype, block, granularity):
    # FP8 codes and their transposed copy (the operands of the all-FP8 "rtn" backward), against the int8
    # codes of the same launch: the same integers, in E4M3 bytes (H100 run 4: transposed FP8 tiles held
    # bytes that were no code at all, e.g. 32.0 and NaN).
    shape = (48, 256) if device == "cpu" else (4096, 4096)
    x = _rows(*shape, dtype, device, seed=3, spread=3.0)
    f8 = hq.hadamard_quantize(x, block, granularity=granularity, codes_dtype=F8, transposed_dtype=F8)
    i8 = hq.hadamard_quantize(x, block, granularity=granularity, codes_dtype=torch.int8)
    want = i8.codes.float()
    for what, got in (("codes", f8.codes.float()), ("codes_t.T", f8.codes_t.t().float())):
        bad = got != want
        assert not bool(bad.any()), (
            f"{what}: {int(bad.sum())} of {bad.numel()} differ; first at {bad.nonzero()[0].tolist()}; "
            f"values there {got[bad][:8].tolist()} vs {want[bad][:8].tolist()}")
    # The E4M3 bytes are the ones torch's conversion gives (+0 for a zero code).
    ref = want.to(F8).view(torch.uint8)
    ref = torch.where(want == 0, torch.zeros_like(ref), ref)
    assert torch.equal(f8.codes.view(torch.uint8), ref)
