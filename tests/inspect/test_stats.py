"""Pure statistics of lowbit.inspect: SQNR, moments/kurtosis, outlier share, quantized products."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.inspect import (
    Moments,
    SqnrSum,
    can_rotate,
    fake_quant,
    kurtosis,
    outlier_channel_share,
    quantized_matmul,
    rotate,
    sqnr_db,
)
from lowbit.quant import hadamard_transform, quantize


def test_sqnr_db_values_and_edges():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0, abs=1e-12)
    assert sqnr_db(1.0, 1.0) == 0.0
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(0.0, 0.0) is None
    with pytest.raises(ValueError, match=">= 0"):
        sqnr_db(-1.0, 1.0)


def test_sqnr_sum_merges_batches():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 16, generator=g)
    approx = ref + 0.01 * torch.randn(64, 16, generator=g)
    whole, parts = SqnrSum(), SqnrSum()
    whole.update(ref, approx)
    for i in range(0, 64, 16):
        parts.update(ref[i : i + 16], approx[i : i + 16])
    # fp32 pairwise sums of different groupings: relative difference of a few 2^-24
    assert parts.signal == pytest.approx(whole.signal, rel=1e-6)
    assert parts.noise == pytest.approx(whole.noise, rel=1e-6)
    expected = 10 * math.log10(float((ref.double() ** 2).sum()) / float(((ref - approx).double() ** 2).sum()))
    assert whole.db == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        whole.update(ref, approx[:3])


def reference_moments(x: torch.Tensor):
    v = x.reshape(-1).double()
    d = v - v.mean()
    return v.numel(), float(v.mean()), float((d**2).sum()), float((d**3).sum()), float((d**4).sum())


@pytest.mark.parametrize("splits", [[1000], [1, 999], [300, 300, 400], [7, 13, 980]])
def test_moments_merge_equals_concatenation(splits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g).pow(3) + 2.0  # skewed, nonzero mean: all merge terms matter
    m = Moments()
    start = 0
    for n in splits:
        m.update(x[start : start + n])
        start += n
    n, mean, m2, m3, m4 = reference_moments(x)
    assert m.n == n
    # per-batch sums in fp32 (relative error ~1e-6 at these sizes), merges in float64
    assert m.mean == pytest.approx(mean, rel=1e-6)
    assert m.m2 == pytest.approx(m2, rel=1e-5)
    assert m.m3 == pytest.approx(m3, rel=1e-4)
    assert m.m4 == pytest.approx(m4, rel=1e-5)
    assert m.kurtosis == pytest.approx(n * m4 / m2**2, rel=1e-4)


def test_kurtosis_known_distributions():
    # uniform grid on [-1, 1]: kurtosis -> 9/5 (difference O(1/n^2))
    assert kurtosis(torch.linspace(-1, 1, 10001)) == pytest.approx(1.8, abs=1e-3)
    # Gaussian sample: standard error of the sample kurtosis is sqrt(24 / n); allow 5 of them
    n = 200_000
    k = kurtosis(torch.randn(n, generator=torch.Generator().manual_seed(2)))
    assert abs(k - 3.0) < 5 * math.sqrt(24 / n)
    assert kurtosis(torch.ones(10)) is None and kurtosis(torch.ones(1)) is None


def test_outlier_channel_share():
    a = torch.ones(100)
    a[[3, 50]] = torch.tensor([6.5, 100.0])
    assert outlier_channel_share(a, 6.0) == (0.02, 2)
    assert outlier_channel_share(a, 7.0) == (0.01, 1)
    assert outlier_channel_share(torch.ones(8)) == (0.0, 0)
    assert outlier_channel_share(torch.empty(0)) == (0.0, 0)
    with pytest.raises(ValueError, match="1-D"):
        outlier_channel_share(torch.ones(2, 2))


@pytest.mark.parametrize("block", [2, 32, 128])
def test_rotate_equals_hadamard_transform(block):
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    # the dense per-block matmul and the butterflies compute the same sums in another order
    torch.testing.assert_close(rotate(x, block), hadamard_transform(x, block), rtol=0, atol=1e-5)
    assert can_rotate(256, block) and not can_rotate(96, 64) and can_rotate(96, None)
    with pytest.raises(ValueError, match="power of two"):
        rotate(x[:, :96], 64)


@pytest.mark.parametrize("block", [None, 32])
def test_quantized_matmul_definition(block):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(16, 64, generator=g), torch.randn(8, 64, generator=g)
    xr = x if block is None else rotate(x, block)
    wr = w if block is None else rotate(w, block)
    expected = (
        quantize(xr, 4, granularity="token").dequantize()
        @ quantize(wr, 4, granularity="channel").dequantize().t()
    )
    assert torch.equal(quantized_matmul(x, w, 4, block=block), expected)
    assert torch.equal(
        fake_quant(x, 4, "token", block=block), quantize(xr, 4, granularity="token").dequantize()
    )


def test_int8_sqnr_matches_uniform_noise_model():
    # round-to-nearest with step s adds error ~ U(-s/2, s/2), power s^2/12 per element (8 bits: the
    # uniform model is accurate); per-token step s_t = absmax_t / 127.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 512, generator=g)
    acc = SqnrSum()
    acc.update(x, fake_quant(x, 8, "token"))
    step = x.abs().amax(dim=1) / 127
    predicted_noise = float((step.double() ** 2 / 12).sum()) * x.shape[1]
    assert acc.noise == pytest.approx(predicted_noise, rel=0.05)  # 131k samples of a bounded error


def test_rotation_preserves_the_product():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(32, 128, generator=g), torch.randn(16, 128, generator=g)
    # (xH)(wH)^T = x w^T since H H^T = I; fp32 rounding of K=128 sums
    torch.testing.assert_close(rotate(x, 128) @ rotate(w, 128).t(), x @ w.t(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="x must be"):
        quantized_matmul(x, w[:, :64], 4)
