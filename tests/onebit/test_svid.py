import math

import pytest
import torch

from lowbit.onebit.svid import rank1_nmf, rank1_svd, svid, svid_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPES = [(1, 1), (7, 3), (16, 40), (48, 24)]


def _weight(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # LLM-like: a per-column / per-row magnitude profile times Gaussian noise, so |W| is close to rank 1
    cols = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
    rows = torch.rand(shape[0], 1, generator=g, dtype=dtype) + 0.5
    return torch.randn(shape, generator=g, dtype=dtype) * rows * cols


def _dense_rank1(a):
    """Reference: the best rank-1 approximation of a, σ₁ u₁ v₁ᵀ, in float64."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return s[0] * torch.outer(u[:, 0], vh[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_method_equals_dense_rank1_reference(shape):
    w = _weight(shape, sum(shape))
    signs, g, h = svid(w, "svd")
    ref = _dense_rank1(w.abs())
    # float64 LAPACK SVD: agreement to a few hundred ulps of the largest entry
    torch.testing.assert_close(torch.outer(h, g), ref, rtol=0, atol=1e-12 * float(ref.abs().max()) * 100)
    assert torch.all(h >= 0) and torch.all(g >= 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_nmf_converges_to_the_svd_optimum(shape):
    w = _weight(shape, 100 + sum(shape))
    s1, g1, h1 = svid(w, "svd")
    s2, g2, h2 = svid(w, "nmf", tol=1e-13, max_iter=2000)
    e_svd, e_nmf = svid_error(w, s1, g1, h1), svid_error(w, s2, g2, h2)
    # SVD is the unconstrained optimum, so NMF can only tie it; with tol 1e-13 on σ the float64 iterate is
    # within ~1e-12 relative of it, and the error moves by at most that much.
    assert e_nmf <= e_svd + 1e-9
    assert e_nmf >= e_svd - 1e-9
    torch.testing.assert_close(
        torch.outer(h2, g2), torch.outer(h1, g1), rtol=0, atol=1e-6 * float(w.abs().max())
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nmf_low_precision_error_no_worse_than_svd(device, dtype):
    w = _weight((64, 96), 7, torch.float32).to(device=device, dtype=dtype)
    s1, g1, h1 = svid(w, "svd")
    s2, g2, h2 = svid(w, "nmf")
    assert g2.dtype == torch.float32 and g2.device.type == device
    e_svd, e_nmf = svid_error(w, s1, g1, h1), svid_error(w, s2, g2, h2)
    # tol 1e-6 on σ (fp32): the error² differs by at most ~2·tol, so the error by tol/e; fp32 round-off adds
    # ~sqrt(mn)·2^-24. 1e-4 covers both with a wide margin and still catches a wrong factor.
    assert e_nmf <= e_svd + 1e-4


def test_error_equals_rank1_error_of_abs_w():
    w = _weight((20, 30), 3)
    signs, g, h = svid(w, "nmf")
    direct = float(torch.linalg.norm(w.abs() - torch.outer(h, g)) / torch.linalg.norm(w))
    assert math.isclose(svid_error(w, signs, g, h), direct, rel_tol=1e-12)


def test_signs_zero_is_plus_one_and_int8():
    w = torch.tensor([[0.0, -1.0, 2.0], [-0.0, 3.0, -4.0]])
    signs, _, _ = svid(w)
    assert signs.dtype == torch.int8
    assert signs.tolist() == [[1, -1, 1], [1, 1, -1]]


def test_balanced_factors():
    w = _weight((30, 10), 5)
    _, g, h = svid(w, "nmf")
    torch.testing.assert_close(h.norm(), g.norm(), rtol=1e-12, atol=0)


def test_exact_rank1_magnitude_is_recovered():
    g0 = torch.rand(12, dtype=torch.float64) + 0.1
    h0 = torch.rand(9, dtype=torch.float64) + 0.1
    s0 = torch.where(torch.rand(9, 12) > 0.5, 1.0, -1.0).double()
    w = s0 * torch.outer(h0, g0)
    for method in ("nmf", "svd"):
        signs, g, h = svid(w, method, tol=1e-14)
        assert svid_error(w, signs, g, h) < 1e-12


def test_zero_matrix():
    w = torch.zeros(4, 5)
    for method in ("nmf", "svd"):
        signs, g, h = svid(w, method)
        assert torch.all(signs == 1) and not g.any() and not h.any()
        assert svid_error(w, signs, g, h) == 0.0


def test_rank1_helpers_return_nonnegative():
    a = _weight((10, 6), 9).abs()
    h, g, sweeps = rank1_nmf(a, tol=0.0, max_iter=5)
    assert sweeps == 5 and torch.all(h >= 0) and torch.all(g >= 0)
    h2, g2 = rank1_svd(a)
    assert torch.all(h2 >= 0) and torch.all(g2 >= 0)


@pytest.mark.parametrize(
    "w,err,match",
    [
        (torch.zeros(3), ValueError, "2-D"),
        (torch.zeros(2, 3, 4), ValueError, "2-D"),
        (torch.zeros(0, 3), ValueError, "empty"),
        (torch.zeros(2, 3, dtype=torch.int32), TypeError, "floating"),
        ([[1.0]], TypeError, "torch.Tensor"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "non-finite"),
    ],
)
def test_bad_weight(w, err, match):
    with pytest.raises(err, match=match):
        svid(w)


def test_bad_method_and_options():
    w = torch.ones(2, 2)
    with pytest.raises(ValueError, match="method"):
        svid(w, "pca")
    with pytest.raises(ValueError, match="max_iter"):
        svid(w, "nmf", max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        svid(w, "nmf", tol=-1.0)
    with pytest.raises(ValueError, match="shapes disagree"):
        svid_error(w, torch.ones(2, 2), torch.ones(3), torch.ones(2))
