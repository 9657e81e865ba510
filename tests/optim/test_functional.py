"""The Adam update as pure functions (lowbit.optim.functional)."""

import math

import pytest
import torch

from lowbit.optim.functional import adam8bit_reference_step, adam_reference_step, adam_scalars, dynamic_maps
from lowbit.quant.codebook import dequantize_blockwise, quantize_blockwise

EPS32 = 2.0**-24  # unit roundoff of float32


def _is_f32(x: float) -> bool:
    return float(torch.tensor(x, dtype=torch.float32)) == x


def test_adam_scalars():
    s = adam_scalars(3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for name in s.__dataclass_fields__:
        assert _is_f32(getattr(s, name)), name
    assert s.step_size == pytest.approx(1e-3 / (1 - 0.9**3), rel=EPS32)
    assert s.inv_bc2_sqrt == pytest.approx(1 / math.sqrt(1 - 0.999**3), rel=EPS32)
    assert s.decay_factor == pytest.approx(1 - 1e-4, rel=EPS32)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            adam_scalars(bad, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("decoupled", [True, False])
def test_fp32_step_matches_torch(decoupled):
    """Three steps next to torch.optim.AdamW / Adam: the same math up to the rounding order (torch forms m by
    lerp, divides by sqrt(bc2)), so every state differs by a few float32 roundings of the TERMS that make it,
    carried through the recursion (plus, for Adam, the rounding of g + wd p):
    Bm_t = b1 * Bm_(t-1) + 8 eps (b1 |m_(t-1)| + (1 - b1) |g_t|), likewise Bv;
    the parameter by 8 eps (|p| + |update|) per step plus the update's sensitivity to m and v."""
    gen = torch.Generator().manual_seed(0)
    b1, b2, lr = 0.9, 0.99, 1e-2
    p0 = torch.randn(2000, generator=gen)
    grads = [torch.randn(2000, generator=gen) * 1e-2 for _ in range(3)]
    p_torch = p0.clone().requires_grad_(True)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([p_torch], lr=lr, betas=(b1, b2), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.clone(), torch.zeros(2000), torch.zeros(2000)
    bm, bv, bp = torch.zeros(2000), torch.zeros(2000), torch.zeros(2000)
    for t, g in enumerate(grads, start=1):
        p_torch.grad = g.clone()
        opt.step()
        s = adam_scalars(t, lr=lr, beta1=b1, beta2=b2, eps=1e-8, weight_decay=0.1)
        g_eff = g if decoupled else g + 0.1 * p
        bg = torch.zeros(2000) if decoupled else 2 * EPS32 * (g.abs() + 0.1 * p.abs())  # rounding of g + wd p
        bm = b1 * bm + 8 * EPS32 * (b1 * m.abs() + (1 - b1) * g_eff.abs()) + (1 - b1) * bg
        bv = b2 * bv + 8 * EPS32 * (b2 * v + (1 - b2) * g_eff**2) + (1 - b2) * 2 * g_eff.abs() * bg
        p_before = p.clone()
        p, m, v = adam_reference_step(p, g, m, v, s, decoupled=decoupled)
        # update u = m / sqrt(v): du = dm / sqrt(v) + u * dv / (2 v)
        sqrt_v = v.sqrt() * s.inv_bc2_sqrt + 1e-8
        du = s.step_size * (bm / sqrt_v + (m.abs() / sqrt_v) * bv / (2 * v))
        bp = bp + du + 8 * EPS32 * (p.abs() + (p - p_before).abs())
        assert bool(((m - opt.state[p_torch]["exp_avg"]).abs() <= bm).all())
        assert bool(((v - opt.state[p_torch]["exp_avg_sq"]).abs() <= bv).all())
        assert bool(((p - p_torch.detach()).abs() <= bp).all())


def test_reference_functions_are_pure():
    gen = torch.Generator().manual_seed(1)
    p, g = torch.randn(600, generator=gen), torch.randn(600, generator=gen)
    code_s, code_u = dynamic_maps()
    mc, ma = quantize_blockwise(torch.randn(600, generator=gen) * 1e-2, code_s)
    vc, va = quantize_blockwise(torch.rand(600, generator=gen) * 1e-4, code_u)
    inputs = [t.clone() for t in (p, g, mc, ma, vc, va)]
    s = adam_scalars(2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    adam8bit_reference_step(p, g, mc, ma, vc, va, s, decoupled=True)
    for before, after in zip(inputs, (p, g, mc, ma, vc, va)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [True, False])
def test_8bit_step_is_fp32_step_on_dequantized_state(dtype, decoupled):
    """The 8-bit step = the fp32 step started from the dequantized state (bit for bit: the parameter update
    uses the unrounded new moments), followed by block-wise quantization of the new moments. So the stored
    state is within the quantization bound of the fp32 state: |deq(m') - m'| <= absmax * half the local code
    gap (+ float32 rounding), the gap being at most 0.9 / 128 (signed) or 0.9 / 256 (unsigned) of absmax."""
    gen = torch.Generator().manual_seed(2)
    n = 3 * 256 + 17
    p = torch.randn(n, generator=gen).to(dtype)
    g = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    code_s, code_u = dynamic_maps()
    mc, ma = quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, code_s)
    vc, va = quantize_blockwise(torch.randn(n, generator=gen) ** 2 * 1e-4, code_u)
    s = adam_scalars(4, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    p8, mc2, ma2, vc2, va2 = adam8bit_reference_step(p, g, mc, ma, vc, va, s, decoupled=decoupled)
    m_deq = dequantize_blockwise(mc, ma, code_s, 256, (n,))
    v_deq = dequantize_blockwise(vc, va, code_u, 256, (n,))
    p32, m32, v32 = adam_reference_step(p, g, m_deq, v_deq, s, decoupled=decoupled)
    assert p8.dtype == dtype and torch.equal(p8, p32)
    assert torch.equal(ma2, torch.nn.functional.pad(m32, (0, 4 * 256 - n)).view(4, 256).abs().amax(1))
    cases = ((mc2, ma2, code_s, m32, 0.9 / 128), (vc2, va2, code_u, v32, 0.9 / 256))
    for codes, absmax, code, ref, gap in cases:
        deq = dequantize_blockwise(codes, absmax, code, 256, (n,))
        scale = absmax.repeat_interleave(256)[:n]
        assert bool(((deq - ref).abs() <= scale * (gap / 2 + 1 - 0.99296875 + 4 * EPS32)).all())
        # and the bytes are exactly quantize_blockwise of the fp32 moments
        assert torch.equal(codes, quantize_blockwise(ref, code)[0])


def test_reference_step_errors():
    s = adam_scalars(1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(TypeError, match="param"):
        z = torch.zeros(3)
        adam_reference_step(torch.zeros(3, dtype=torch.float64), z, z, z, s, decoupled=True)
    with pytest.raises(ValueError, match="grad"):
        adam_reference_step(torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3), s, decoupled=True)
    with pytest.raises(ValueError, match="exp_avg"):
        z = torch.zeros(3)
        adam_reference_step(z, z, torch.zeros(3, dtype=torch.float16), z, s, decoupled=True)
