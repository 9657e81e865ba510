"""lowbit.int4.function: the INT4 linear's math against an inline reference written from the paper's
equations (Xi et al. 2023), exact integer products, unbiased bit splitting + leverage-score sampling."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.int4 import (
    GradCodes,
    Int4Spec,
    Int4TrainingConfig,
    block_size_candidates,
    forward_product,
    hadamard_rotate,
    hq_quantize,
    input_grad_product,
    int4_linear,
    int_matmul,
    lsq_init_scale,
    lss_row_weights,
    quantize_grad_for_input,
    quantize_grad_output,
    select_block_size,
    weight_grad_product,
)
from lowbit.quant import hadamard_matrix, hadamard_transform, leverage_score_sample, quantize

U32 = 2.0**-24  # unit roundoff of fp32


def _bound(mag: torch.Tensor, n_terms: int) -> torch.Tensor:
    """First-order rounding bound of an fp32 computation against a float64 reference: γ_n · (|A|·|B|...) with
    n = the summed terms plus a fixed allowance of 10 roundings (scales, casts, the Hadamard butterfly)."""
    return (n_terms + 10) * U32 * mag + 1e-30


# ---------------------------------------------------------------------------------------------- reference


def _block_hadamard(k: int, b: int | None) -> torch.Tensor:
    if b is None:
        return torch.eye(k, dtype=torch.float64)
    return torch.block_diag(*[hadamard_matrix(b, dtype=torch.float64)] * (k // b))


def _paper_probabilities(c: torch.Tensor, k: float) -> torch.Tensor:
    """p_i = min(1, λ·c_i) with Σ p_i = k, by the iterated clamp-and-rescale of the paper's code."""
    p = c * k / c.sum()
    for _ in range(c.numel()):
        big = p >= 1
        if not bool((p > 1).any()):
            break
        p = torch.where(big, torch.ones_like(p), p)
        small = ~big
        p[small] = c[small] * (k - big.sum()) / c[small].sum()
    return p.clamp(max=1.0)


def reference(x, w, bias, spec: Int4Spec, grad_y, gen, s_x=None, s_w=None):
    """Forward and backward of one INT4 linear, straight from the paper's equations, products in float64.

    Returns (y, grad_x, grad_w, grad_b, grad_s_x, grad_s_w, magnitudes for the tolerances)."""
    n, k = x.shape
    hm = _block_hadamard(k, spec.block_size)
    vx, vw = x.double() @ hm, w.double() @ hm  # X·H, W·H
    rows = spec.granularity == "row"
    if spec.lsq:
        sx, sw = s_x.detach().double().reshape(1, 1), s_w.detach().double().reshape(1, 1)
    else:  # s = absmax / 7 (computed in fp32 as the quantizer does: the scale is part of the spec)
        sx = (vx.float().abs().amax(-1, keepdim=True) if rows else vx.float().abs().max().reshape(1, 1)) / 7
        sw = (vw.float().abs().amax(-1, keepdim=True) if rows else vw.float().abs().max().reshape(1, 1)) / 7
        sx, sw = sx.double(), sw.double()
    qx, qw = (vx / sx).round().clamp(-7, 7), (vw / sw).round().clamp(-7, 7)
    xh, wh = qx * sx, qw * sw  # X̂, Ŵ (in the rotated basis)
    y = xh @ wh.t() + (0 if bias is None else bias.double())

    # ∇Y -> INT4 halves: bit splitting (hi: round to nearest; lo: stochastic rounding of the residual, s_lo =
    # s_hi / 14), or plain round to nearest. Computed in fp32 with the same draws as the implementation.
    g = grad_y.float()
    per_token = spec.grad_granularity == "token"
    amax = g.abs().amax(-1, keepdim=True) if per_token else g.abs().max().reshape(1, 1)
    s_hi = amax / 7
    hi = (g / s_hi).round().clamp(-7, 7)
    if spec.grad_quantizer == "bit_split":
        s_lo = s_hi / 14
        u = torch.rand(g.shape, generator=gen, dtype=torch.float32)
        lo = torch.floor((g - hi * s_hi) / s_lo + u).clamp(-7, 7)
        halves = [hi.double() * s_hi.double(), lo.double() * s_lo.double()]
    else:
        halves = [hi.double() * s_hi.double()]

    if sw.numel() == 1:
        grad_vx = sum(h @ wh for h in halves)  # ∇(XH) = Q(∇Y)·Ŵ
        mag_vx = sum(h.abs() @ wh.abs() for h in halves)
    else:
        # per-channel s_w sits on the inner dimension: ∇(XH) = Q(∇Y ⊙ s_wᵀ)·q_w, the same quantizer and the
        # same draws u applied to ∇Y ⊙ s_wᵀ (an fp32 product, as the implementation forms it)
        g2 = g * sw.float().reshape(1, -1)
        s2_hi = (g2.abs().amax(-1, keepdim=True) if per_token else g2.abs().max().reshape(1, 1)) / 7
        hi2 = (g2 / s2_hi).round().clamp(-7, 7)
        halves_x = [hi2.double() * s2_hi.double()]
        if spec.grad_quantizer == "bit_split":
            s2_lo = s2_hi / 14
            lo2 = torch.floor((g2 - hi2 * s2_hi) / s2_lo + u).clamp(-7, 7)
            halves_x.append(lo2.double() * s2_lo.double())
        grad_vx = sum(h @ qw for h in halves_x)
        mag_vx = sum(h.abs() @ qw.abs() for h in halves_x)
    weights = [torch.ones(n, 1, dtype=torch.float64) for _ in halves]
    if spec.lss_keep_ratio is not None:  # sample the 2N stacked rows, p_i ∝ ‖half row‖·‖X̂ row‖
        c = torch.cat([h.norm(dim=1) * xh.norm(dim=1) for h in halves])
        p = _paper_probabilities(c, spec.lss_keep_ratio * c.numel())
        keep = torch.rand(c.shape, generator=gen, dtype=torch.float32).double() < p
        wgt = torch.where(keep, 1 / p.clamp(min=1e-300), torch.zeros_like(p))
        weights = [wgt[i * n : (i + 1) * n, None] for i in range(len(halves))]
    grad_vw = sum((h * wi).t() @ xh for h, wi in zip(halves, weights))  # ∇(WH) = Q(∇Y)ᵀ·X̂
    mag_vw = sum((h.abs() * wi).t() @ xh.abs() for h, wi in zip(halves, weights))

    gsx = gsw = None
    if spec.lsq:  # LSQ: clip mask on v / s, step-size gradient scaled by 1 / sqrt(numel · 7)

        def lsq(grad_hat, v, s):
            z = v / s
            inside = (z >= -7) & (z <= 7)
            dz = torch.where(inside, z.round() - z, torch.sign(z) * 7)
            return grad_hat * inside, (grad_hat * dz).sum() / math.sqrt(v.numel() * 7), dz.abs()

        grad_vx, gsx, dzx = lsq(grad_vx, vx, sx)
        grad_vw, gsw, dzw = lsq(grad_vw, vw, sw)
        mag_sx = (mag_vx * dzx).sum() / math.sqrt(vx.numel() * 7)
        mag_sw = (mag_vw * dzw).sum() / math.sqrt(vw.numel() * 7)
    grad_x, grad_w = grad_vx @ hm, grad_vw @ hm  # rotate back: H is symmetric and orthogonal
    grad_b = None if bias is None else g.double().sum(0)
    mags = {
        "y": xh.abs() @ wh.abs().t() + (0 if bias is None else bias.double().abs()),
        "x": mag_vx @ hm.abs(),
        "w": mag_vw @ hm.abs(),
        "b": g.double().abs().sum(0),
    }
    if spec.lsq:
        mags["sx"], mags["sw"] = mag_sx, mag_sw
    return y, grad_x, grad_w, grad_b, gsx, gsw, mags


CASES = [
    # (recipe, overrides, block)
    ("hq-lss", {}, 32),
    ("hq-lss", {"scale_mode": "lsq"}, 16),
    ("hq-lss", {"grad_granularity": "tensor"}, 32),
    ("hq-lss", {"granularity": "tensor"}, 32),
    ("hq", {}, 64),
    ("hq", {"granularity": "row"}, 16),
    ("hq", {"scale_mode": "lsq", "grad_granularity": "tensor"}, 32),
    ("rtn", {}, None),
    ("rtn", {"scale_mode": "lsq"}, None),
]


@pytest.mark.parametrize("recipe,overrides,block", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_paper_reference(recipe, overrides, block, with_bias):
    torch.manual_seed(0)
    n, k, m = 48, 64, 40
    x = torch.randn(n, k)
    x[:, 3] *= 20.0  # an outlier channel, as in transformer activations
    x[5] *= 0.01  # rows of very different size (per-token scales matter)
    w = torch.randn(m, k) * 0.1
    bias = torch.randn(m) if with_bias else None
    grad_y = torch.randn(n, m) * torch.logspace(-3, 0, n)[:, None]  # gradient rows differ by orders
    if block is not None:
        overrides = {**overrides, "block_size": block}
    cfg = Int4TrainingConfig.named(recipe, **overrides)
    spec = Int4Spec.from_config(cfg, cfg.block_size)
    s_x = s_w = None
    if spec.lsq:  # a quarter of LSQ's initial step, so that both clip sides occur
        s_x = (0.25 * lsq_init_scale(hadamard_transform(x, block) if block else x)).requires_grad_()
        s_w = (0.25 * lsq_init_scale(hadamard_transform(w, block) if block else w)).requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = None if bias is None else bias.clone().requires_grad_()
    y = int4_linear(
        xr, wr, br, spec=spec, input_scale=s_x, weight_scale=s_w, generator=torch.Generator().manual_seed(123)
    )
    y.backward(grad_y)

    ref = reference(x, w, bias, spec, grad_y, torch.Generator().manual_seed(123), s_x, s_w)
    y_ref, gx_ref, gw_ref, gb_ref, gsx_ref, gsw_ref, mags = ref
    assert y.dtype == torch.float32
    assert torch.all((y.double() - y_ref).abs() <= _bound(mags["y"], 0))  # the integer product is exact
    b = block or 0  # the rotation back is an fp32 product over b terms
    assert torch.all((xr.grad.double() - gx_ref).abs() <= _bound(mags["x"], b))
    assert torch.all((wr.grad.double() - gw_ref).abs() <= _bound(mags["w"], n + b))
    if with_bias:
        assert torch.all((br.grad.double() - gb_ref).abs() <= _bound(mags["b"], n))
    if spec.lsq:
        assert abs(float(s_x.grad) - float(gsx_ref)) <= float(_bound(mags["sx"], n * k))
        assert abs(float(s_w.grad) - float(gsw_ref)) <= float(_bound(mags["sw"], m * k))
        assert float(gsx_ref) != 0.0 and float(gsw_ref) != 0.0


def test_reference_rejects_a_different_rng_state():
    # The comparison above is sharp: another seed for the backward draws gives another weight gradient.
    torch.manual_seed(1)
    x, w, grad_y = torch.randn(32, 64), torch.randn(16, 64), torch.randn(32, 16)
    spec = Int4Spec.from_config(Int4TrainingConfig(), 32)
    wr = w.clone().requires_grad_()
    int4_linear(x, wr, spec=spec, generator=torch.Generator().manual_seed(1)).backward(grad_y)
    ref = reference(x, w, None, spec, grad_y, torch.Generator().manual_seed(2))
    assert not torch.all((wr.grad.double() - ref[2]).abs() <= _bound(ref[6]["w"], 32))


# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel"])
@pytest.mark.parametrize("block", [None, 8, 32])
def test_hq_quantize_is_quantize_after_hadamard(granularity, block):
    torch.manual_seed(0)
    x = torch.randn(24, 64, dtype=torch.bfloat16)
    codes, scale = hq_quantize(x, block, granularity=granularity)
    v = hadamard_rotate(x, block)
    if block is None:
        assert torch.equal(v, x.float())
    else:  # the rotation is quant's Hadamard transform, up to fp32 rounding of a b-term product
        v_ref = hadamard_transform(x.double(), block)
        assert torch.all(
            (v.double() - v_ref).abs()
            <= (block + 2) * U32 * x.double().abs() @ _block_hadamard(64, block).abs()
        )
    qt = quantize(v, 4, granularity=granularity)
    assert codes.dtype == torch.int8 and torch.equal(codes, qt.codes) and torch.equal(scale, qt.scale)
    assert int(codes.abs().max()) <= 7


def test_int_matmul_exact_to_the_fp32_limit_and_beyond():
    from lowbit.int4.function import _EXACT_FP32_K

    torch.manual_seed(0)
    a = torch.randint(-7, 8, (5, 300), dtype=torch.int8)
    b = torch.randint(-7, 8, (300, 6), dtype=torch.int8)
    assert torch.equal(int_matmul(a, b).long(), a.long() @ b.long())
    for k in (_EXACT_FP32_K, _EXACT_FP32_K + 1):  # all-7 rows: the largest possible sum, 49·K
        ones = torch.full((1, k), 7, dtype=torch.int8)
        out = int_matmul(ones, ones.t())
        assert int(out.item()) == 49 * k
    assert 49 * _EXACT_FP32_K <= 2**24 < 49 * (_EXACT_FP32_K + 1)


def test_forward_product_is_exact_integer_product_then_scales():
    torch.manual_seed(0)
    qx = torch.randint(-7, 8, (8, 96), dtype=torch.int8)
    qw = torch.randint(-7, 8, (5, 96), dtype=torch.int8)
    sx, sw = torch.rand(8, 1) + 0.1, torch.rand(5, 1) + 0.1
    exact = (qx.long() @ qw.long().t()).double()
    y = forward_product(qx, sx, qw, sw)
    assert torch.equal(y, (exact.float() * sx * sw.t()))


def test_lss_mask_keeps_the_rows_leverage_score_sample_keeps():
    torch.manual_seed(0)
    g, x = torch.randn(40, 12) * torch.rand(40, 1), torch.randn(40, 16)
    gq = quantize_grad_output(g, "bit_split", "token", torch.Generator().manual_seed(0))
    qx, sx = hq_quantize(x, 16)
    weights = lss_row_weights(gq, qx, sx, 0.5, torch.Generator().manual_seed(7))
    x_hat = qx.float() * sx
    from lowbit.quant import leverage_score_probabilities, leverage_scores

    scores = torch.cat([leverage_scores(gq.codes[h].float() * gq.scales[h], x_hat) for h in range(2)])
    kept, inv_p = leverage_score_sample(scores, 40.0, torch.Generator().manual_seed(7))
    flat = weights.reshape(-1)
    assert torch.equal(torch.nonzero(flat).squeeze(1), kept)
    # Scores from the codes (‖codes‖·s) and from dequantized rows (‖codes·s‖) differ by fp32 rounding only.
    assert torch.allclose(flat[kept], inv_p, rtol=64 * U32, atol=0)
    assert torch.allclose(leverage_score_probabilities(scores, 40.0).sum(), torch.tensor(40.0))


def test_block_size_candidates_and_auto_selection():
    assert block_size_candidates(48) == [2, 4, 8, 16]
    assert block_size_candidates(576) == [2, 4, 8, 16, 32, 64]
    assert block_size_candidates(7) == []
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    x[:, 5] *= 50.0  # one outlier channel: the larger the block, the more it is spread
    w = torch.randn(32, 128)
    chosen = select_block_size(x, w)
    errs = {}
    for b in block_size_candidates(128):
        qx, sx = hq_quantize(x, b)
        qw, sw = hq_quantize(w, b)
        errs[b] = float((forward_product(qx, sx, qw, sw) - x @ w.t()).norm())
    assert chosen == min(errs, key=lambda b: (errs[b], b))
    assert chosen >= 32  # an outlier needs a wide block
    with pytest.raises(ValueError, match="D_in=7 has no power-of-two block"):
        select_block_size(torch.randn(4, 7), torch.randn(3, 7))


# ---------------------------------------------------------------------------------------------- unbiasedness


def _mean_and_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = samples.shape[0]
    return samples.mean(0), samples.std(0) / math.sqrt(t)


Z = 5.0  # standard errors; per element a false alarm has probability ~6e-7 under normality


def test_lss_weight_product_is_unbiased():
    """E over the sampling of Σ_h (G_h ⊙ s_h ⊙ m_h/p_h)ᵀ X̂ equals the unsampled bit-split product."""
    torch.manual_seed(0)
    n, m, k, draws = 64, 6, 16, 2000
    g = torch.randn(n, m) * torch.logspace(-2, 0, n)[:, None]
    x = torch.randn(n, k)
    gq = quantize_grad_output(g, "bit_split", "token", torch.Generator().manual_seed(0))
    qx, sx = hq_quantize(x, 16)
    exact = weight_grad_product(gq, qx, sx).double()
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack(
        [weight_grad_product(gq, qx, sx, lss_row_weights(gq, qx, sx, 0.5, gen)) for _ in range(draws)]
    ).double()
    mean, se = _mean_and_se(samples)
    slack = 64 * U32 * exact.abs().max()  # fp32 rounding of each draw
    assert torch.all((mean - exact).abs() <= Z * se + slack)
    assert float(se.max()) > 0  # the sampling does drop rows
    kept = torch.stack([(lss_row_weights(gq, qx, sx, 0.5, gen) > 0).sum() for _ in range(500)]).double()
    assert abs(float(kept.mean()) - n) <= Z * float(kept.std()) / math.sqrt(500)  # keeps N of 2N rows


def test_bit_split_and_lss_unbiased_for_the_fp_gradient():
    """Over the stochastic rounding and the sampling together: E[∇V_w] = ∇Yᵀ·X̂ and E[∇V_x] = ∇Y·Ŵ."""
    torch.manual_seed(2)
    n, m, k, draws = 32, 8, 16, 2000
    g = torch.randn(n, m) * torch.logspace(-2, 0, n)[:, None]
    x, w = torch.randn(n, k), torch.randn(m, k)
    qx, sx = hq_quantize(x, 16)
    qw, sw = hq_quantize(w, 16)
    target_w = g.double().t() @ (qx.double() * sx.double())
    target_x = g.double() @ (qw.double() * sw.double())
    gen = torch.Generator().manual_seed(3)
    sw_samples, sx_samples = [], []
    for _ in range(draws):
        gq = quantize_grad_output(g, "bit_split", "token", gen)
        sw_samples.append(weight_grad_product(gq, qx, sx, lss_row_weights(gq, qx, sx, 0.5, gen)))
        sx_samples.append(input_grad_product(gq, qw, sw))
    for samples, target in (
        (torch.stack(sw_samples).double(), target_w),
        (torch.stack(sx_samples).double(), target_x),
    ):
        mean, se = _mean_and_se(samples)
        assert torch.all((mean - target).abs() <= Z * se + 64 * U32 * target.abs().max())


def test_folded_input_gradient_is_exact_integer_product_and_unbiased():
    """Per-channel weight scale: ∇V_x = Σ_h s'_h ⊙ (G'_h · q_w) with G' the bit split of ∇Y ⊙ s_wᵀ (same noise
    as the split of ∇Y): equal to the split computed directly, and E[∇V_x] = ∇Y · (s_w ⊙ q_w)."""
    torch.manual_seed(4)
    n, m, k, draws = 24, 8, 16, 2000
    g = torch.randn(n, m) * torch.logspace(-2, 0, n)[:, None]
    w = torch.randn(m, k) * torch.logspace(-1, 0, m)[:, None]
    qw, sw = hq_quantize(w, 16, granularity="token")  # one scale per row of W: per output channel
    assert sw.shape == (m, 1)
    noise = torch.rand(n, m, generator=torch.Generator().manual_seed(5))
    gq = quantize_grad_output(g, "bit_split", "token", noise=noise)
    gq_x, s_left = quantize_grad_for_input(g, gq, sw, "bit_split", "token", noise)
    assert float(s_left) == 1.0
    direct = quantize_grad_output(g * sw.reshape(1, -1), "bit_split", "token", noise=noise)
    assert torch.equal(gq_x.codes, direct.codes) and torch.equal(gq_x.scales, direct.scales)
    one = sw[:1]
    same, s_same = quantize_grad_for_input(g, gq, one, "bit_split", "token", noise)
    assert same is gq and s_same is one  # per-tensor: nothing folded
    # exact integer products: only the scale multiplications and the sum of the halves round (3 roundings)
    prod = input_grad_product(gq_x, qw, s_left).double()
    terms = [gq_x.scales[h].double() * (gq_x.codes[h].double() @ qw.double()) for h in range(2)]
    assert torch.all((prod - terms[0] - terms[1]).abs() <= 3 * U32 * (terms[0].abs() + terms[1].abs()))
    target = g.double() @ (qw.double() * sw.double())
    gen = torch.Generator().manual_seed(6)
    samples = []
    for _ in range(draws):
        u = torch.rand(n, m, generator=gen)
        gq_d = quantize_grad_output(g, "bit_split", "token", noise=u)
        gx, s1 = quantize_grad_for_input(g, gq_d, sw, "bit_split", "token", u)
        samples.append(input_grad_product(gx, qw, s1))
    mean, se = _mean_and_se(torch.stack(samples).double())
    assert torch.all((mean - target).abs() <= Z * se + 64 * U32 * target.abs().max())
    assert float(se.max()) > 0


def test_rtn_gradient_is_biased_for_small_rows():
    # Contrast: per-tensor round to nearest rounds the small rows of ∇Y to zero, which no averaging undoes.
    g = torch.tensor([[1.0, -0.5], [0.01, 0.02]])
    gq = quantize_grad_output(g, "rtn", "tensor")
    assert isinstance(gq, GradCodes) and gq.codes.shape == (1, 2, 2)
    assert torch.equal(gq.dequantize()[1], torch.zeros(2))


# ---------------------------------------------------------------------------------------------- input checks


def test_functional_input_checks():
    spec = Int4Spec(block_size=32)
    w = torch.randn(8, 64)
    with pytest.raises(TypeError, match="floating-point"):
        int4_linear(torch.ones(2, 64, dtype=torch.long), w, spec=spec)
    with pytest.raises(ValueError, match="must equal D_in = 64"):
        int4_linear(torch.randn(2, 32), w, spec=spec)
    with pytest.raises(ValueError, match="not a multiple of the Hadamard block 32"):
        int4_linear(torch.randn(2, 48), torch.randn(8, 48), spec=spec)
    with pytest.raises(ValueError, match="needs input_scale and weight_scale"):
        int4_linear(torch.randn(2, 64), w, spec=Int4Spec(block_size=32, lsq=True))
    with pytest.raises(ValueError, match="method must be"):
        quantize_grad_output(torch.randn(2, 2), "fp8")


@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 5, 64), (0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_leading_shapes_and_dtypes(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 64, requires_grad=True)
    spec = Int4Spec.from_config(Int4TrainingConfig(), 32)
    y = int4_linear(x, w, spec=spec, generator=torch.Generator().manual_seed(0))
    assert y.shape == (*shape[:-1], 8) and y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype and w.grad.dtype == torch.float32
    # The codes are computed in fp32 from the input's values: same result as the fp32 input, rounded.
    y32 = int4_linear(x.detach().float(), w, spec=spec)
    assert torch.equal(y, y32.to(dtype))
