"""Tests of lowbit.kernels.onebit against the OneBit reference product.

How the kernels run without a GPU: ``TRITON_INTERPRET=1`` must be set when ``@triton.jit`` decorates a
kernel (triton 3.x reads it at decoration time). Another test may already have imported
``lowbit.kernels.onebit`` compiled for CUDA, and setting the variable for the whole process would change
other kernels' tests, so this file loads a private copy of the module (``_interp``) with the variable set
only while it is imported. Its kernels are interpreted on the CPU whatever else runs in the process
(pytest-xdist workers included). The GPU tests (marker ``gpu``) use the normal module on CUDA.

Tolerances (derived, not tuned). With exact products (±1 · x_k · g_k is exact in fp32 for bf16/fp16
operands; fp32 x is split exactly into three bf16 parts), the only rounding is the fp32 summation of at most
3K terms, the fp32 product x_k·g_k (fp32 inputs), the multiplication by h and the final cast, so for every
output element (Higham, summation in any order)

    |y - y_exact| <= gamma · |h| · Σ_k |x_k g_k|  +  u_out · |y_exact|,   gamma = (3K + 2) · 2^-24,

with u_out the unit roundoff of the output dtype (0 for fp32 output). Integer-valued inputs make every
product and partial sum exact, so there the kernels must match bit for bit. The PyTorch comparison
("at most 2x the error of the same math in PyTorch at that precision") uses the RMS of the error relative
to the term sums, against torch's fp32 matmul of x ⊙ g with the unpacked ±1 matrix.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import lowbit.kernels.onebit as onebit_mod
from lowbit.quant import pack_bits, pack_bits_int32
from lowbit.quant.binary import onebit_matmul_reference

triton = pytest.importorskip("triton")

U32 = 2.0**-24
U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
CUDA = pytest.mark.gpu


def _load_interpreted():
    """A private copy of lowbit.kernels.onebit whose kernels run in the Triton CPU interpreter."""
    path = pathlib.Path(onebit_mod.__file__)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_lowbit_onebit_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


_interp = _load_interpreted()


# ------------------------------------------------------------------------------------------------ helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(m, k, n_out, dtype, seed, *, integer=False, g_dtype=None, device="cpu"):
    """x (m, k), ±1 signs (n_out, k) int8, g (k,), h (n_out,); integer-valued when ``integer``."""
    gen = _gen(seed)
    g_dtype = g_dtype or (dtype if dtype != torch.float32 else torch.bfloat16)
    if integer:
        x = torch.randint(-4, 5, (m, k), generator=gen).float()
        sign = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
        g = torch.randint(1, 5, (k,), generator=gen).float() * sign
        h = torch.randint(-3, 4, (n_out,), generator=gen).float()
    else:
        x = torch.randn(m, k, generator=gen) * 3
        g = torch.rand(k, generator=gen) + 0.25
        h = torch.randn(n_out, generator=gen)
    s = (torch.randint(0, 2, (n_out, k), generator=gen, dtype=torch.int8) * 2 - 1)
    return x.to(device, dtype), s.to(device), g.to(device, g_dtype), h.to(device, g_dtype)


def _exact(x, s, g, h):
    """fp64 product and the per-element term sum |h| · Σ_k |x_k g_k| (for the bound)."""
    xg = x.double() * g.double()
    y = (xg @ s.double().t()) * h.double()
    terms = (xg.abs() @ torch.ones_like(s.double()).t()) * h.double().abs()
    return y, terms


def _bound(k, terms, y_exact, out_dtype):
    return (3 * k + 2) * U32 * terms + U_OUT[out_dtype] * y_exact.abs()


def _assert_within(y, y_exact, bound, note=""):
    err = (y.double().cpu() - y_exact.cpu()).abs()
    excess = err - bound.cpu()
    assert torch.isfinite(y).all()
    where = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"max error {err.max():.3e}, worst excess {excess.max():.3e} (at flat index {where}: error "
        f"{err.flatten()[where]:.4e}, bound {bound.flatten()[where]:.4e}, |y_exact| "
        f"{y_exact.flatten()[where].abs():.4e}){note}")


def _pack(s, layout):
    return pack_bits_int32(s) if layout == "int32" else pack_bits(s)


# Kernel paths: (name, callable(mod, x, w, g, h, k, **kw)) with tiny tiles so that several tiles, split-K
# and ragged K tails are exercised on the small interpreter shapes.
def _core(mod, *a, **kw):
    cfg = mod.GemvConfig(block_n=16, block_kw=2, split_k=kw.pop("split_k", 2))
    return mod.onebit_gemv(*a, config=cfg, **kw)


def _tc_gemv(mod, *a, **kw):
    cfg = mod.MMConfig(block_m=16, block_n=16, block_k=64, group_m=1, split_k=kw.pop("split_k", 2),
                       num_warps=4)
    return mod.onebit_mm(*a, config=cfg, **kw)


def _tc_swap(mod, *a, **kw):
    cfg = mod.MMConfig(block_m=16, block_n=64, block_k=64, group_m=1, split_k=kw.pop("split_k", 1),
                       num_warps=4, swap_ab=True)
    return mod.onebit_mm(*a, config=cfg, **kw)


def _tc_gemm(mod, *a, **kw):
    cfg = mod.MMConfig(block_m=16, block_n=32, block_k=32, group_m=2, split_k=kw.pop("split_k", 1),
                       num_warps=4)
    return mod.onebit_mm(*a, config=cfg, **kw)


def _dispatch(mod, *a, **kw):
    kw.pop("split_k", None)
    return mod.onebit_matmul(*a, **kw)


def _planes(mod, *a, **kw):
    cfg = mod.PlanesConfig(block_n=16, block_kw=2, split_k=kw.pop("split_k", 2))
    return mod.onebit_gemv(*a, config=cfg, **kw)


# Bound of the LUT GEMVs: a term x_k g_k (one rounding) goes through the bits - 1 fp32 additions of its table
# entry, then through at most cdiv(K, bits) additions of its lane's chain, BLOCK_KW - 1 of the reduction over
# the tile's word columns and groups, split_k of the partials and the product by h: at most
# bits + cdiv(K, bits) + BLOCK_KW + split_k + 1 roundings (Higham: any summation tree), below the 3K + 2 of
# _bound for every shape here, so the same bound applies. Paths: nibbles with words loaded 2 at a time;
# nibbles with two groups of 4 words per tile row (GROUPS = 2; ragged K: per-word masks); bytes.
def _lut(mod, *a, **kw):
    cfg = mod.LutConfig(block_n=16, block_kw=2, split_k=kw.pop("split_k", 2))
    return mod.onebit_gemv(*a, config=cfg, **kw)


def _lut4_g2(mod, *a, **kw):
    cfg = mod.LutConfig(block_n=16, block_kw=8, bits=4, split_k=kw.pop("split_k", 2))
    return mod.onebit_gemv(*a, config=cfg, **kw)


def _lut8(mod, *a, **kw):
    cfg = mod.LutConfig(block_n=16, block_kw=2, bits=8, split_k=kw.pop("split_k", 2))
    return mod.onebit_gemv(*a, config=cfg, **kw)


def _unpack_mm(mod, *a, **kw):
    kw.pop("split_k", None)
    kw.pop("fuse_layernorm", None)
    return mod.onebit_matmul(*a, config=mod.UnpackMMConfig(block_n=16, block_k=64, fp32_acc=True), **kw)


def _unpack_mm16(mod, *a, **kw):  # cuBLAS result rounded to x's dtype before h (the fast bf16 variant)
    kw.pop("split_k", None)
    kw.pop("fuse_layernorm", None)
    return mod.onebit_matmul(*a, config=mod.UnpackMMConfig(block_n=16, block_k=64), **kw)


PATHS = {"core": _core, "tc_gemv": _tc_gemv, "tc_swap": _tc_swap, "tc_gemm": _tc_gemm, "dispatch": _dispatch,
         "planes": _planes, "lut": _lut, "lut4_g2": _lut4_g2, "lut8": _lut8, "unpack_mm": _unpack_mm}
# The rounding of the cuBLAS result to x's dtype before h: one more u_x·|y| in the bound (u_x of x's dtype).
U_MID = {"unpack_mm16": True}


# -------------------------------------------------------------------------------------- CPU (interpreter)


# One ragged shape per path (M by the path's regime; the core GEMV is one token per program and slow in the
# interpreter); K is not a multiple of 32 and N not of the tile, so every tail is exercised.
SHAPES = {"core": (2, 100, 33), "tc_gemv": (3, 100, 33), "tc_swap": (5, 77, 40), "tc_gemm": (17, 130, 40),
          "dispatch": (17, 130, 19), "planes": (3, 100, 33), "lut": (2, 100, 33), "lut4_g2": (3, 300, 33),
          "lut8": (1, 100, 33), "unpack_mm": (6, 130, 40)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_inputs_are_exact(path, dtype):
    """Integer-valued x, g, h: every product and partial sum is exact, so the result is bit-exact."""
    m, k, n_out = SHAPES[path]
    x, s, g, h = _problem(m, k, n_out, dtype, seed=k + m, integer=True)
    y_exact, _ = _exact(x, s, g, h)
    layout = "uint8" if dtype == torch.float16 else "int32"
    y = PATHS[path](_interp, x, _pack(s, layout), g, h, k, out_dtype=torch.float32)
    assert y.shape == (m, n_out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_exact, rtol=0, atol=0)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32)])
def test_random_inputs_within_summation_bound(path, dtype, out_dtype):
    m, k, n_out = SHAPES[path]
    k = 300 if path == "core" else k  # a longer K for the summation
    x, s, g, h = _problem(m, k, n_out, dtype, seed=1000 * m + k)
    y_exact, terms = _exact(x, s, g, h)
    y = PATHS[path](_interp, x, pack_bits_int32(s), g, h, k, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    _assert_within(y, y_exact, _bound(k, terms, y_exact, out_dtype))
    if out_dtype == torch.float32:
        # At most 2x the error of the same math in PyTorch fp32 (RMS relative to the term sums).
        y_torch = torch.matmul(x.float() * g.float(), s.float().t()) * h.float()
        rel_k = ((y.double() - y_exact) / terms.clamp_min(1e-30)).square().mean().sqrt()
        rel_t = ((y_torch.double() - y_exact) / terms.clamp_min(1e-30)).square().mean().sqrt()
        assert rel_k <= 2 * rel_t + U32


def test_equals_reference_function():
    """The dispatcher against lowbit.quant.binary.onebit_matmul_reference (both within the bound of the
    exact product, so within twice the bound of each other)."""
    k, n_out = 200, 24
    cases = ((1, torch.bfloat16, None), (5, torch.float16, None), (20, torch.float32, None),
             (3, torch.bfloat16, torch.float16))  # g of another dtype than x: the exact fp32 path
    for i, (m, dtype, g_dtype) in enumerate(cases):
        x, s, g, h = _problem(m, k, n_out, dtype, seed=m, g_dtype=g_dtype)
        for packed in (pack_bits(s),) if i % 2 else (pack_bits_int32(s),):
            ref = onebit_matmul_reference(x, packed, g, h, k)
            y = _interp.onebit_matmul(x, packed, g, h, k, out_dtype=torch.float32)
            _, terms = _exact(x, s, g, h)
            err = (y.double() - ref.double()).abs()
            assert bool((err <= 2 * (3 * k + 2) * U32 * terms).all())


LN_CASES = [("core", True, torch.bfloat16), ("core", False, torch.float32), ("tc_gemv", True, torch.float32),
            ("tc_gemv", False, torch.bfloat16), ("dispatch", None, torch.bfloat16),
            ("planes", True, torch.bfloat16), ("planes", False, torch.float32), ("lut", True, torch.float32),
            ("lut4_g2", False, torch.bfloat16), ("lut8", True, torch.bfloat16),
            ("unpack_mm", None, torch.bfloat16)]


@pytest.mark.parametrize("path,fuse,out_dtype", LN_CASES)
def test_post_layernorm(path, fuse, out_dtype):
    """LN(y) with the fused single-program tail and with F.layer_norm on the fp32 product; both within the
    propagated bound: |ΔLN| <= 2ε(1 + |z|)/σ + 4·N·u·(1 + |z|) + u_out·|z| for |Δy| <= ε."""
    m, k, n_out, eps = 2, 150, 37, 1e-5
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=7)
    y_exact, terms = _exact(x, s, g, h)
    z = F.layer_norm(y_exact, (n_out,), eps=eps)
    sigma = (y_exact.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    eps_y = _bound(k, terms, y_exact, torch.float32).amax(dim=-1, keepdim=True)
    kw = {} if fuse is None else {"fuse_layernorm": fuse}
    w = pack_bits_int32(s)
    y = PATHS[path](_interp, x, w, g, h, k, out_dtype=out_dtype, layernorm_eps=eps, **kw)
    bound = (2 * eps_y / sigma + 4 * n_out * U32) * (1 + z.abs()) + U_OUT[out_dtype] * z.abs()
    _assert_within(y, z, bound)
    if fuse is not False:  # a second launch finds the counters reset and gives the same bits
        again = PATHS[path](_interp, x, w, g, h, k, out_dtype=out_dtype, layernorm_eps=eps, **kw)
        torch.testing.assert_close(again, y, rtol=0, atol=0)


def _ln_tail_bound(v, eps, ln_block, u_out):
    """Bound on |LN_kernel(v) - LN(v)| (elementwise, fp64) for the fused LN tail on the fp32 values v (M, N),
    given LN_BLOCK: first order in u = 2^-24 plus the squares of the mean errors, any summation order within
    a chunk, every division 4u (the GPU's approximate ones). Chunks c of n_c values (one chunk, the one-read
    path, when N <= LN_BLOCK), exact chunk means μ_c and M2_c = Σ_c (v - μ_c)², T_c = Σ_c |v|:
      chunk mean: |e_c| <= (n_c + 3)·u·T_c/n_c (a sum of n_c terms, then the division);
      M2_c around the rounded mean: relative (n_c + 2)·u (rounded d, d², the sum) + n_c·e_c² (the shift).
    Chan's merge of chunk k (n = values so far, N' = n + n_c, w = n_c/N', δ = μ_c - mean, W = n·w):
      mean += δ·w: E' = (n·E + n_c·e_c)/N' + 6u·|δ|·w + u·|mean'| (δ, w, δ·w; the add);
      M2 += M2_c + δ·(δ·w)·n: the term W·δ² >= 0 gets 8u (δ twice, w, two products), its δ is off by
      |Δδ| <= e_c + E, so 2·W·|δ|·|Δδ| + W·Δδ², and the two adds u·(M2_c + W·δ²) + u·M2'.
    Then with ρ = ΔM2 / (N·σ'²), σ'² = M2/N + eps, z = (v - mean)/σ': rstd = 1/sqrt(M2/N + eps) is off by
    (ρ + 5u)/2 + 4u + 4u relative (/N, + eps, halved by the sqrt; sqrt; 1/x), and z = (v - mean)·rstd by
      |Δz| <= E/σ' + |z|·(ρ/2 + 13u) + u_out·|z|   (the subtraction, the product; the output cast).
    For one chunk this is the two-pass bound: E = (N + 3)·u·mean|v|, ρ = (N + 2)·u + (E/σ')². With several,
    the first-order term 2·W·|δ|·|Δδ| is Chan's price: the between-chunk term uses the rounded chunk means
    (the two-pass variance is insensitive to its mean's error to first order)."""
    u = U32
    n = v.shape[-1]
    count = 0
    for c in v.split(ln_block, dim=-1):
        n_c = c.shape[-1]
        mu_c = c.mean(-1, keepdim=True)
        m2_c = (c - mu_c).square().sum(-1, keepdim=True)
        e_c = (n_c + 3) * u * c.abs().mean(-1, keepdim=True)
        dm2_c = (n_c + 2) * u * m2_c + n_c * e_c.square()
        if count == 0:
            mean, err_mean, m2, dm2 = mu_c, e_c, m2_c, dm2_c
        else:
            total = count + n_c
            delta = mu_c - mean
            w = n_c / total
            between = count * w * delta.square()
            d_delta = e_c + err_mean
            mean = mean + delta * w
            err_mean = (count * err_mean + n_c * e_c) / total + 6 * u * delta.abs() * w + u * mean.abs()
            dm2 = (dm2 + dm2_c + 8 * u * between + count * w * (2 * delta.abs() * d_delta + d_delta.square())
                   + u * (m2_c + between) + u * (m2 + m2_c + between))
            m2 = m2 + m2_c + between
        count += n_c
    sigma = (m2 / n + eps).sqrt()
    z = (v - mean) / sigma
    rho = dm2 / (n * sigma.square())
    return err_mean / sigma + z.abs() * (rho / 2 + 13 * u + u_out)


# The fused LN tail on long ragged rows: (path, M, N, LN_ONE_PASS_MAX or None for the module's value, output
# dtype). N <= the limit: the row is read once into registers; N > the limit: two reads of chunks, the mean
# and variance merged per chunk (the limit is lowered to reach that regime cheaply; N = 4100 crosses the
# real one, with a last chunk of 4). Tiles are chosen for the interpreter, whose tl.reduce with a combine
# function runs per element: the core GEMV (split-K 1, as the decode default core1_n16_kw8) reduces
# N·32·BLOCK_KW values, so it gets the smaller rows.
LN_ROW_CONFIGS = {
    "core": lambda mod: mod.GemvConfig(block_n=128, block_kw=1, split_k=1),
    "tc_gemv": lambda mod: mod.MMConfig(block_m=16, block_n=128, block_k=64, group_m=1, split_k=2,
                                        num_warps=4),
    "planes": lambda mod: mod.PlanesConfig(block_n=128, block_kw=2, split_k=2),
    "lut": lambda mod: mod.LutConfig(block_n=128, block_kw=2, split_k=1),
}
BF16, F32 = torch.bfloat16, torch.float32
LN_ROW_CASES = [("core", 1, 1000, None, BF16), ("core", 1, 1536, None, F32), ("core", 1, 1536, 512, BF16),
                ("tc_gemv", 2, 1000, None, F32), ("tc_gemv", 2, 1000, 256, BF16),
                ("tc_gemv", 2, 4100, None, BF16), ("planes", 2, 1536, None, BF16),
                ("planes", 2, 1536, 512, F32), ("planes", 1, 4100, None, F32), ("lut", 1, 1000, 256, BF16)]


def _ln_plan(mod, m, n_out, k, out_dtype, eps, cfg, limit, request, monkeypatch):
    """The LN plan under LN_ONE_PASS_MAX = ``limit`` (None: the module's); asserts the tail's regime."""
    if limit is not None:
        monkeypatch.setattr(mod, "LN_ONE_PASS_MAX", limit)
    mod._cached_plan.cache_clear()  # plans hold LN_BLOCK: none made under another limit
    request.addfinalizer(mod._cached_plan.cache_clear)
    plan = mod.onebit_matmul_plan(m, n_out, k, device="cpu", x_dtype=torch.bfloat16, out_dtype=out_dtype,
                                  layernorm_eps=eps, config=cfg)
    one_read = n_out <= (limit or mod.LN_ONE_PASS_MAX)
    assert plan.fuse_ln and (plan.meta["LN_BLOCK"] >= n_out) == one_read
    return plan


@pytest.mark.parametrize("path,m,n_out,limit,out_dtype", LN_ROW_CASES)
def test_post_layernorm_long_rows_registers_and_chunked(path, m, n_out, limit, out_dtype, monkeypatch,
                                                        request):
    """The fused LN on rows in both regimes of the tail.

    1. Against LN of the fp64 product, within test_post_layernorm's propagated bound. Its 4·N·u term covers
       the tail's rounding (any summation order, the chunk merge included) on rows whose mean|y| is not far
       above σ, as here (random signs: the row mean is about 0); checked on these rows: _ln_tail_bound of
       the fp64 product is below it.
    2. Against the fp64 LN of the kernel's own fp32 product v (the same config without LN writes the values
       the tail reads), which isolates the tail's arithmetic, within _ln_tail_bound (derived there). Much
       tighter than 1.: with fp32 output it catches an unbiased variance (a relative error of 1/(2N) in z)
       in the one-read rows and in the 512-chunk rows of 1536; not at N = 4100, where the first-order
       rounding of 4096-value sums reaches 1/(2N)."""
    mod = _interp
    k, eps = 100, 1e-5
    cfg = LN_ROW_CONFIGS[path](mod)
    plan = _ln_plan(mod, m, n_out, k, out_dtype, eps, cfg, limit, request, monkeypatch)
    ln_block = plan.meta["LN_BLOCK"]
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=n_out + m)
    y_exact, terms = _exact(x, s, g, h)
    z = F.layer_norm(y_exact, (n_out,), eps=eps)
    sigma = (y_exact.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    eps_y = _bound(k, terms, y_exact, torch.float32).amax(dim=-1, keepdim=True)
    w = pack_bits_int32(s)
    y = mod.onebit_matmul(x, w, g, h, k, out_dtype=out_dtype, layernorm_eps=eps, config=cfg)
    note = f"; {path}, LN_BLOCK {ln_block}"
    bound = (2 * eps_y / sigma + 4 * n_out * U32) * (1 + z.abs()) + U_OUT[out_dtype] * z.abs()
    tail = _ln_tail_bound(y_exact, eps, ln_block, U_OUT[out_dtype])
    assert bool((tail <= 4 * n_out * U32 * (1 + z.abs()) + U_OUT[out_dtype] * z.abs()).all()), note
    _assert_within(y, z, bound, note)
    v = mod.onebit_matmul(x, w, g, h, k, out_dtype=torch.float32, config=cfg).double()
    z_v = F.layer_norm(v, (n_out,), eps=eps)
    _assert_within(y, z_v, _ln_tail_bound(v, eps, ln_block, U_OUT[out_dtype]),
                   note + " (against LN of the kernel's own fp32 product)")


def test_post_layernorm_chunk_merge_with_unequal_chunk_means(monkeypatch, request):
    """The chunked tail where the merge matters: rows whose chunks have very different means (S rows all +1
    in every other chunk of 128 and x > 0 for token 0: those outputs are h_n·Σ|x_k g_k|, the others about
    0), so the between-chunk term δ²·n·n_c/(n + n_c) carries most of the variance; token 1 (x of both signs)
    is an ordinary row. N = 600 = 4·128 + 88: a ragged last chunk. Against the fp64 LN of the kernel's own
    fp32 product within _ln_tail_bound, and against the LN of the fp64 product within the propagated product
    error 2ε(1 + |z|)/σ plus that tail bound. A merge that dropped or misweighted the between term, or
    divided the ragged chunk by LN_BLOCK, is off by O(1)."""
    mod = _interp
    m, k, n_out, limit, eps = 2, 64, 600, 128, 1e-5
    cfg = LN_ROW_CONFIGS["lut"](mod)
    plan = _ln_plan(mod, m, n_out, k, torch.float32, eps, cfg, limit, request, monkeypatch)
    assert plan.meta["LN_BLOCK"] == limit
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=11)
    x[0] = x[0].abs()
    g, h = g.abs(), h.abs() + 0.5
    plus = (torch.arange(n_out) // limit) % 2 == 0
    s[plus] = 1
    y_exact, terms = _exact(x, s, g, h)
    z = F.layer_norm(y_exact, (n_out,), eps=eps)
    between = torch.stack([c.mean(-1) for c in y_exact[0].split(limit)])
    assert between.std() > y_exact[0].std() / 2  # the chunk means do differ: the premise of the test
    sigma = (y_exact.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    eps_y = _bound(k, terms, y_exact, torch.float32).amax(dim=-1, keepdim=True)
    w = pack_bits_int32(s)
    y = mod.onebit_matmul(x, w, g, h, k, out_dtype=torch.float32, layernorm_eps=eps, config=cfg)
    v = mod.onebit_matmul(x, w, g, h, k, out_dtype=torch.float32, config=cfg).double()
    _assert_within(y, F.layer_norm(v, (n_out,), eps=eps), _ln_tail_bound(v, eps, limit, 0.0),
                   " (against LN of the kernel's own fp32 product)")
    _assert_within(y, z, 2 * eps_y / sigma * (1 + z.abs()) + _ln_tail_bound(y_exact, eps, limit, 0.0))


def test_split_k_is_deterministic_and_matches_unsplit():
    m, k, n_out = 2, 320, 20
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=3, integer=True)
    w = pack_bits_int32(s)
    ys = [PATHS[p](_interp, x, w, g, h, k, out_dtype=torch.float32, split_k=sk)
          for p, sk in (("core", 1), ("core", 5), ("tc_gemv", 1), ("tc_gemv", 3), ("planes", 1),
                        ("planes", 4), ("lut", 1), ("lut", 3), ("lut4_g2", 1), ("lut4_g2", 4), ("lut8", 2))]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=0, atol=0)


def test_shapes_strides_and_empty():
    k, n_out = 96, 12
    x, s, g, h = _problem(6, k, n_out, torch.bfloat16, seed=11, integer=True)
    w = pack_bits_int32(s)
    y_exact, _ = _exact(x, s, g, h)
    # leading dims
    y = _interp.onebit_matmul(x.reshape(2, 3, k), w, g, h, k, out_dtype=torch.float32)
    assert y.shape == (2, 3, n_out)
    torch.testing.assert_close(y.reshape(6, n_out).double(), y_exact, rtol=0, atol=0)
    # a non-contiguous x (every other column of a wider buffer)
    wide = torch.zeros(6, 2 * k, dtype=x.dtype)
    wide[:, ::2] = x
    y = _interp.onebit_matmul(wide[:, ::2], w, g, h, k, out_dtype=torch.float32)
    torch.testing.assert_close(y.double(), y_exact, rtol=0, atol=0)
    # default output dtype is x's
    assert _interp.onebit_matmul(x, w, g, h, k).dtype == torch.bfloat16
    # no tokens
    y = _interp.onebit_matmul(x[:0], w, g, h, k)
    assert y.shape == (0, n_out)


def test_uint8_rows_not_whole_words():
    """pack_bits rows of ceil(n/8) bytes that are not a multiple of 4 are padded to words."""
    k, n_out = 41, 9  # 6 bytes per row
    x, s, g, h = _problem(2, k, n_out, torch.float16, seed=5, integer=True)
    w8 = pack_bits(s)
    words = _interp.as_int32_words(w8, k)
    assert words.dtype == torch.int32 and words.shape == (n_out, 2)
    torch.testing.assert_close(words, pack_bits_int32(s), rtol=0, atol=0)
    y = _interp.onebit_matmul(x, w8, g, h, k, out_dtype=torch.float32)
    torch.testing.assert_close(y.double(), _exact(x, s, g, h)[0], rtol=0, atol=0)
    # whole words: a view, no copy
    w8_even = pack_bits(torch.ones(3, 64))
    assert _interp.as_int32_words(w8_even, 64).data_ptr() == w8_even.data_ptr()


def test_errors():
    k, n_out = 64, 8
    x, s, g, h = _problem(2, k, n_out, torch.bfloat16, seed=0)
    w = pack_bits_int32(s)
    f = _interp.onebit_matmul
    with pytest.raises(TypeError, match="x must be float32"):
        f(x.to(torch.int32), w, g, h, k)
    with pytest.raises(TypeError, match="signs_packed must be a uint8"):
        f(x, w.to(torch.int64), g, h, k)
    with pytest.raises(ValueError, match="columns"):
        f(x, w[:, :1], g, h, k)
    with pytest.raises(ValueError, match="x must have shape"):
        f(x[:, :10], w, g, h, k)
    with pytest.raises(ValueError, match="g must have shape"):
        f(x, w, g[:10], h, k)
    with pytest.raises(ValueError, match="h must have shape"):
        f(x, w, g, h[:3], k)
    with pytest.raises(ValueError, match="n must be a positive int"):
        f(x, w, g, h, 0)
    with pytest.raises(ValueError, match="layernorm_eps"):
        f(x, w, g, h, k, layernorm_eps=-1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        f(x, w, g, h, k, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="block_k must be a multiple of 32"):
        _interp.onebit_mm(x, w, g, h, k, config=_interp.MMConfig(block_k=48))
    if not onebit_mod._INTERPRETED:  # the CUDA-compiled module refuses CPU tensors
        with pytest.raises(ValueError, match="run on CUDA"):
            onebit_mod.onebit_matmul(x, w, g, h, k)


def test_select_config_regimes():
    mod = _interp
    assert isinstance(mod.select_config(1, 4096, 4096), mod.PlanesConfig)
    assert mod.select_config(1, 11008, 4096) is mod.VARIANTS["lut4_n64_kw8_pdl"]  # (m, N, K); N·K >= 2^25
    assert mod.select_config(1, 4096, 11008) is mod.VARIANTS["lut4_n64_kw8_pdl"]
    assert mod.select_config(1, 4096, 8192) is mod.VARIANTS["lut4_n64_kw8_pdl"]
    assert mod.select_config(1, 8192, 2048) is mod.VARIANTS["planes_n64_kw32"]  # below 2^25, K <= N
    assert mod.select_config(1, 1536, 576) is mod.VARIANTS["core1_n16_kw8"]  # small weight (SmolLM2)
    assert mod.select_config(1, 2048, 2048) is mod.VARIANTS["core1_n16_kw8"]  # up to 2^22 with K <= N
    assert mod.select_config(1, 2048, 8192) is mod.VARIANTS["planes_n32_kw32"]  # K > N: bit planes
    cfg = mod.select_config(16, 4096, 4096)
    assert isinstance(cfg, mod.MMConfig) and cfg.block_m == 16
    assert mod.select_config(2, 4096, 4096) is mod.VARIANTS["tc16_n64_k256_swap"]
    assert mod.select_config(4, 11008, 4096) is mod.VARIANTS["tc16_n128_k128"]  # 172 tiles of 64 >= 132 SMs
    assert mod.select_config(4, 1536, 576) is mod.VARIANTS["tc16_n64_k256_swap"]
    assert isinstance(mod.select_config(mod.UNPACK_MM_MIN_M - 1, 4096, 4096), mod.MMConfig)
    assert isinstance(mod.select_config(4096, 4096, 4096), mod.UnpackMMConfig)
    assert mod.select_config(4096, 1536, 576) is mod.VARIANTS["unpack_mm_hfold"]  # small weight
    assert mod.select_config(4096, 4096, 4096) is mod.VARIANTS["unpack_mm"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpack_mm_16bit_accumulator_within_widened_bound(dtype):
    """UnpackMMConfig(fp32_acc=False): cuBLAS rounds the fp32 sum to x's dtype before h, one more rounding:
    |y - y_exact| <= γ·terms + u_x·|y_exact|·(1 + u_out) + u_out·|y_exact| (first order in u)."""
    m, k, n_out = 4, 130, 40
    x, s, g, h = _problem(m, k, n_out, dtype, seed=21)
    y_exact, terms = _exact(x, s, g, h)
    y = _unpack_mm16(_interp, x, pack_bits_int32(s), g, h, k, out_dtype=dtype)
    u_x = U_OUT[dtype]
    bound = _bound(k, terms, y_exact, dtype) + u_x * (1 + u_x) * (terms * U32 * (3 * k + 2) + y_exact.abs())
    _assert_within(y, y_exact, bound)


def _hfold_bound(k, terms, y_exact, dtype):
    """UnpackMMConfig(fold_h=True): W' = S ⊙ RN(h gᵀ), |δ| <= u per weight, so the exact product with W' is
    within u·T of y (T = terms = |h|·Σ|x g|); cuBLAS's fp32 sum adds at most γ·(1 + u)·T (γ = (3k + 2)·u32,
    as ``_bound``) and the output rounding u·(|y| + (u + γ(1 + u))·T). In all: u·|y| + (1 + u)²(u + γ)·T."""
    u = U_OUT[dtype]
    return u * y_exact.abs() + (1 + u) ** 2 * (u + (3 * k + 2) * U32) * terms


def _check_hfold(mod, device, dtype, m, k, n_out, seed):
    x, s, g, h = _problem(m, k, n_out, dtype, seed=seed, device=device)
    y_exact, terms = _exact(x.cpu(), s.cpu(), g.cpu(), h.cpu())
    y = mod.onebit_matmul(x, pack_bits_int32(s), g, h, k, config="unpack_mm_hfold")
    assert y.dtype == dtype
    _assert_within(y, y_exact, _hfold_bound(k, terms, y_exact, dtype))
    # the weight: S ⊙ RN(h gᵀ), one rounding of the exact fp32 product
    wd = mod.unpack_weight(pack_bits_int32(s), g, k, dtype, h=h)
    ref = (s.float() * (h.float()[:, None] * g.float()[None, :])).to(dtype)
    torch.testing.assert_close(wd, ref, rtol=0, atol=0)
    return y, y_exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpack_mm_hfold_within_its_bound(dtype):
    _check_hfold(_interp, "cpu", dtype, 5, 130, 40, seed=31)


def test_unpack_mm_hfold_needs_h_of_the_weight_dtype():
    _, s, g, h = _problem(1, 64, 8, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="h must be"):
        _interp.unpack_weight(pack_bits_int32(s), g, 64, torch.bfloat16, h=h.float())


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_unpack_mm_hfold_within_its_bound(dtype):
    _check_hfold(onebit_mod, "cuda", dtype, 512, 4096, 1000, seed=32)


def test_unpack_weight_is_exact():
    k, n_out = 77, 10
    _, s, g, _ = _problem(1, k, n_out, torch.bfloat16, seed=4)
    for dtype, gd in ((torch.bfloat16, g), (torch.float32, g), (torch.float32, g.float())):
        wd = _interp.unpack_weight(pack_bits(s), gd, k, dtype)
        assert wd.dtype == dtype and wd.shape == (n_out, k)
        torch.testing.assert_close(wd, (s.to(dtype) * gd.to(dtype)[None, :]), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(onebit_mod.VARIANTS))
def test_every_named_variant_is_exact_on_integers(name):
    """Each entry of VARIANTS (the probe's list), at its smallest token count, on a ragged shape."""
    lo, _ = _interp.VARIANT_M_RANGE[name]
    m, k, n_out = max(lo, 1 if lo < 17 else 17), 100, 21
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=m + 1, integer=True)
    y_exact, _ = _exact(x, s, g, h)
    y = _interp.onebit_matmul(x, pack_bits_int32(s), g, h, k, out_dtype=torch.float32, config=name)
    cfg = _interp.VARIANTS[name]
    if isinstance(cfg, _interp.UnpackMMConfig) and not cfg.fp32_acc:  # the sum is rounded to bf16 first
        bound = U_OUT[torch.bfloat16] * y_exact.abs()
        _assert_within(y, y_exact, bound)
    else:
        torch.testing.assert_close(y.double(), y_exact, rtol=0, atol=0)


def test_config_argument_errors():
    x, s, g, h = _problem(1, 64, 8, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="config must be a name"):
        _interp.onebit_matmul(x, pack_bits_int32(s), g, h, 64, config="nope")
    with pytest.raises(ValueError, match="M <= 16"):
        _interp.onebit_matmul(x.expand(17, 64), pack_bits_int32(s), g, h, 64, config="planes_n64_kw32")
    with pytest.raises(ValueError, match="bits must be one of"):
        _interp.onebit_matmul(x, pack_bits_int32(s), g, h, 64, config=_interp.LutConfig(bits=5))
    with pytest.raises(ValueError, match="block_kw must be a power of two"):
        _interp.onebit_matmul(x, pack_bits_int32(s), g, h, 64, config=_interp.LutConfig(block_kw=3))


# ------------------------------------------------------------------------------------------------ LUT GEMV


def _lut_tables_reference(x, g, bits, kt):
    """T[m, i, b] = Σ_{t<bits} (bit t of b ? +1 : -1)·a[m, bits·i + t] with a = fp32(x)·fp32(g), zero past K,
    summed in fp32 from 0.0 in the order t = 0, 1, ... (the order ``_xg_lut_kernel`` promises)."""
    m, k = x.shape
    a = torch.zeros(m, kt * bits)
    a[:, :k] = x.float() * g.float()
    a = a.view(m, kt, bits)
    b = torch.arange(1 << bits)
    table = torch.zeros(m, kt, 1 << bits)
    for t in range(bits):
        term = a[:, :, t, None]
        table = table + torch.where((b >> t) & 1 == 1, term, -term)
    return table


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lut_tables_bit_exact(bits, dtype):
    """The pre-kernel's tables against the torch reference, bit for bit (random data, a strided x, K ragged
    and tables padded past it: those must be zeros)."""
    m, k = 3, 77
    x, _, g, _ = _problem(m, 2 * k, 1, dtype, seed=bits)
    x, g = x[:, ::2], g[:k].contiguous()
    kt = 32 // bits * 4  # 4 words where 3 hold K: one word of zero tables
    block_b = _interp.LUT_PREP_TABLES[bits]
    lut = torch.full((m, kt, 1 << bits), float("nan"))
    _interp._xg_lut_kernel[(m, -(-kt // block_b))](x, g, lut, k, kt, x.stride(0), x.stride(1),
                                                    BLOCK_B=block_b, BITS=bits)
    ref = _lut_tables_reference(x, g, bits, kt)
    assert torch.equal(lut.view(torch.int32), ref.view(torch.int32))
    assert not lut[:, -(32 // bits):].any()


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("bits,block_kw", [(4, 4), (4, 8), (8, 4)])
def test_lut_tokens_splits_and_word_strides(m, bits, block_kw):
    """Integer data (exact) for M = 1..4, split-K 1 and 2 (K ragged: not a multiple of 4 or 32; N not of the
    tile), with contiguous words (16 per row: whole tiles, rows at 16-byte multiples, so VEC: 16-byte word
    loads under one mask per tile) and with a row stride of 17 words (per-word loads and masks)."""
    k, n_out = 509, 45
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=10 * m + bits, integer=True)
    y_exact, _ = _exact(x, s, g, h)
    words = pack_bits_int32(s)
    padded = torch.zeros(n_out, words.shape[1] + 1, dtype=torch.int32)
    padded[:, :-1] = words
    for split_k, w in ((1, words), (2, words), (2, padded[:, :-1])):
        cfg = _interp.LutConfig(block_n=32, block_kw=block_kw, bits=bits, split_k=split_k)
        plan = _interp.onebit_matmul_plan(m, n_out, k, device="cpu", x_dtype=x.dtype, out_dtype=torch.float32,
                                          config=cfg)
        assert plan.split_k == split_k and plan.meta_vec["VEC"] and not plan.meta["VEC"]
        # one tile per split (block_kw 8, split 2: no prefetch) or several (the others: prefetch)
        assert plan.meta["PREFETCH"] == (plan.kw_per_split > block_kw) == (block_kw * split_k < 16)
        y = _interp.onebit_matmul(x, w, g, h, k, out_dtype=torch.float32, config=cfg)
        torch.testing.assert_close(y.double(), y_exact, rtol=0, atol=0, msg=f"split_k {split_k}, "
                                   f"row stride {w.stride(0)}")


def test_lut_window_and_misaligned_buffer(monkeypatch):
    """_lut_window keeps a window aligned and off 2^32-byte boundaries; a misaligned fresh LUT allocation
    (never seen from the CUDA caching allocator) is replaced by such a window of a larger one, and the
    results stay exact."""
    window, g32 = _interp._lut_window, 1 << 32
    assert window(5 * g32 + 1024, 4096, 64) == 5 * g32 + 1024  # aligned, inside
    assert window(5 * g32 + 1000, 4096, 64) == 5 * g32 + 1024  # rounded up
    assert window(6 * g32 - 4096, 4096, 64) == 6 * g32 - 4096  # ends at the boundary
    assert window(6 * g32 - 4000, 4096, 64) == 6 * g32  # would cross it: starts there
    real_empty = torch.empty
    misaligned = []

    def empty(*args, **kwargs):
        shape = args[0] if args else None
        if isinstance(shape, tuple) and len(shape) == 3 and not misaligned:  # the LUT buffer
            misaligned.append(shape)
            return real_empty(shape[0] * shape[1] * shape[2] + 1, **kwargs)[1:].view(shape)  # 4 bytes off
        return real_empty(*args, **kwargs)

    m, k, n_out = 2, 100, 33
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=21, integer=True)
    monkeypatch.setattr(torch, "empty", empty)
    y = _lut(_interp, x, pack_bits_int32(s), g, h, k, out_dtype=torch.float32)
    monkeypatch.undo()
    assert misaligned
    torch.testing.assert_close(y.double(), _exact(x, s, g, h)[0], rtol=0, atol=0)


# Cached plans: (M, config name or None, layernorm_eps, x dtype, out dtype); one call each.
PLAN_CASES = [(1, None, None, torch.bfloat16, torch.bfloat16),
              (1, None, 1e-5, torch.bfloat16, torch.bfloat16),
              (1, "core1_n16_kw8", 1e-5, torch.float32, torch.float32),
              (2, "core_n32_kw8", None, torch.bfloat16, torch.float32),
              (3, "tc16_n64_k256_swap", 1e-5, torch.bfloat16, torch.bfloat16),
              (2, "planes_n32_kw32", None, torch.float16, torch.float16),
              (17, None, 1e-5, torch.bfloat16, torch.float32)]  # 17: the Triton tensor-core GEMM


@pytest.mark.parametrize("m,name,eps,dtype,out_dtype", PLAN_CASES)
def test_cached_plan_equals_uncached_bit_for_bit(m, name, eps, dtype, out_dtype):
    """onebit_matmul_plan(...)(x2, words, g, h) and onebit_linear_packed give onebit_matmul's bits (the plan
    is the same object for the same arguments, and a second call of it gives the same bits again)."""
    k, n_out = 100, 21
    x, s, g, h = _problem(m, k, n_out, dtype, seed=m + 50)
    w = pack_bits_int32(s)
    ref = _interp.onebit_matmul(x, w, g, h, k, out_dtype=out_dtype, layernorm_eps=eps, config=name)
    plan = _interp.onebit_matmul_plan(m, n_out, k, device="cpu", x_dtype=dtype, g_dtype=g.dtype,
                                      out_dtype=out_dtype, layernorm_eps=eps, config=name)
    assert plan is _interp.onebit_matmul_plan(m, n_out, k, device="cpu", x_dtype=dtype, g_dtype=g.dtype,
                                              out_dtype=out_dtype, layernorm_eps=eps, config=name)
    torch.testing.assert_close(plan(x, w, g, h), ref, rtol=0, atol=0)
    fast = _interp.onebit_linear_packed(x.reshape(1, m, k), w, g, h, k, out_dtype=out_dtype,
                                        layernorm_eps=eps, config=name)
    assert fast.shape == (1, m, n_out)
    torch.testing.assert_close(fast[0], ref, rtol=0, atol=0)
    torch.testing.assert_close(plan(x, w, g, h), ref, rtol=0, atol=0)


class _CountLaunches:
    """Stands in for a @triton.jit kernel: counts ``kernel[grid](...)`` launches and runs the kernel."""

    def __init__(self, kernel, counts):
        self.kernel, self.counts = kernel, counts

    def __getitem__(self, grid):
        self.counts["launch"] += 1
        return self.kernel[grid]


class _CountEmpty(torch.overrides.TorchFunctionMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.empty:
            self.counts["empty"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,eps,launches,empties", [
    ("core1_n32_kw8", 1e-5, 1, 1), ("core1_n32_kw8", None, 1, 1),
    ("core_n32_kw8", None, 1, 2),  # split-K 2 here: + the partials
    ("planes_n32_kw32", None, 2, 3)])  # pre-kernel and its planes buffer, split-K partials
def test_warm_plan_call_launches_and_allocations(name, eps, launches, empties, monkeypatch):
    """A warm call of the layer's path at M = 1: the single-launch variants make one Triton launch and
    allocate only the output (counters and the fused LN buffer come from the per-stream workspace)."""
    k, n_out = 100, 21
    x, s, g, h = _problem(1, k, n_out, torch.bfloat16, seed=3)
    w = pack_bits_int32(s)
    cfg = _interp.VARIANTS[name]
    if not cfg.split_k:  # force a split (the auto split depends on the SM count), small blocks to split
        cfg = type(cfg)(**{**cfg.__dict__, "split_k": 2, "block_kw": 2})
    call = lambda: _interp.onebit_linear_packed(x, w, g, h, k, layernorm_eps=eps, config=cfg)  # noqa: E731
    ref = call()  # warm: plan and workspace made
    counts = {"launch": 0, "empty": 0}
    for attr in dir(_interp):
        if attr.startswith("_") and attr.endswith("_kernel"):
            monkeypatch.setattr(_interp, attr, _CountLaunches(getattr(_interp, attr), counts))
    with _CountEmpty(counts):
        y = call()
    assert counts == {"launch": launches, "empty": empties}
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


class _FakeJit:
    """A @triton.jit kernel as the direct-launch path sees it: ``kernel[grid](...)`` runs the interpreted
    kernel and returns a "CompiledKernel" whose launcher gets Triton's argument list (grid, stream, function,
    packed metadata, launch metadata, two hooks, then every kernel parameter in order, constexprs included)
    and runs the kernel again from that list alone (so a wrong order or a missing constexpr fails)."""

    def __init__(self, kernel, log):
        self.kernel, self.log, self.arg_names = kernel, log, kernel.arg_names

    def __getitem__(self, grid):
        def jit_launch(*args, **meta):
            self.log.append("jit")
            self.kernel[grid](*args, **meta)
            self.options = {k: v for k, v in meta.items() if k in ("num_warps", "num_stages")}
            return _FakeCompiled(self)
        return jit_launch


class _FakeCompiled:
    function, packed_metadata = "function", "packed"

    def __init__(self, jit):
        self.jit = jit

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *params):
        jit = self.jit
        jit.log.append("direct")
        assert (function, packed, launch_metadata, enter, exit_) == ("function", "packed", None, None, None)
        assert g2 == 1
        names = jit.arg_names
        assert len(params) == len(names)
        sig = inspect.signature(jit.kernel.fn).parameters.values()
        n_const = sum(1 for p in sig if "constexpr" in str(p.annotation))  # the last parameters
        cut = len(names) - n_const
        jit.kernel[(g0, g1)](*params[:cut], **dict(zip(names[cut:], params[cut:])), **jit.options)


@pytest.mark.parametrize("name", ["core1_n32_kw8", "lut_n64_kw16", "lut4_n64_kw8_pdl", "tc16_n64_k256_swap",
                                  "planes_n32_kw32"])
def test_direct_launch_argument_list(name, monkeypatch):
    """DIRECT_LAUNCH (off by default; the GPU test checks it for real): the first call per argument
    specialization goes through the JIT, later ones through the launcher with the same bits; a new x
    layout (other strides) goes through the JIT again."""
    mod = _interp
    k, n_out, m = 100, 21, 2
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=12)
    w = pack_bits_int32(s)
    ref = mod.onebit_linear_packed(x, w, g, h, k, layernorm_eps=1e-5, config=name)
    log = []
    monkeypatch.setattr(mod, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(mod, "_direct_launch_supported", lambda: True)
    monkeypatch.setattr(mod, "_launch_hooks_set", lambda: False)
    mod._cached_plan.cache_clear()
    for attr in dir(mod):
        if attr.startswith("_") and attr.endswith("_kernel") and attr != "_rows_epilogue_kernel":
            monkeypatch.setattr(mod, attr, _FakeJit(getattr(mod, attr), log))
    launches = mod.OneBitPlan(m, n_out, k, x.dtype, g.dtype, x.dtype, x.device, 1e-5, mod.VARIANTS[name],
                              None).launches
    ys = [mod.onebit_linear_packed(x, w, g, h, k, layernorm_eps=1e-5, config=name) for _ in range(2)]
    assert log == ["jit"] * launches + ["direct"] * launches
    wide = torch.zeros(m, 2 * k, dtype=x.dtype)
    wide[:, ::2] = x
    ys.append(mod.onebit_linear_packed(wide[:, ::2], w, g, h, k, layernorm_eps=1e-5, config=name))
    assert log[-launches:] == ["jit"] * launches
    mod._cached_plan.cache_clear()
    for y in ys:
        torch.testing.assert_close(y, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ GPU


# (x dtype, M, output dtype): every regime of the dispatcher, each dtype path (fp32 x: the split path).
GPU_DISPATCH = [(torch.bfloat16, 1, torch.bfloat16), (torch.bfloat16, 16, torch.bfloat16),
                (torch.bfloat16, 600, torch.bfloat16), (torch.bfloat16, 5, torch.float32),
                (torch.float16, 1, torch.float16), (torch.float16, 100, torch.float16),
                (torch.float32, 1, torch.float32), (torch.float32, 16, torch.float32),
                (torch.float32, 100, torch.float32)]


@CUDA
@pytest.mark.parametrize("dtype,m,out_dtype", GPU_DISPATCH)
def test_gpu_dispatch_within_bound(dtype, m, out_dtype):
    k, n_out = 1000, 300  # ragged K (not a multiple of 32) and N
    x, s, g, h = _problem(m, k, n_out, dtype, seed=m, device="cuda")
    y_exact, terms = _exact(x.cpu(), s.cpu(), g.cpu(), h.cpu())
    bound = _bound(k, terms, y_exact, out_dtype)
    cfg = onebit_mod.select_config(m, n_out, k, torch.cuda.get_device_properties(0).multi_processor_count)
    note = f"; path {cfg}"
    if isinstance(cfg, onebit_mod.UnpackMMConfig) and cfg.fold_h and dtype != torch.float32 \
            and out_dtype == dtype:  # h folded into the dense weight (small weights)
        bound = _hfold_bound(k, terms, y_exact, dtype)
    elif isinstance(cfg, onebit_mod.UnpackMMConfig) and dtype != torch.float32 and out_dtype == dtype:
        # unpack-then-cuBLAS: the fp32 sum (error e0 <= gamma·terms, h included) is rounded once to x's
        # dtype (u_x), multiplied by h, then rounded to out_dtype (u_out):
        # |Δy| <= e0 + (u_x + u_out + u_x·u_out)·(|y| + e0)
        u_x, u_out = U_OUT[dtype], U_OUT[out_dtype]
        e0 = (3 * k + 2) * U32 * terms
        bound = e0 + (u_x + u_out + u_x * u_out) * (y_exact.abs() + e0)
        # diagnostics: the same roundings applied to the exact sum on the CPU (must be within the bound), and
        # the cuBLAS flags that would add roundings (the kernel switches them off around its matmul)
        acc = (x.cpu().double() * g.cpu().double()) @ s.cpu().double().t()
        model = (acc.to(dtype).float() * h.cpu().float()).to(out_dtype).double()
        mm = torch.backends.cuda.matmul
        note += (f"; one-rounding model on CPU: worst excess {((model - y_exact).abs() - bound).max():.3e}; "
                 f"torch flags: bf16 reduced-precision reduction "
                 f"{getattr(mm, 'allow_bf16_reduced_precision_reduction', '?')}, fp16 "
                 f"{getattr(mm, 'allow_fp16_reduced_precision_reduction', '?')}")
        f32 = onebit_mod.onebit_matmul(x, _pack(s, "int32"), g, h, k, out_dtype=out_dtype,
                                       config="unpack_mm_f32acc")
        note += f"; unpack_mm_f32acc worst excess {((f32.double().cpu() - y_exact).abs() - bound).max():.3e}"
    for layout in ("int32", "uint8"):
        y = onebit_mod.onebit_matmul(x, _pack(s, layout), g, h, k, out_dtype=out_dtype)
        _assert_within(y, y_exact, bound, note)


@CUDA
@pytest.mark.parametrize("name", list(onebit_mod.VARIANTS))
def test_gpu_every_named_variant(name):
    """Every VARIANTS entry at both ends of its token range, K = 4096 and a ragged N: bit-exact on integer
    data (the 16-bit-accumulator unpack variant within u_bf16·|y|)."""
    lo, hi = onebit_mod.VARIANT_M_RANGE[name]
    cfg = onebit_mod.VARIANTS[name]
    for m in sorted({lo, min(hi, 300)}):
        x, s, g, h = _problem(m, 4096, 1000, torch.bfloat16, seed=m, integer=True, device="cuda")
        y = onebit_mod.onebit_matmul(x, pack_bits_int32(s), g, h, 4096, out_dtype=torch.float32, config=name)
        y_exact = _exact(x.cpu(), s.cpu(), g.cpu(), h.cpu())[0]
        if isinstance(cfg, onebit_mod.UnpackMMConfig) and not cfg.fp32_acc:
            _assert_within(y, y_exact, U_OUT[torch.bfloat16] * y_exact.abs())
        else:
            torch.testing.assert_close(y.double().cpu(), y_exact, rtol=0, atol=0)


@CUDA
@pytest.mark.parametrize("path,m,k,n_out", [("core", 1, 4096, 512), ("core", 2, 2080, 200),
                                            ("tc_gemv", 7, 2080, 200), ("tc_swap", 16, 4096, 384),
                                            ("tc_gemm", 33, 4096, 384), ("tc_gemm", 70, 2080, 200)])
def test_gpu_paths_integer_exact(path, m, k, n_out):
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=k + m, integer=True, device="cuda")
    y = PATHS[path](onebit_mod, x, pack_bits_int32(s), g, h, k, out_dtype=torch.float32)
    y_exact = _exact(x.cpu(), s.cpu(), g.cpu(), h.cpu())[0]
    torch.testing.assert_close(y.double().cpu(), y_exact, rtol=0, atol=0)


@CUDA
def test_gpu_bf16_within_2x_torch_same_precision():
    """bf16 output: max error at most 2x that of torch's bf16 product of x and the dense ±g weight (the same
    operands: bf16 x, S ⊙ g in bf16, fp32 accumulation, bf16 result), plus the fp32 summation slack."""
    m, k, n_out = 16, 4096, 1024
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=1, device="cuda")
    y_exact, terms = _exact(x.cpu(), s.cpu(), g.cpu(), h.cpu())
    w_dense = (s.to(torch.bfloat16) * g[None, :])
    y_torch = ((x @ w_dense.t()).float() * h.float()).to(torch.bfloat16)
    err_t = (y_torch.double().cpu() - y_exact).abs().max()
    y = onebit_mod.onebit_matmul(x, pack_bits_int32(s), g, h, k)
    err_k = (y.double().cpu() - y_exact).abs().max()
    assert err_k <= 2 * err_t + ((3 * k + 2) * U32 * terms).max()


@CUDA
@pytest.mark.parametrize("m,n_out", [(1, 1536), (1, 11008), (4, 576), (64, 300)])
def test_gpu_post_layernorm(m, n_out):  # fused (the first three) and unfused (M·N above the limit)
    k, eps = 576, 1e-5
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=m, device="cuda")
    y_exact, terms = _exact(x.cpu(), s.cpu(), g.cpu(), h.cpu())
    z = F.layer_norm(y_exact, (n_out,), eps=eps)
    sigma = (y_exact.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    eps_y = _bound(k, terms, y_exact, torch.float32).amax(dim=-1, keepdim=True)
    bound = (2 * eps_y / sigma + 4 * n_out * U32) * (1 + z.abs()) + U_OUT[torch.bfloat16] * z.abs()
    y = onebit_mod.onebit_matmul(x, pack_bits_int32(s), g, h, k, layernorm_eps=eps)
    _assert_within(y, z, bound)
    y2 = onebit_mod.onebit_matmul(x, pack_bits_int32(s), g, h, k, layernorm_eps=eps)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


@CUDA
def test_gpu_cuda_graph_replay():
    """Launches inside a CUDA graph (counters reset by the kernels themselves) replay correctly."""
    m, k, n_out = 1, 1536, 576
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=9, device="cuda")
    w = pack_bits_int32(s)
    f = lambda: onebit_mod.onebit_matmul(x, w, g, h, k, layernorm_eps=1e-5)  # noqa: E731
    ref = f()  # warm-up: compiles and allocates the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@CUDA
@pytest.mark.parametrize("name,m", [("core1_n32_kw8", 1), ("core_n32_kw8", 1), ("planes_n64_kw32", 1),
                                    ("tc16_n64_k256_swap", 4), ("tc16_n128_k128", 16)])
def test_gpu_single_launch_and_direct_launch_same_bits(name, m, monkeypatch):
    """The new variants on the GPU against the integer-exact product, and DIRECT_LAUNCH (the CompiledKernel's
    launcher after the first JIT launch) gives the JIT path's bits, eagerly and replayed in a CUDA graph."""
    k, n_out = 4096, 1000
    x, s, g, h = _problem(m, k, n_out, torch.bfloat16, seed=m, integer=True, device="cuda")
    w = pack_bits_int32(s)
    y = onebit_mod.onebit_matmul(x, w, g, h, k, out_dtype=torch.float32, config=name)
    y_exact = _exact(x.cpu(), s.cpu(), g.cpu(), h.cpu())[0]
    torch.testing.assert_close(y.double().cpu(), y_exact, rtol=0, atol=0)
    xr, _, gr, hr = _problem(m, k, n_out, torch.bfloat16, seed=m + 1, device="cuda")
    f = lambda: onebit_mod.onebit_linear_packed(xr, w, gr, hr, k, layernorm_eps=1e-5, config=name)  # noqa: E731
    ref = f()
    monkeypatch.setattr(onebit_mod, "DIRECT_LAUNCH", True)
    assert onebit_mod._direct_launch_supported(), "Triton without the launcher convention of >= 3.3"
    for _ in range(3):
        torch.testing.assert_close(f(), ref, rtol=0, atol=0)
    plan = onebit_mod.onebit_matmul_plan(m, n_out, k, device="cuda", x_dtype=xr.dtype, layernorm_eps=1e-5,
                                         config=name)
    assert plan._direct and all(v is not False for v in plan._direct.values())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = f()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@CUDA
def test_gpu_layer_torch_compile_inductor():
    """The packed layer compiled with inductor (one custom-op node) gives the eager bits."""
    from lowbit.onebit import OneBitLinear

    layer = OneBitLinear(576, 1536, packed=True, device="cuda").pack(torch.bfloat16)
    with torch.no_grad():
        layer.weight_packed.copy_(torch.randint(0, 256, layer.weight_packed.shape, dtype=torch.uint8))
        layer.g.uniform_(0.5, 1.5)
        x = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
        eager = layer(x)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(layer, fullgraph=True)
            torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
        finally:
            torch._dynamo.reset()
