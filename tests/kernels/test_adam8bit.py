"""The fused 8-bit Adam kernel (lowbit.kernels.adam8bit) equals its references bit for bit.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py),
so shapes stay tiny: three blocks and a partial one. Large shapes: tests/optim/test_adam8bit_gpu.py.
"""

import math

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from lowbit.kernels import adam8bit as K
from lowbit.optim.functional import adam8bit_reference_step, adam_reference_step, adam_scalars
from lowbit.quant.codebook import decision_boundaries, dynamic_map, quantize_blockwise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3 * 256 + 17,), (20, 50), (300,)]  # 3 blocks + partial; 1000 elements; one partial block


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_twin_at_every_boundary(signed):
    """The in-kernel nearest-code search equals bucketize on every decision boundary, 1-3 float32 steps either
    side of it, every code value, the decade edges and random values of every magnitude."""
    code = dynamic_map(signed)
    b = decision_boundaries(code)
    pts = [b, code]
    for _ in range(3):
        pts += [torch.nextafter(pts[-2], torch.tensor(math.inf)),
                torch.nextafter(pts[-2], torch.tensor(-math.inf))]
    pts.append(torch.tensor([10.0**-k for k in range(9)] + [2.0**-k for k in range(30)] + [0.0, 1e-30]))
    pts.append(torch.randn(3000, generator=_gen(1)) * torch.logspace(-9, 0, 3000))
    xn = torch.cat(pts)
    xn = torch.cat([xn, -xn]).clamp(-1, 1)
    blocks = torch.nn.functional.pad(xn, (0, (-xn.numel()) % 255)).view(-1, 255)
    x = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)  # absmax 1 in every block
    x = torch.cat([x, torch.randn(100, generator=_gen(2))]).to(DEVICE)  # and a partial block
    ref_codes, ref_absmax = quantize_blockwise(x, code, 256)
    codes, absmax = K.quantize_dynamic_blockwise(x, signed, 256)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes), int((codes != ref_codes).sum())


@pytest.mark.parametrize("block_size", [256, 64])
def test_quantize_twin_block_sizes_and_dtypes(block_size):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(2 * block_size + 5, generator=_gen(3)) * 1e-3).to(dtype).to(DEVICE)
        for signed in (True, False):
            ref = quantize_blockwise(x, dynamic_map(signed), block_size)
            out = K.quantize_dynamic_blockwise(x, signed, block_size)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def _random_state(p, block_size, gen, *, eight_bit):
    """A state as a few steps would leave it: moments of gradient-like size, in 8 bits or fp32."""
    n = p.numel()
    m = torch.randn(n, generator=gen) * 1e-3 * torch.rand(n, generator=gen)
    v = (torch.randn(n, generator=gen) * 1e-3) ** 2
    if not eight_bit:
        return m.view(p.shape).to(p.device), v.view(p.shape).to(p.device)
    mc, ma = quantize_blockwise(m, dynamic_map(True), block_size)
    vc, va = quantize_blockwise(v, dynamic_map(False), block_size)
    return tuple(t.to(p.device) for t in (mc, ma, vc, va))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_multi_tensor_step_equals_reference_8bit(dtype, decoupled, weight_decay):
    gen = _gen(10)
    params = [(torch.randn(s, generator=gen) * 0.1).to(dtype).to(DEVICE) for s in SHAPES]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(dtype).to(DEVICE) for s in SHAPES]
    states = [_random_state(p, 256, gen, eight_bit=True) for p in params]
    for step in (1, 7):
        s = adam_scalars(step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
        expected = [adam8bit_reference_step(p, g, *st, s, decoupled=decoupled)
                    for p, g, st in zip(params, grads, states)]
        K.adam8bit_multi_tensor_step(
            params, grads, [st[0] for st in states], [st[2] for st in states], [st[1] for st in states],
            [st[3] for st in states], beta1=s.beta1, beta2=s.beta2, one_minus_beta1=s.one_minus_beta1,
            one_minus_beta2=s.one_minus_beta2, eps=s.eps, step_size=s.step_size, inv_bc2_sqrt=s.inv_bc2_sqrt,
            weight_decay=s.weight_decay, decay_factor=s.decay_factor, decoupled=decoupled,
        )
        for p, st, exp in zip(params, states, expected):
            assert torch.equal(p, exp[0])
            for got, want in zip((st[0], st[1], st[2], st[3]), exp[1:]):
                assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_step_equals_reference_fp32_state(dtype):
    gen = _gen(11)
    params = [(torch.randn(s, generator=gen) * 0.1).to(dtype).to(DEVICE) for s in SHAPES]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(dtype).to(DEVICE) for s in SHAPES]
    states = [_random_state(p, 256, gen, eight_bit=False) for p in params]
    s = adam_scalars(3, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    expected = [adam_reference_step(p, g, m, v, s, decoupled=True)
                for p, g, (m, v) in zip(params, grads, states)]
    K.adam8bit_multi_tensor_step(
        params, grads, [m for m, _ in states], [v for _, v in states], None, None,
        beta1=s.beta1, beta2=s.beta2, one_minus_beta1=s.one_minus_beta1, one_minus_beta2=s.one_minus_beta2,
        eps=s.eps, step_size=s.step_size, inv_bc2_sqrt=s.inv_bc2_sqrt, weight_decay=s.weight_decay,
        decay_factor=s.decay_factor, decoupled=True,
    )
    for p, (m, v), exp in zip(params, states, expected):
        assert torch.equal(p, exp[0]) and torch.equal(m, exp[1]) and torch.equal(v, exp[2])


def test_unaligned_views_and_block_size():
    """Parameters that are views at odd offsets (no 16-byte alignment: scalar loads) and block size 64."""
    gen = _gen(12)
    flat = torch.randn(2 * 300 + 3, generator=gen).to(DEVICE)
    params = [flat[1:301], flat[302:602]]  # offsets of 1 and 302 floats
    grads = [torch.randn(300, generator=gen).to(DEVICE) * 1e-2 for _ in params]
    states = [_random_state(p, 64, gen, eight_bit=True) for p in params]
    s = adam_scalars(2, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0)
    expected = [adam8bit_reference_step(p, g, *st, s, decoupled=True, block_size=64)
                for p, g, st in zip(params, grads, states)]
    K.adam8bit_multi_tensor_step(
        params, grads, [st[0] for st in states], [st[2] for st in states], [st[1] for st in states],
        [st[3] for st in states], beta1=s.beta1, beta2=s.beta2, one_minus_beta1=s.one_minus_beta1,
        one_minus_beta2=s.one_minus_beta2, eps=s.eps, step_size=s.step_size, inv_bc2_sqrt=s.inv_bc2_sqrt,
        weight_decay=s.weight_decay, decay_factor=s.decay_factor, decoupled=True, block_size=64,
    )
    for p, st, exp in zip(params, states, expected):
        assert torch.equal(p, exp[0])
        assert all(torch.equal(a, b) for a, b in zip(st, (exp[1], exp[2], exp[3], exp[4])))


def test_launcher_errors():
    p = [torch.zeros(300, device=DEVICE)]
    g = [torch.zeros(300, device=DEVICE)]
    codes = [torch.zeros(300, dtype=torch.uint8, device=DEVICE)]
    absmax = [torch.zeros(2, device=DEVICE)]
    kw = dict(beta1=0.9, beta2=0.99, one_minus_beta1=0.1, one_minus_beta2=0.01, eps=1e-8, step_size=1e-3,
              inv_bc2_sqrt=1.0, weight_decay=0.0, decay_factor=1.0, decoupled=True)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        K.adam8bit_multi_tensor_step(p, g, codes, codes, [torch.zeros(3, device=DEVICE)], absmax, **kw)
    with pytest.raises(ValueError, match="grad"):
        K.adam8bit_multi_tensor_step(p, [g[0].double()], codes, codes, absmax, absmax, **kw)
    with pytest.raises(ValueError, match="both be given"):
        K.adam8bit_multi_tensor_step(p, g, codes, codes, absmax, None, **kw)
    with pytest.raises(ValueError, match="power of two"):
        K.adam8bit_multi_tensor_step(p, g, codes, codes, absmax, absmax, block_size=100, **kw)
    with pytest.raises(TypeError, match="float32, bfloat16"):
        K.quantize_dynamic_blockwise(torch.zeros(10, dtype=torch.float64, device=DEVICE))


def _step_kwargs(s, decoupled=True, **extra):
    return dict(beta1=s.beta1, beta2=s.beta2, one_minus_beta1=s.one_minus_beta1,
                one_minus_beta2=s.one_minus_beta2, eps=s.eps, step_size=s.step_size,
                inv_bc2_sqrt=s.inv_bc2_sqrt, weight_decay=s.weight_decay, decay_factor=s.decay_factor,
                decoupled=decoupled, **extra)


@pytest.mark.parametrize("variant", sorted(K.VARIANTS))
def test_every_variant_equals_reference(variant):
    """Every tiling (blocks per program, warps, fix-up branch) gives the reference's bits; the states are
    such that some tiles hold lanes within the fix-up margin of a bin edge and others none."""
    gen = _gen(13)
    shapes = [(4 * 256,), (5 * 256 + 3,), (2 * 1024,)]
    params = [(torch.randn(s, generator=gen) * 0.1).to(DEVICE) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(DEVICE) for s in shapes]
    states = [_random_state(p, 256, gen, eight_bit=True) for p in params]
    s = adam_scalars(5, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    expected = [adam8bit_reference_step(p, g, *st, s, decoupled=True)
                for p, g, st in zip(params, grads, states)]
    K.adam8bit_multi_tensor_step(
        params, grads, [st[0] for st in states], [st[2] for st in states], [st[1] for st in states],
        [st[3] for st in states], **_step_kwargs(s, variant=variant),
    )
    for p, st, exp in zip(params, states, expected):
        assert torch.equal(p, exp[0])
        assert all(torch.equal(a, b) for a, b in zip(st, (exp[1], exp[2], exp[3], exp[4])))


def test_fix_up_margin_covers_formula_error():
    """The fix-up flags lanes whose rank formula lands within 2.5e-4 of an integer. The formula's error
    against the exact fp32 decision boundaries, measured over every boundary of both maps and the values 1-3
    float32 steps either side, stays well below that margin (the derivation in _nearest_dynamic's docstring
    gives < 1.2e-4)."""
    worst = 0.0
    for signed in (True, False):
        thr, coef = K._search_tables(signed)
        code = dynamic_map(signed)
        b = decision_boundaries(code)
        b = b[b > 0].double()
        a = b.float()
        e = ((a.view(torch.int32) >> 23) - 103).clamp(0, 24)
        k = 2 * e + (a > thr[e]).long()
        z = a.double() * coef[k].double() + coef[50 + k].double()
        interior = (a != thr[e]) & (coef[k] != 0)  # decade edges are settled by a == t, not by the formula
        worst = max(worst, float((z - z.round()).abs()[interior].max()))
    assert worst < 1.2e-4, worst


def test_launch_plan_is_cached_and_rebuilt_for_new_tensors():
    gen = _gen(14)
    p = [torch.randn(300, generator=gen).to(DEVICE)]
    g = [torch.randn(300, generator=gen).to(DEVICE) * 1e-2]
    st = _random_state(p[0], 256, gen, eight_bit=True)
    s = adam_scalars(1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    K._PLANS.clear()
    args = (p, g, [st[0]], [st[2]], [st[1]], [st[3]])
    K.adam8bit_multi_tensor_step(*args, **_step_kwargs(s))
    assert len(K._PLANS._plans) == 1
    K.adam8bit_multi_tensor_step(*args, **_step_kwargs(s))
    assert len(K._PLANS._plans) == 1  # same tensors: the plan is reused
    ref = adam8bit_reference_step(p[0], g[0].clone(), *st, s, decoupled=True)
    K.adam8bit_multi_tensor_step(p, [g[0].clone()], [st[0]], [st[2]], [st[1]], [st[3]], **_step_kwargs(s))
    assert len(K._PLANS._plans) == 2  # a gradient at another address: a new plan, the same bits
    assert torch.equal(p[0], ref[0])
    with pytest.raises(ValueError, match="unknown kernel variant"):
        K.adam8bit_multi_tensor_step(*args, **_step_kwargs(s, variant="nope"))
