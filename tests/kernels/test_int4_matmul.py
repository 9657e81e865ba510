"""lowbit.kernels.int4_matmul: exact integer products with scales (and the rotation back) in the epilogue.

CPU: the Triton GEMM under TRITON_INTERPRET=1 on small shapes, torch._scaled_mm / torch._int_mm on CPU; gpu:
cuBLAS FP8 / INT8 and the compiled Triton kernel at full shapes.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need Triton (lowbit[triton])")

import lowbit.kernels.int4_matmul as mm  # noqa: E402
from lowbit.quant import hadamard_transform  # noqa: E402

CPU = pytest.param("cpu", id="cpu")
GPU = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
U32 = 2.0**-24
F8 = torch.float8_e4m3fn
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def _codes(shape, lo, hi, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g).to(device)


def _tiles(device):
    return SMALL_TILES if device == "cpu" else None


@pytest.mark.parametrize("device", [CPU, GPU])
def test_int4_mm_is_exact_with_unit_scales(device):
    m, k, n = (32, 64, 48) if device == "cpu" else (16384, 4096, 4096)
    a = _codes((m, k), -7, 7, device, 1).to(F8)
    b = _codes((n, k), -7, 7, device, 2).to(F8)
    one = torch.ones(1, device=device)
    out = mm.int4_mm(a, b, one, one, out_dtype=torch.float32)
    exact = a.double() @ b.double().t()  # |entries| <= 49·K < 2^24: exact in fp64 and in fp32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=0)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("scales", ["row-col", "tensor", "row-tensor"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_int4_mm_scales_in_the_epilogue(device, scales, out_dtype):
    m, k, n = (32, 64, 48) if device == "cpu" else (2048, 4096, 1024)
    a = _codes((m, k), -7, 7, device, 3).to(F8)
    b = _codes((n, k), -7, 7, device, 4).to(F8)
    g = torch.Generator().manual_seed(5)
    sa = (torch.rand(m, 1, generator=g) * 1e-2 + 1e-3).to(device)
    sb = (torch.rand(1, n, generator=g) * 10 + 0.1).to(device)
    if scales == "tensor":
        sa, sb = sa[:1, :1], sb[:1, :1]
    elif scales == "row-tensor":
        sb = sb[:1, :1]
    out = mm.int4_mm(a, b, sa, sb, out_dtype=out_dtype)
    ref = mm.int4_mm_reference(a, b, sa, sb, out_dtype=torch.float64)
    # exact integer times two fp32 scales: a few fp32 roundings, then one rounding to out_dtype
    u = 2.0**-8 if out_dtype == torch.bfloat16 else 0.0
    tol = (3 * U32 + u) * ref.abs()
    assert out.dtype == out_dtype
    assert bool(((out.double() - ref).abs() <= tol).all())


def test_int4_mm_argument_errors():
    a = torch.zeros(16, 32).to(F8)
    one = torch.ones(1)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        mm.int4_mm(a.float(), a, one, one)
    with pytest.raises(ValueError, match="share K"):
        mm.int4_mm(a, torch.zeros(16, 48).to(F8), one, one)
    with pytest.raises(ValueError, match="1 or 16 elements"):
        mm.int4_mm(a, a, torch.ones(3), torch.ones(16))


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("operands", ["v-int4", "int4-int4-fp8"])
def test_int8_scaled_mm_is_exact_with_unit_scales(device, backend, operands):
    m, k, n = (48, 96, 64) if device == "cpu" else (16384, 4096, 4096)
    if operands == "v-int4":
        a = _codes((m, k), -105, 105, device, 6).to(torch.int8)  # bit-split v = 14·hi + lo
        b = _codes((n, k), -7, 7, device, 7).to(torch.int8)
    else:
        if backend == "cublas":
            pytest.skip("cuBLAS int8 path multiplies int8 only")
        a = _codes((m, k), -7, 7, device, 6).to(F8)
        b = _codes((n, k), -7, 7, device, 7).to(F8)
    one = torch.ones(1, device=device)
    out = mm.int8_scaled_mm(a, b, one, one, out_dtype=torch.float32, backend=backend, config=_tiles(device))
    exact = a.float().double() @ b.float().double().t()  # |entries| <= 735·K < 2^24
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=0)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("block", [None, 16, 128])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_scaled_mm_rotation_epilogue(device, backend, block, out_dtype):
    m, k, n = (40, 64, 128) if device == "cpu" else (8192, 11008, 4096)
    a = _codes((m, k), -105, 105, device, 8).to(torch.int8)
    b = _codes((n, k), -7, 7, device, 9).to(torch.int8)
    g = torch.Generator().manual_seed(10)
    rs = (torch.rand(m, generator=g) * 1e-4 + 1e-6).to(device)
    cs = torch.tensor([0.01], device=device)
    out = mm.int8_scaled_mm(a, b, rs, cs, hadamard_block=block, out_dtype=out_dtype, backend=backend,
                            config=_tiles(device))
    scaled = (a.double() @ b.double().t()) * rs.double()[:, None] * 0.01
    ref = hadamard_transform(scaled, block) if block else scaled
    # The rotation sums b terms in fp32 from bf16 pieces that carry 16 of the 24 bits of the integer
    # (triton: relative 2^-17 per term), or three exact pieces (cublas path); then 2 scale products.
    if block:
        blocks = scaled.abs().reshape(m, n // block, block).sum(-1, keepdim=True)
        per_elem = ((2.0**-17 + (math.log2(block) + 3) * U32) * blocks / math.sqrt(block))
        slack = per_elem.expand(m, n // block, block).reshape(m, n)
    else:
        slack = torch.zeros_like(ref)
    u = 2.0**-8 if out_dtype == torch.bfloat16 else 0.0
    tol = slack + 4 * U32 * ref.abs() + u * (ref.abs() + slack)
    assert bool(((out.double() - ref).abs() <= tol).all())


def test_int8_scaled_mm_per_column_scale_without_rotation():
    a = _codes((32, 64), -105, 105, "cpu", 11).to(torch.int8)
    b = _codes((48, 64), -7, 7, "cpu", 12).to(torch.int8)
    rs, cs = torch.rand(32) + 0.5, torch.rand(48) + 0.5
    out = mm.int8_scaled_mm(a, b, rs, cs, out_dtype=torch.float32, config=SMALL_TILES)
    ref = (a.double() @ b.double().t()) * rs.double()[:, None] * cs.double()[None, :]
    assert bool(((out.double() - ref).abs() <= 3 * U32 * ref.abs()).all())
    with pytest.raises(ValueError, match="one element"):
        mm.int8_scaled_mm(a, b, rs, cs, hadamard_block=16)


def test_int8_scaled_mm_argument_errors():
    a = torch.zeros(16, 32, dtype=torch.int8)
    one = torch.ones(1)
    with pytest.raises(TypeError, match="int8"):
        mm.int8_scaled_mm(a.float(), a.float(), one, one)
    with pytest.raises(ValueError, match="same K"):
        mm.int8_scaled_mm(a, torch.zeros(16, 48, dtype=torch.int8), one, one)
    with pytest.raises(ValueError, match="contiguous rows"):
        mm.int8_scaled_mm(torch.zeros(32, 16, dtype=torch.int8).t(), a, one, one)
    with pytest.raises(ValueError, match="backend"):
        mm.int8_scaled_mm(a, a, one, one, backend="cutlass")


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("block", [None, 32])
def test_bit_split_fp8_mm_equals_the_int8_product(device, block):
    # Two FP8 products (hi, lo) in one kernel: 14·(hi·bᵀ) + lo·bᵀ is the exact integer v·bᵀ, so with the
    # same scales and rotation it equals the int8 kernel bit for bit (same epilogue arithmetic).
    m, k, n = (48, 96, 64) if device == "cpu" else (16384, 4096, 4096)
    hi, lo = _codes((m, k), -7, 7, device, 13), _codes((m, k), -7, 7, device, 14)
    b = _codes((n, k), -7, 7, device, 15)
    s_lo = (torch.rand(m, generator=torch.Generator().manual_seed(16)) + 0.5).to(device) / 14
    cs = torch.tensor([0.03], device=device)
    tiles = _tiles(device) or {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}  # same tiles: same epilogue
    out = mm.bit_split_fp8_mm(hi.to(F8), lo.to(F8), b.to(F8), s_lo, cs, hadamard_block=block,
                              out_dtype=torch.float32, config=tiles)
    v = (14 * hi + lo).to(torch.int8)
    ref = mm.int8_scaled_mm(v, b.to(torch.int8), s_lo, cs, hadamard_block=block, out_dtype=torch.float32,
                            config=tiles)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="float8"):
        mm.bit_split_fp8_mm(hi.to(torch.int8), lo.to(F8), b.to(F8), s_lo, cs)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("block", [None, 32])
def test_int8_scaled_mm_int8_against_fp16(device, block):
    # int8 a converted on chip (exact), fp16 b, fp32 accumulation: the fp32 GEMM of the same operands,
    # within K·u32 of Σ|terms|; the rotation from two bf16 pieces adds 2^-17 per term (as above).
    m, k, n = (40, 64, 128) if device == "cpu" else (16384, 4096, 4096)
    a = _codes((m, k), -105, 105, device, 17).to(torch.int8)
    b = torch.randn(n, k, generator=torch.Generator().manual_seed(18)).to(device, torch.float16)
    rs = (torch.rand(m, generator=torch.Generator().manual_seed(19)) + 0.5).to(device)
    cs = torch.tensor([0.5], device=device)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32} if device == "cpu" else None
    out = mm.int8_scaled_mm(a, b, rs, cs, hadamard_block=block, out_dtype=torch.float32, config=cfg)
    exact = a.double() @ b.double().t()
    scaled = exact * rs.double()[:, None] * 0.5
    ref = hadamard_transform(scaled, block) if block else scaled
    terms = (a.double().abs() @ b.double().abs().t()) * rs.double()[:, None] * 0.5
    err = (k + 3) * U32 * terms
    if block:
        blocks = (terms.reshape(m, n // block, block).sum(-1, keepdim=True) / math.sqrt(block))
        err = ((2.0**-17 + (math.log2(block) + 3) * U32) * blocks + (k + 3) * U32 * blocks)
        err = err.expand(m, n // block, block).reshape(m, n)
    assert bool(((out.double() - ref).abs() <= err + 4 * U32 * ref.abs()).all())
    with pytest.raises(TypeError, match="backend='triton'"):
        mm.int8_scaled_mm(a, b, rs, cs, backend="cublas")
