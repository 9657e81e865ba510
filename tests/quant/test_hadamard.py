import math

import pytest
import torch

from lowbit.quant import hadamard_matrix, hadamard_transform

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
U32 = 2.0**-24


def _sylvester_kron(n):
    """Oracle: H_n = H_2 ⊗ H_2 ⊗ ... ⊗ H_2 (explicit Kronecker products, fp64), normalized."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h / math.sqrt(n)


def _dense_oracle(x, block):
    """x @ BlockDiag(H_b, ..., H_b) in fp64."""
    n = x.shape[-1]
    big = torch.block_diag(*[_sylvester_kron(block)] * (n // block)).to(x.device)
    return x.double() @ big


def _fwht_tol(x, block, out_dtype):
    # log2(b) butterfly stages plus the final scaling, each rounding in fp32 with relative error u:
    # |error| <= (log2(b) + 1) · u · Σ_block |x_j| / sqrt(b); then the cast to out_dtype adds eps/2 · |y|.
    n = x.shape[-1]
    blocks_abs = x.double().abs().reshape(*x.shape[:-1], n // block, block).sum(-1, keepdim=True)
    fp32_err = (math.log2(block) + 1) * U32 * blocks_abs / math.sqrt(block)
    fp32_err = fp32_err.expand(*x.shape[:-1], n // block, block).reshape(x.shape)
    y_ref = _dense_oracle(x, block)
    return fp32_err + torch.finfo(out_dtype).eps / 2 * (y_ref.abs() + fp32_err), y_ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 256])
def test_matrix_matches_kronecker_oracle(device, n):
    h = hadamard_matrix(n, dtype=torch.float64, device=device)
    assert h.shape == (n, n) and h.device.type == device
    torch.testing.assert_close(h.cpu(), _sylvester_kron(n), rtol=0, atol=0)
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    eye = torch.eye(n, dtype=torch.float64, device=device)
    torch.testing.assert_close(h @ h.T, eye, rtol=0, atol=4 * n * 2**-53)
    assert hadamard_matrix(n).dtype == torch.float32
    assert hadamard_matrix(n, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("n", [0, -4, 3, 6, 12, 2.0, True, None])
def test_matrix_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match="n must be a power of two"):
        hadamard_matrix(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lead,n,block",
    [((), 1, None), ((3,), 8, None), ((2, 3), 64, None), ((4,), 64, 16), ((5,), 96, 32), ((2, 2), 48, 16),
     ((3,), 128, 1), ((7,), 256, 128), ((1,), 24, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transform_matches_dense_oracle(device, lead, n, block, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*lead, n, generator=g).to(device=device, dtype=dtype)
    y = hadamard_transform(x, block)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    tol, y_ref = _fwht_tol(x, block or n, dtype)
    assert bool(((y.double() - y_ref).abs() <= tol).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [None, 4, 32])
def test_self_inverse(device, block):
    x = torch.randn(5, 64, device=device)
    back = hadamard_transform(hadamard_transform(x, block), block)
    # two transforms, each within (log2 b + 1) u ‖x_block‖₁ / sqrt(b) <= (log2 b + 1) u ‖x_block‖₂ per element
    b = block or 64
    bound = 2 * (math.log2(b) + 2) * U32 * float(x.abs().max()) * math.sqrt(b)
    torch.testing.assert_close(back, x, rtol=0, atol=bound)


def test_non_contiguous_input():
    x = torch.randn(32, 6).T  # (6, 32), last dim strided
    assert not x.is_contiguous()
    expected = hadamard_transform(x.contiguous(), 8)
    torch.testing.assert_close(hadamard_transform(x, 8), expected, rtol=0, atol=0)


def test_gradcheck_fp64():
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hadamard_transform(t, 8), (x,))
    assert torch.autograd.gradgradcheck(lambda t: hadamard_transform(t, 4), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_the_transform(device, dtype):
    x = torch.randn(2, 3, 32, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 3, 32, device=device, dtype=dtype)
    (hadamard_transform(x, 8).float() * w.float()).sum().backward()
    assert x.grad.dtype == dtype
    # d/dx Σ (x·B) ⊙ w = w·Bᵀ = w·B (B symmetric)
    tol, g_ref = _fwht_tol(w, 8, dtype)
    assert bool(((x.grad.double() - g_ref).abs() <= tol).all())


def test_preserves_rows_norm():
    x = torch.randn(10, 128, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x, 16).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "n,block,match",
    [(12, None, "block_size"), (64, 3, "block_size"), (64, 128, "block_size"), (48, 32, "block_size"),
     (64, 0, "block_size")],
)
def test_bad_sizes(n, block, match):
    with pytest.raises(ValueError, match=match):
        hadamard_transform(torch.randn(2, n), block)


def test_bad_inputs():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        hadamard_transform(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 1 dim"):
        hadamard_transform(torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu_bit_for_bit(dtype):
    # the butterflies are elementwise adds in the same order on both devices
    x = torch.randn(8, 256).to(dtype)
    got = hadamard_transform(x.cuda(), 64).cpu()
    torch.testing.assert_close(got, hadamard_transform(x, 64), rtol=0, atol=0)
