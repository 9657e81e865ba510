import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.onebit import OneBitLinear, sign_ste, svid
from lowbit.quant import pack_bits
from lowbit.quant.binary import onebit_matmul_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
U32 = 2.0**-24


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(in_f, out_f, *, bias=True, layer_norm=True, seed=0):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=_gen(seed)) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=_gen(seed + 1)))
    return lin, OneBitLinear.from_linear(lin, layer_norm=layer_norm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(13, 7), (64, 32), (1, 5)])
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_packed_and_unpacked_give_the_same_output(device, layer_norm, in_f, out_f, dtype):
    _, layer = _layer(in_f, out_f, layer_norm=layer_norm, seed=in_f)
    layer.to(device)
    if dtype is not None:
        layer.pack(dtype).unpack()  # vectors rounded to dtype, training form again
    x = torch.randn(3, 4, in_f, generator=_gen(1)).to(device=device, dtype=dtype or torch.float32)
    y_train = layer(x)
    layer.pack()
    assert layer.is_packed and layer.weight is None
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.shape == (out_f, -(-in_f // 8))
    y_packed = layer(x)
    torch.testing.assert_close(y_packed, y_train, rtol=0, atol=0)
    layer.unpack()
    assert not layer.is_packed and layer.weight_packed is None
    torch.testing.assert_close(layer(x), y_train, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_paper_equation(device):
    # y = LN(((x ⊙ g) · Sᵀ) ⊙ h) + bias, written out with the dense ±1 matrix in float64.
    lin, layer = _layer(24, 10, layer_norm=True)
    layer.to(device)
    x = torch.randn(5, 24, generator=_gen(2))
    s = layer.signs().double().cpu()
    g, h, b = (t.detach().double().cpu() for t in (layer.g, layer.h, layer.bias))
    y_ref = ((x.double() * g) @ s.t()) * h
    y_ref = (y_ref - y_ref.mean(-1, keepdim=True)) / torch.sqrt(
        y_ref.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    y_ref = y_ref + b
    y = layer(x.to(device)).cpu().double()
    # LN output is O(1); fp32 through a 24-term dot product and the normalization: a few hundred ulps.
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)


def test_without_layer_norm_equals_dense_svid_weight():
    lin, layer = _layer(40, 16, layer_norm=False)
    x = torch.randn(6, 40, generator=_gen(3), dtype=torch.float64)
    layer.double()
    w_hat = layer.dense_weight()  # S ⊙ h gᵀ
    torch.testing.assert_close(layer(x), x @ w_hat.t() + layer.bias, rtol=1e-12, atol=1e-12)


def test_packed_layer_matches_quant_reference():
    _, layer = _layer(33, 9, bias=False, layer_norm=False)
    layer.pack()
    x = torch.randn(2, 33, generator=_gen(4))
    ref = onebit_matmul_reference(x, layer.weight_packed, layer.g.detach(), layer.h.detach(), 33)
    # Same products, different association (x·g rounded once here vs inside the reference): both within
    # gamma_{n+3}·h·(|x g|·|S|ᵀ) of the exact value, so within twice that of each other.
    bound = 2 * (33 + 3) * U32 * (layer.h.detach() * ((x * layer.g.detach()).abs() @ torch.ones(33, 9))).abs()
    assert torch.all((layer(x).detach() - ref).abs() <= bound)


def test_signs_are_the_svid_signs_and_latent_keeps_w():
    lin, layer = _layer(16, 8)
    signs, g, h = svid(lin.weight)
    assert torch.equal(layer.signs(), signs)
    torch.testing.assert_close(layer.weight.detach(), lin.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(layer.g.detach(), g, rtol=0, atol=0)
    torch.testing.assert_close(layer.h.detach(), h, rtol=0, atol=0)
    official = OneBitLinear.from_linear(lin, keep_magnitude=False)
    assert torch.equal(official.signs(), signs)
    assert torch.all(official.weight.detach().abs() == 0.01)


def test_sign_ste_forward_and_clipped_gradient():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    y = sign_ste(w)
    assert y.tolist() == [-1, -1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 7.0))
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]  # 1 inside [-1, 1], 0 outside


def test_gradients_reach_latent_weight_and_vectors():
    _, layer = _layer(12, 6)
    x = torch.randn(4, 12, generator=_gen(5))
    layer(x).pow(2).sum().backward()
    for p in (layer.weight, layer.g, layer.h, layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_straight_through_gradient_equals_dense_gradient():
    # With |w| < 1 the STE makes d/dW of the layer equal to the gradient w.r.t. the dense ±1 matrix.
    _, layer = _layer(10, 4, bias=False, layer_norm=False)
    x = torch.randn(3, 10, generator=_gen(6))
    layer(x).sum().backward()
    s = layer.signs().float().requires_grad_(True)
    (F.linear(x * layer.g.detach(), s) * layer.h.detach()).sum().backward()
    torch.testing.assert_close(layer.weight.grad, s.grad, rtol=0, atol=0)


def test_pack_keeps_requires_grad_and_casts():
    _, layer = _layer(8, 4)
    layer.g.requires_grad_(False)
    layer.pack(torch.float16)
    assert (
        layer.g.dtype == torch.float16
        and layer.h.dtype == torch.float16
        and layer.bias.dtype == torch.float16
    )
    assert not layer.g.requires_grad and layer.h.requires_grad
    assert set(layer.state_dict()) == {"weight_packed", "g", "h", "bias"}
    layer.unpack(latent_scale=0.5)
    assert layer.weight.dtype == torch.float16 and torch.all(layer.weight.abs() == 0.5)
    assert set(layer.state_dict()) == {"weight", "g", "h", "bias"}


def test_packed_bits_match_pack_bits_of_signs():
    _, layer = _layer(19, 5)
    signs = layer.signs()
    layer.pack()
    assert torch.equal(layer.weight_packed, pack_bits(signs))


def test_packed_shell_loads_packed_state():
    _, layer = _layer(20, 6)
    layer.pack()
    shell = OneBitLinear(20, 6, bias=True, packed=True)
    shell.load_state_dict(layer.state_dict())
    x = torch.randn(2, 20, generator=_gen(7))
    torch.testing.assert_close(shell(x), layer(x), rtol=0, atol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="in_features"):
        OneBitLinear(0, 3)
    with pytest.raises(ValueError, match="eps"):
        OneBitLinear(3, 3, eps=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        OneBitLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="2-D"):
        OneBitLinear.from_svid(torch.ones(3), torch.ones(3), torch.ones(1))
    with pytest.raises(ValueError, match="g must have shape"):
        OneBitLinear.from_svid(torch.ones(2, 3), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="latent's signs"):
        OneBitLinear.from_svid(torch.ones(2, 3), torch.ones(3), torch.ones(2), latent=-torch.ones(2, 3))
    layer = OneBitLinear(4, 2)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.zeros(1, 5))
    with pytest.raises(TypeError, match="floating"):
        layer.pack(torch.int8)
    with pytest.raises(ValueError, match="latent_scale"):
        layer.pack().unpack(latent_scale=0)


# ---------------------------------------------------------------------- packed forward through the kernel


def _kernel_device(device, monkeypatch):
    """CUDA as is; on the CPU the kernels run only in the Triton interpreter (tests/conftest.py sets it)."""
    import lowbit.kernels.onebit as kernels
    import lowbit.onebit.layer as layer_mod

    if device == "cpu":
        if not kernels._INTERPRETED:
            pytest.skip("the kernels are compiled for CUDA in this process (no interpreter)")
        monkeypatch.setattr(layer_mod, "KERNEL_DEVICES", ("cpu",))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernel_forward_equals_unpacked_within_bound(device, m, layer_norm, dtype, monkeypatch):
    """Under no_grad the packed layer runs onebit_matmul; the training form runs the reference math. Both are
    within the derived bound of the exact (fp64) output, hence within the sum of the bounds of each other:
    pre-LN |Δy| <= (3K + 2)·2^-24·|h|·Σ|x g| (fp32 sums; the training form's x ⊙ g and matmul are covered by
    the same γ) plus, for 16-bit outputs, u_out·|y| per rounding; after the LN, Δ propagates as
    2·Δ/σ·(1 + |z|) + 4·N·2^-24·(1 + |z|) + u_out·|z| (tests/kernels/test_onebit.py derives it)."""
    _kernel_device(device, monkeypatch)
    in_f, out_f = 70, 24
    _, layer = _layer(in_f, out_f, layer_norm=layer_norm, seed=m)
    layer.pack(dtype).unpack()  # g, h, bias rounded to dtype; the training form again
    layer.to(device)
    x = torch.randn(m, in_f, generator=_gen(m)).to(device=device, dtype=dtype)
    with torch.no_grad():
        y_train = layer(x)
        layer.pack()
        y_kernel = layer(x)
    assert y_kernel.dtype == y_train.dtype and y_kernel.shape == y_train.shape
    s = layer.signs().double().cpu()
    g, h, b = (t.detach().double().cpu() for t in (layer.g, layer.h, layer.bias))
    xg = x.double().cpu() * g
    y_exact = (xg @ s.t()) * h
    terms = (xg.abs() @ torch.ones_like(s).t()) * h.abs()
    u_out = {torch.float32: 0.0, torch.bfloat16: 2.0**-8}[dtype]
    gamma = (3 * in_f + 2) * U32 * terms
    # kernel: fp32 sums, y rounded once to dtype; training form in dtype: x ⊙ g rounded (u·terms), the
    # matmul's result and the product with h each rounded (u·|y| each, to first order)
    d_y = {"kernel": gamma + u_out * y_exact.abs(),
           "train": gamma + u_out * (terms + 2 * y_exact.abs()) * (1 + 4 * u_out)}
    bounds = {}
    for path, d in d_y.items():
        if layer_norm:
            z = F.layer_norm(y_exact, (out_f,), eps=layer.eps)
            sigma = (y_exact.var(-1, unbiased=False, keepdim=True) + layer.eps).sqrt()
            eps_y = d.amax(-1, keepdim=True)
            bounds[path] = (2 * eps_y / sigma + 4 * out_f * U32) * (1 + z.abs()) + u_out * (z.abs() + b.abs())
            exact = z + b
        else:
            bounds[path] = d + u_out * (y_exact + b).abs()
            exact = y_exact + b
    for y, path in ((y_kernel, "kernel"), (y_train, "train")):
        assert bool(((y.double().cpu() - exact).abs() <= bounds[path]).all()), path
    diff = (y_kernel.double() - y_train.double()).abs().cpu()
    assert bool((diff <= bounds["kernel"] + bounds["train"]).all())


@pytest.mark.parametrize("device", DEVICES)
def test_packed_forward_with_grad_uses_reference(device, monkeypatch):
    """With gradients needed (training), the packed layer takes the reference path: bit-identical to the
    training form, and g/h receive gradients."""
    _kernel_device(device, monkeypatch)
    _, layer = _layer(33, 8, seed=3)
    layer.to(device)
    x = torch.randn(2, 33, generator=_gen(8)).to(device)
    y_train = layer(x)
    layer.pack()
    y = layer(x)
    torch.testing.assert_close(y, y_train, rtol=0, atol=0)
    y.sum().backward()
    assert layer.h.grad is not None
