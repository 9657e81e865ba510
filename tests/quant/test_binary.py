import pytest
import torch

from lowbit.quant import pack_bits, pack_bits_int32
from lowbit.quant.binary import binarize_absmean, onebit_matmul_reference, sign_pm1

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
U32 = 2.0**-24  # unit roundoff of fp32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_signs(shape, seed):
    return torch.randint(0, 2, shape, generator=_gen(seed), dtype=torch.int8) * 2 - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_sign_pm1_zero_is_plus_one(dtype):
    w = torch.tensor([-2, -1, 0, 1, 3], dtype=dtype)
    out = sign_pm1(w)
    assert out.dtype == dtype
    assert out.tolist() == [-1, -1, 1, 1, 1]
    if dtype.is_floating_point:
        assert sign_pm1(torch.tensor([-0.0], dtype=dtype)).tolist() == [1]


def test_sign_pm1_rejects_bool():
    with pytest.raises(TypeError, match="w must be"):
        sign_pm1(torch.tensor([True]))


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 33)])
def test_binarize_absmean_matches_definition(shape):
    w = torch.randn(shape, generator=_gen(sum(shape)))
    w[0, 0] = 0.0
    signs, scale = binarize_absmean(w)
    assert signs.dtype == torch.int8 and scale.shape == (shape[0], 1)
    assert signs[0, 0] == 1
    torch.testing.assert_close(signs.float(), torch.where(w >= 0, 1.0, -1.0), rtol=0, atol=0)
    torch.testing.assert_close(scale, w.abs().mean(1, keepdim=True), rtol=0, atol=0)


def test_binarize_absmean_scale_is_least_squares_optimal():
    # For fixed signs s, argmin_a ||w - a s||^2 = <w, s> / n = mean |w|: perturbing the scale must not help.
    w = torch.randn(8, 64, generator=_gen(3), dtype=torch.float64)
    signs, scale = binarize_absmean(w)
    err = ((w - signs * scale) ** 2).sum(1)
    for delta in (-1e-3, 1e-3):
        assert torch.all(((w - signs * (scale + delta)) ** 2).sum(1) > err)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 2, 2), torch.zeros(4, 0)])
def test_binarize_absmean_bad_shape(bad):
    with pytest.raises(ValueError, match="2-D"):
        binarize_absmean(bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packer", [pack_bits, pack_bits_int32])
@pytest.mark.parametrize("m,n,lead", [(1, 1, (3,)), (7, 13, (2, 5)), (16, 64, (4,)), (5, 40, ())])
def test_reference_matches_float64_dense(device, packer, m, n, lead):
    s = _random_signs((m, n), m * 100 + n)
    x = torch.randn(*lead, n, generator=_gen(n))
    g = torch.rand(n, generator=_gen(n + 1)) + 0.5
    h = torch.rand(m, generator=_gen(m + 2)) + 0.5
    packed = packer(s)
    y = onebit_matmul_reference(x.to(device), packed.to(device), g.to(device), h.to(device), n)
    assert y.dtype == torch.float32 and y.shape == (*lead, m) and y.device.type == device
    x64, g64, h64, s64 = x.double(), g.double(), h.double(), s.double()
    ref = h64 * ((x64 * g64) @ s64.t())
    # Rigorous fp32 bound for a length-n dot product of rounded products, then one more rounding for h:
    # |err| <= gamma_{n+3} * h * (|x g| @ |s|^T), gamma_k = k u / (1 - k u).
    k = n + 3
    bound = k * U32 / (1 - k * U32) * h64 * ((x64 * g64).abs() @ s64.abs().t())
    assert torch.all((y.cpu().double() - ref).abs() <= bound)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_exact_on_integers(device):
    # Small integers: every product and partial sum is an integer below 2^24, so fp32 is exact.
    m, n = 9, 45
    s = _random_signs((m, n), 0)
    x = torch.randint(-8, 8, (6, n), generator=_gen(1)).float()
    g = torch.randint(1, 4, (n,), generator=_gen(2)).float()
    h = torch.randint(-3, 4, (m,), generator=_gen(4)).float()
    y = onebit_matmul_reference(x.to(device), pack_bits(s).to(device), g.to(device), h.to(device), n)
    ref = h * ((x * g) @ s.float().t())
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0)


def test_reference_uint8_and_int32_layouts_agree():
    s = _random_signs((11, 70), 5)
    x = torch.randn(3, 70, generator=_gen(6))
    g, h = torch.rand(70, generator=_gen(7)), torch.rand(11, generator=_gen(8))
    a = onebit_matmul_reference(x, pack_bits(s), g, h, 70)
    b = onebit_matmul_reference(x, pack_bits_int32(s), g, h, 70)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_accepts_low_precision_inputs():
    s = _random_signs((4, 16), 9)
    x = torch.randn(2, 16, generator=_gen(9)).to(torch.bfloat16)
    g, h = torch.ones(16, dtype=torch.float16), torch.ones(4, dtype=torch.bfloat16)
    y = onebit_matmul_reference(x, pack_bits(s), g, h, 16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() @ s.float().t(), rtol=0, atol=0)  # exact: ±1 sums of bf16 values


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(signs_packed=torch.zeros(4, 2, dtype=torch.int8)), TypeError, "signs_packed"),
        (dict(signs_packed=torch.zeros(4, 3, dtype=torch.uint8)), ValueError, "ceil"),
        (dict(signs_packed=torch.zeros(4, dtype=torch.uint8)), ValueError, "2-D"),
        (dict(x=torch.zeros(2, 15)), ValueError, "x must have shape"),
        (dict(x=torch.zeros(2, 16, dtype=torch.long)), TypeError, "x must be a floating"),
        (dict(g=torch.ones(15)), ValueError, "g must have shape"),
        (dict(h=torch.ones(5)), ValueError, "h must have shape"),
        (dict(n=0), ValueError, "n must be"),
    ],
)
def test_reference_bad_input(kwargs, err, match):
    args = dict(
        x=torch.zeros(2, 16), signs_packed=torch.zeros(4, 2, dtype=torch.uint8), g=torch.ones(16),
        h=torch.ones(4), n=16,
    )
    args.update(kwargs)
    with pytest.raises(err, match=match):
        onebit_matmul_reference(**args)
