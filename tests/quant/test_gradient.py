import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import (
    BitSplit,
    bit_split,
    bit_split_dequantize,
    leverage_score_probabilities,
    leverage_score_sample,
    leverage_scores,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
U = 2.0**-24
N_SE = 5  # Monte Carlo tests allow this many standard errors


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _heavy(shape, seed, device="cpu"):
    g = _gen("cpu", seed)
    # rows differing by orders of magnitude, heavy tails within a row
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    x = x * torch.exp(3 * torch.randn(*shape[:-1], 1, generator=g))
    return x.to(device)


# ---------------------------------------------------------------- bit splitting


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(16, 32), (2, 5, 64), (7,)])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_bit_split_codes_scales_and_bounds(device, shape, granularity):
    g = _heavy(shape, seed=len(shape), device=device)
    bs = bit_split(g, _gen(device, 0), granularity=granularity)
    assert isinstance(bs, BitSplit)
    for codes in (bs.hi, bs.lo):
        assert codes.dtype == torch.int8 and codes.shape == g.shape
        assert int(codes.abs().max()) <= 7
    expected_scale_shape = (*shape[:-1], 1) if granularity == "token" else (1,) * len(shape)
    assert bs.scale_hi.shape == expected_scale_shape and bs.scale_hi.dtype == torch.float32
    if granularity == "token":
        absmax = g.abs().amax(-1, keepdim=True)
    else:
        absmax = g.abs().max().reshape(expected_scale_shape)
    # correctly rounded divisions: the same bits as the CPU
    torch.testing.assert_close(bs.scale_hi.cpu(), absmax.cpu() / 7, rtol=0, atol=0)
    torch.testing.assert_close(bs.scale_lo.cpu(), bs.scale_hi.cpu() / 14, rtol=0, atol=0)
    # hi: round-to-nearest that never needs its clamp (|g / s_hi| <= 7 by construction)
    unclamped = torch.round(g / bs.scale_hi)
    assert int(unclamped.abs().max()) <= 7
    torch.testing.assert_close(bs.hi, unclamped.to(torch.int8), rtol=0, atol=0)
    # the absmax element of each scale group maps to ±7
    hi_absmax = bs.hi.abs().amax(-1) if granularity == "token" else bs.hi.abs().max()
    assert bool((hi_absmax == 7).all())
    # residual bound |r| <= s_hi / 2, then |r / s_lo| <= 7, reconstruction error < s_lo
    r = g - bs.hi.float() * bs.scale_hi
    assert bool((r.abs() <= bs.scale_hi * (0.5 + 16 * U)).all())
    err = (bit_split_dequantize(bs) - g).abs()
    assert bool((err < bs.scale_lo * (1 + 64 * U)).all())
    # lo is one of the two neighbours of r / s_lo (stochastic rounding)
    v = r / bs.scale_lo
    lo = bs.lo.float()
    assert bool(((lo == torch.floor(v).clamp(-7, 7)) | (lo == torch.ceil(v).clamp(-7, 7))).all())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), cols=st.integers(1, 40),
       log_mag=st.floats(-30.0, 30.0), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_bit_split_bounds_property(seed, rows, cols, log_mag, dtype):
    if dtype == torch.float16:
        log_mag = max(min(log_mag, 4.0), -4.0)
    g = (torch.randn(rows, cols, generator=_gen("cpu", seed)) * math.exp(log_mag)).to(dtype)
    bs = bit_split(g, _gen("cpu", seed))
    g32 = g.float()
    assert int(torch.round(g32 / bs.scale_hi).abs().max()) <= 7  # hi never clamps
    err = (bit_split_dequantize(bs) - g32).abs()
    assert bool((err < bs.scale_lo * (1 + 64 * U)).all())
    assert bit_split_dequantize(bs, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_bit_split_hi_deterministic_lo_random(device):
    g = _heavy((8, 64), seed=3, device=device)
    a = bit_split(g, _gen(device, 1))
    b = bit_split(g, _gen(device, 2))
    c = bit_split(g, _gen(device, 1))
    torch.testing.assert_close(a.hi, b.hi, rtol=0, atol=0)
    torch.testing.assert_close(a.lo, c.lo, rtol=0, atol=0)
    assert not torch.equal(a.lo, b.lo)


@pytest.mark.parametrize("device", DEVICES)
def test_bit_split_unbiased(device):
    # N identical rows, per-token scales: the same hi and scales in every row, independent lo.
    n_draws = 4000
    row = _heavy((1, 48), seed=5, device=device)
    g = row.expand(n_draws, -1).contiguous()
    bs = bit_split(g, _gen(device, 7))
    mean = bit_split_dequantize(bs).mean(0)
    s_lo = bs.scale_lo[0, 0]
    # lo · s_lo is a two-point variable of step s_lo: variance <= s_lo² / 4
    se = s_lo / (2 * math.sqrt(n_draws))
    dev = (mean - row[0]).abs()
    assert bool((dev <= N_SE * se + 64 * U * bs.scale_hi[0, 0]).all()), float(dev.max() / se)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_bit_split_zero_rows(device, granularity):
    g = torch.zeros(4, 16, device=device)
    if granularity == "token":
        g[2] = torch.linspace(-3, 3, 16, device=device)
    bs = bit_split(g, _gen(device, 0), granularity=granularity)
    rec = bit_split_dequantize(bs)
    assert bool(torch.isfinite(rec).all()) and bool(torch.isfinite(bs.scale_hi).all())
    zero_rows = g.abs().amax(-1) == 0
    if granularity == "token":
        assert bool((bs.scale_hi[zero_rows] == 1.0).all())
    else:
        assert float(bs.scale_hi) == 1.0
    assert bool((bs.hi[zero_rows] == 0).all()) and bool((bs.lo[zero_rows] == 0).all())
    assert bool((rec[zero_rows] == 0).all())


def test_bit_split_bad_args():
    with pytest.raises(ValueError, match="granularity"):
        bit_split(torch.randn(4, 4), granularity="group")
    with pytest.raises(TypeError, match="g must be a floating-point"):
        bit_split(torch.ones(4, 4, dtype=torch.int64))


# ---------------------------------------------------------------- leverage scores


def _iterative_oracle(scores, k):
    """Iterated clamp-and-rescale in Python floats (the definition)."""
    s = [float(v) for v in scores]
    nonzero = [i for i, v in enumerate(s) if v > 0]
    if k >= len(nonzero):
        return [1.0 if v > 0 else 0.0 for v in s]
    clamped = set()
    while True:
        free = [i for i in nonzero if i not in clamped]
        c = (k - len(clamped)) / sum(s[i] for i in free)
        new = {i for i in free if c * s[i] >= 1}
        if not new:
            break
        clamped |= new
    return [1.0 if i in clamped else (c * s[i] if s[i] > 0 else 0.0) for i in range(len(s))]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    data=st.lists(
        st.one_of(st.just(0.0), st.floats(1e-6, 1.0), st.floats(1.0, 1e6), st.sampled_from([0.5, 2.0])),
        min_size=1, max_size=40,
    ),
    k_frac=st.floats(0.01, 1.0),
)
def test_probabilities_match_iterative_oracle(data, k_frac):
    scores = torch.tensor(data, dtype=torch.float32)
    n = len(data)
    k = max(k_frac * n, 1e-3)
    p = leverage_score_probabilities(scores, k)
    ref = torch.tensor(_iterative_oracle(scores.double(), k), dtype=torch.float64)
    assert p.dtype == torch.float32 and p.shape == scores.shape
    # the only difference is the final rounding to fp32 (and fp64 sums, ~n·2^-53)
    torch.testing.assert_close(p.double(), ref, rtol=0, atol=U + n * 2.0**-50)
    assert bool(((p >= 0) & (p <= 1)).all())
    assert bool((p[scores == 0] == 0).all())
    m = int((scores > 0).sum())
    assert abs(float(p.double().sum()) - min(k, m)) <= n * U * 2


@pytest.mark.parametrize("device", DEVICES)
def test_probabilities_edge_cases(device):
    s = torch.tensor([0.0, 3.0, 1.0, 0.0, 2.0], device=device)
    # k >= number of nonzero scores: every nonzero score is kept surely
    for k in (3, 4, 5, 3.5):
        torch.testing.assert_close(leverage_score_probabilities(s, k), (s > 0).float(), rtol=0, atol=0)
    # one huge score saturates, the rest share the budget in proportion
    s = torch.tensor([1000.0, 1.0, 1.0, 2.0], device=device)
    p = leverage_score_probabilities(s, 2)
    torch.testing.assert_close(p, torch.tensor([1.0, 0.25, 0.25, 0.5], device=device), rtol=0, atol=U)
    # all zero scores: nothing kept
    assert bool((leverage_score_probabilities(torch.zeros(4, device=device), 2) == 0).all())
    assert leverage_score_probabilities(s, 2).device.type == device


@pytest.mark.parametrize(
    "scores,k,match",
    [
        (torch.tensor([1.0, -1.0]), 1, "scores"),
        (torch.tensor([1.0, float("nan")]), 1, "scores"),
        (torch.tensor([1.0, float("inf")]), 1, "scores"),
        (torch.ones(2, 2), 1, "scores"),
        (torch.ones(3, dtype=torch.int64), 1, "scores"),
        (torch.ones(3), 0, "k"),
        (torch.ones(3), 4, "k"),
        (torch.ones(3), -1.0, "k"),
        (torch.ones(3), True, "k"),
        (torch.ones(0), 1, "k"),
    ],
)
def test_probabilities_bad_args(scores, k, match):
    with pytest.raises(ValueError, match=match):
        leverage_score_probabilities(scores, k)
    with pytest.raises(ValueError, match=match):
        leverage_score_sample(scores, k)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_structure(device):
    s = torch.tensor([0.0, 5.0, 1.0, 100.0, 0.0, 2.0, 3.0, 0.5], device=device)
    p = leverage_score_probabilities(s, 3)
    for seed in range(20):
        kept, inv_prob = leverage_score_sample(s, 3, _gen(device, seed))
        assert kept.dtype == torch.int64 and inv_prob.dtype == torch.float32
        assert kept.device.type == device and inv_prob.shape == kept.shape
        assert bool((kept[1:] > kept[:-1]).all())  # sorted, unique
        torch.testing.assert_close(inv_prob, 1.0 / p[kept], rtol=0, atol=0)
        kept_set = set(kept.tolist())
        assert not kept_set & {0, 4}  # p = 0 never kept
        assert 3 in kept_set  # p = 1 always kept


@pytest.mark.parametrize("device", DEVICES)
def test_sample_unbiased_monte_carlo(device):
    n, k, trials = 40, 10, 4000
    g = _gen("cpu", 0)
    scores = torch.rand(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    scores[::7] = 0.0
    a = torch.randn(n, generator=g, dtype=torch.float64) + 0.5
    scores, a = scores.to(device), a.to(device)
    p = leverage_score_probabilities(scores, k).double()
    nonzero = scores > 0
    target = float(a[nonzero].sum())
    gen = _gen(device, 123)
    estimates, counts = [], []
    for _ in range(trials):
        kept, inv_prob = leverage_score_sample(scores, k, gen)
        estimates.append(float((inv_prob.double() * a[kept]).sum()))
        counts.append(kept.numel())
    # Var[Σ_kept a_i / p_i] = Σ a_i² (1 - p_i) / p_i ; Var[#kept] = Σ p_i (1 - p_i)
    pn, an = p[nonzero], a[nonzero]
    se_est = math.sqrt(float((an**2 * (1 - pn) / pn).sum()) / trials)
    se_cnt = math.sqrt(float((pn * (1 - pn)).sum()) / trials)
    assert abs(sum(estimates) / trials - target) <= N_SE * se_est
    assert abs(sum(counts) / trials - k) <= N_SE * se_cnt


@pytest.mark.parametrize("device", DEVICES)
def test_leverage_scores_oracle(device):
    g = _gen("cpu", 4)
    grad_y = torch.randn(2, 3, 5, generator=g).to(device)
    x = torch.randn(2, 3, 7, generator=g).to(device, torch.bfloat16)
    c = leverage_scores(grad_y, x)
    assert c.shape == (6,) and c.dtype == torch.float32
    gy_rows, x_rows = grad_y.reshape(6, 5).double(), x.reshape(6, 7).double()
    ref = torch.tensor([math.sqrt(float((gy_rows[i] ** 2).sum())) * math.sqrt(float((x_rows[i] ** 2).sum()))
                        for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(c.double().cpu(), ref, rtol=16 * U, atol=0)
    with pytest.raises(ValueError, match="leading shape"):
        leverage_scores(torch.randn(4, 5), torch.randn(3, 5))


@pytest.mark.gpu
def test_bit_split_hi_cuda_equals_cpu():
    g = _heavy((16, 64), seed=8)
    ref, got = bit_split(g), bit_split(g.cuda())
    for a, b in ((got.hi, ref.hi), (got.scale_hi, ref.scale_hi), (got.scale_lo, ref.scale_lo)):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
