"""lowbit.kernels.int4_linear against an inline fp64 reference of INT4 training's math (Xi et al. 2023).

The reference follows the paper's equations with lowbit.quant (HQ forward, bit splitting, leverage-score
weights) and the same codes / noise / sampling weights as the kernels, so every difference is rounding; each
bound below is derived from the roundings the kernels do (see lowbit.kernels.int4_linear).
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need Triton (lowbit[triton])")

import lowbit.kernels.hadamard_quant as hq  # noqa: E402
import lowbit.kernels.int4_linear as lin  # noqa: E402
from lowbit.quant import bit_split, hadamard_transform, quantize  # noqa: E402

CPU = pytest.param("cpu", id="cpu")
GPU = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
U32 = 2.0**-24
U16 = 2.0**-11  # fp16 unit roundoff
UBF = 2.0**-8  # bf16 unit roundoff


def _shape(device):
    return (64, 64, 48) if device == "cpu" else (16384, 4096, 4096)  # N tokens, K = D_in, M = D_out


def _problem(device, seed=0):
    n, k, m = _shape(device)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, k, generator=g) * torch.logspace(-1, 1, n)[:, None]).to(device, torch.bfloat16)
    w = (torch.randn(m, k, generator=g) / math.sqrt(k)).to(device)
    gy = (torch.randn(n, m, generator=g) * torch.logspace(-3, 1, n)[:, None]).to(device, torch.bfloat16)
    return x, w, gy


def _rot(t, block):
    return hadamard_transform(t, block) if block else t


def _rot_bound(e, block):
    """Bound on |E·|H|| per element for an elementwise error bound e (fp64): block sums / sqrt(b)."""
    if not block:
        return e
    r, c = e.shape
    s = e.reshape(r, c // block, block).sum(-1, keepdim=True) / math.sqrt(block)
    return s.expand(r, c // block, block).reshape(r, c)


def _check(got, ref, bound, what):
    err = (got.double() - ref).abs()
    excess = err - bound
    assert bool((excess <= 0).all()), (
        f"{what}: max error {err.max():.3e}, worst excess {excess.max():.3e}, "
        f"{int((excess > 0).sum())} of {err.numel()} over, {int(got.isnan().sum())} NaN")


def _halves(gy, noise_gen_seed, granularity="token"):
    """bit_split of ∇Y with a generator, and the same uniform draw for the kernel."""
    gen = torch.Generator(device=gy.device).manual_seed(noise_gen_seed)
    bs = bit_split(gy, gen, granularity=granularity)
    gen = torch.Generator(device=gy.device).manual_seed(noise_gen_seed)
    noise = torch.rand(gy.shape, generator=gen, device=gy.device)
    return bs, noise


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("block", [None, 32])
def test_forward_codes_and_product(device, granularity, block):
    x, w, _ = _problem(device)
    y, saved = lin.int4_linear_fwd(x, w, block_size=block, granularity=granularity)
    qx = quantize(_rot(x.float(), block), 4, granularity="token" if granularity == "row" else "tensor")
    qw = quantize(_rot(w, block), 4, granularity="channel" if granularity == "row" else "tensor")
    # The rotations may differ from the butterflies by an fp32 ulp where a block sum rounds, which moves a
    # scale by an ulp or flips a code at a .5 boundary (test_hadamard_quant bounds both); the product is
    # checked on the kernel's codes.
    torch.testing.assert_close(saved.x_scale, qx.scale, rtol=4 * U32, atol=0)
    pairs = ((saved.x_codes.float(), qx.codes.float()), (saved.w_codes_t.t().float(), qw.codes.float()))
    for got, want in pairs:
        assert float((got - want).abs().max()) <= 1 and float((got != want).float().mean()) <= 0.01
    w_codes = saved.w_codes_t.t()
    ref = (qx.codes.double() @ w_codes.double().t()) * qx.scale.double() * saved.w_scale.double().t()
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    _check(y, ref, (3 * U32 + UBF) * ref.abs(), "Y")
    bias = torch.randn(w.shape[0], device=device)
    yb, _ = lin.int4_linear_fwd(x, w, bias, block_size=block, granularity=granularity)
    _check(yb, ref + bias.double(), (3 * U32 + 2 * UBF) * (ref.abs() + bias.abs().double()), "Y + bias")


def _reference_backward(gy, saved, bs, weights, quantizer="bit_split", bs_x=None):
    """fp64 ∇X, ∇W on the kernel's saved codes, and the elementwise bounds of the kernels' roundings.

    ``bs_x``: with a per-channel weight scale, the split of ∇Y ⊙ s_wᵀ (same noise) that ∇X uses instead."""
    x_codes, x_scale, _, w_codes_t, w_scale, block = saved
    n, m = gy.shape
    x_hat = x_codes.double() * x_scale.double()  # (N, K)

    def dequant(q):
        if quantizer == "bit_split":
            return [(q.hi.double(), q.scale_hi.double()), (q.lo.double(), q.scale_lo.double())]
        return [(q.codes.double(), q.scale.double())]

    halves = dequant(bs)
    if w_scale.numel() == 1:
        w_hat = w_codes_t.t().double() * w_scale.double()  # (M, K)
        g_hat = sum(c * s for c, s in halves)
    else:  # folded: ∇X = Q(∇Y ⊙ s_wᵀ) · q_w
        w_hat = w_codes_t.t().double()
        g_hat = sum(c * s for c, s in dequant(bs_x))
    gvx = g_hat @ w_hat
    # ∇W: Σ_h (G_h ⊙ s_h ⊙ w_h)ᵀ · X̂, the kernel rounds each (factor · x code) to fp16
    a_abs = torch.zeros(m, x_codes.shape[1], dtype=torch.float64, device=gy.device)
    gvw = torch.zeros_like(a_abs)
    for h, (c, s) in enumerate(halves):
        wt = torch.ones(n, 1, dtype=torch.float64, device=gy.device) if weights is None else weights[h]
        gvw += (c * s * wt).t() @ x_hat
        a_abs += (c.abs() * s * wt).t() @ x_hat.abs()
    r = n * len(halves)
    # exact int products (also when folded), fp32 rotation from bf16 pieces with 16 bits
    ex = _rot_bound((2.0**-17 + (math.log2(block or 1) + 3) * U32) * (g_hat.abs() @ w_hat.abs()), block)
    ew = _rot_bound((U16 + r * U32) * a_abs, block)
    return _rot(gvx, block), _rot(gvw, block), ex, ew


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("grad_granularity", ["token", "tensor"])
@pytest.mark.parametrize("lss", [False, True])
def test_backward_bit_split_matches_reference(device, granularity, grad_granularity, lss):
    x, w, gy = _problem(device, seed=1)
    _, saved = lin.int4_linear_fwd(x, w, block_size=32, granularity=granularity)
    bs, noise = _halves(gy, 7, grad_granularity)
    weights = None
    if lss:  # Bernoulli weights 1/p or 0 for the 2N stacked halves
        g = torch.Generator().manual_seed(3)
        p = torch.rand(2, gy.shape[0], 1, generator=g) * 0.9 + 0.1
        keep = torch.rand(p.shape, generator=g) < p
        weights = torch.where(keep, 1 / p, torch.zeros_like(p)).to(device)
    gx, gw = lin.int4_linear_bwd(gy, saved, grad_granularity=grad_granularity, noise=noise,
                                 row_weights=weights, x_dtype=torch.float32, w_dtype=torch.float32)
    bs_x = None
    if granularity == "row":  # the per-channel weight scale is folded into ∇Y for ∇X (same noise)
        bs_x = bit_split(gy.float() * saved.w_scale.reshape(1, -1), granularity=grad_granularity, noise=noise)
    gx_ref, gw_ref, ex, ew = _reference_backward(gy, saved, bs, None if weights is None else weights.double(),
                                                 bs_x=bs_x)
    assert gx.shape == x.shape and gw.shape == w.shape
    _check(gx, gx_ref, ex + 4 * U32 * gx_ref.abs(), "grad_x")
    _check(gw, gw_ref, ew + 4 * U32 * gw_ref.abs(), "grad_w")
    gx_bf, _ = lin.int4_linear_bwd(gy, saved, grad_granularity=grad_granularity, noise=noise,
                                   row_weights=weights, need_grad_w=False)
    assert gx_bf.dtype == torch.bfloat16
    _check(gx_bf, gx_ref, ex + (4 * U32 + UBF) * (gx_ref.abs() + ex), "grad_x bf16")


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_backward_rtn_and_cublas_backend(device, backend):
    x, w, gy = _problem(device, seed=2)
    _, saved = lin.int4_linear_fwd(x, w, block_size=None)
    q = quantize(gy, 4, granularity="tensor")
    gx, gw = lin.int4_linear_bwd(gy, saved, grad_quantizer="rtn", grad_granularity="tensor",
                                 x_dtype=torch.float32, grad_x_backend=backend)
    gx_ref, gw_ref, ex, ew = _reference_backward(gy, saved, q, None, quantizer="rtn")
    _check(gx, gx_ref, ex + 4 * U32 * gx_ref.abs(), "grad_x")
    _check(gw, gw_ref, ew + 4 * U32 * gw_ref.abs(), "grad_w")


@pytest.mark.parametrize("device", [CPU, GPU])
def test_rotate_back_false_returns_the_unrotated_gradients(device):
    x, w, gy = _problem(device, seed=4)
    _, saved = lin.int4_linear_fwd(x, w, block_size=16)
    _, noise = _halves(gy, 9)
    gx, gw = lin.int4_linear_bwd(gy, saved, noise=noise, x_dtype=torch.float32)
    gvx, gvw = lin.int4_linear_bwd(gy, saved, noise=noise, rotate_back=False)
    assert gvx.dtype == torch.float32 and gvw.dtype == torch.float32
    back_x = hq.hadamard_rows(gvx, 16, out_dtype=torch.float32)
    back_w = hq.hadamard_rows(gvw, 16, out_dtype=torch.float32)
    tol_x = _rot_bound((2.0**-17 + 16 * U32) * gvx.double().abs(), 16)
    _check(back_x, gx.double(), tol_x + 4 * U32 * gx.double().abs(), "rotated back grad_x")
    _check(back_w, gw.double(), _rot_bound(8 * U32 * gvw.double().abs(), 16), "rotated back grad_w")


@pytest.mark.parametrize("device", [CPU, GPU])
def test_sampled_weight_gradient_is_unbiased(device):
    # In-kernel Philox noise and Bernoulli sampling: E[∇W] = (∇Y restricted to the hi/lo grid...) exactly the
    # unsampled product of ∇Y, since E[lo · s_lo | hi] = the residual and E[w | scores] = 1. Projected on a
    # fixed direction D, the mean of T draws is within 5 standard errors (t with T - 1 dof: P < 1e-3).
    n, k, m = (32, 32, 16) if device == "cpu" else (4096, 1024, 1024)
    x, w, gy = _problem(device, seed=5)
    x, w, gy = x[:n, :k].contiguous(), w[:m, :k].contiguous(), gy[:n, :m].contiguous()
    _, saved = lin.int4_linear_fwd(x, w, block_size=16)
    x_hat = saved.x_codes.double() * saved.x_scale.double()
    expected = _rot(gy.double().t() @ x_hat, 16)
    d = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d.to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    trials = 12 if device == "cpu" else 64
    proj, kept_any = [], False
    for _ in range(trials):
        _, gw = lin.int4_linear_bwd(gy, saved, lss_keep_ratio=0.5, generator=gen, need_grad_x=False)
        proj.append(float((gw.double() * d).sum()))
        kept_any = kept_any or gw.abs().sum() > 0
    proj = torch.tensor(proj, dtype=torch.float64)
    target = float((expected * d).sum())
    stderr = float(proj.std()) / math.sqrt(trials)
    # fp16 rounding of the scaled operand biases each draw by at most U16 · Σ|terms| (see above)
    bias = U16 * float((gy.double().abs().t() @ x_hat.abs()).abs().sum() * d.abs().max())
    assert kept_any and stderr > 0
    assert abs(float(proj.mean()) - target) <= 5 * stderr + bias


@pytest.mark.parametrize("device", [CPU, GPU])
def test_fp8_weight_gradient_is_unbiased(device):
    # grad_weight_fp8: power-of-two factors, drawn afresh each call; with given sampling weights the mean
    # over T calls estimates the exact (fp64) sampled product. Projected on D, 5 standard errors (t, T - 1).
    x, w, gy = _problem(device, seed=8)
    _, saved = lin.int4_linear_fwd(x, w, block_size=32)
    bs, noise = _halves(gy, 3)
    g = torch.Generator().manual_seed(4)
    p = torch.rand(2, gy.shape[0], 1, generator=g) * 0.9 + 0.1
    weights = torch.where(torch.rand(p.shape, generator=g) < p, 1 / p, torch.zeros_like(p)).to(device)
    _, gw_ref, _, _ = _reference_backward(gy, saved, bs, weights.double())
    d = torch.randn(gw_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    gen = torch.Generator(device=device).manual_seed(2)
    trials = 10 if device == "cpu" else 32
    proj = []
    for _ in range(trials):
        _, gw = lin.int4_linear_bwd(gy, saved, noise=noise, row_weights=weights, generator=gen,
                                    need_grad_x=False, grad_weight_fp8=True)
        proj.append(float((gw.double() * d).sum()))
    proj = torch.tensor(proj, dtype=torch.float64)
    stderr = float(proj.std()) / math.sqrt(trials)
    # fp32 accumulation and the rotation: a few u of Σ|terms|
    slack = 8 * gy.shape[0] * U32 * float((gw_ref.abs() * d.abs()).sum())
    assert stderr > 0
    assert abs(float(proj.mean()) - float((gw_ref * d).sum())) <= 5 * stderr + slack
    with pytest.raises(ValueError, match="grad_weight_fp8 needs"):
        lin.int4_linear_bwd(gy, saved, grad_weight_fp8=True)


@pytest.mark.parametrize("device", [CPU, GPU])
def test_autograd_function(device):
    x, w, gy = _problem(device, seed=6)
    b = torch.randn(w.shape[0], device=device)
    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    seed = torch.tensor([12345], device=device)
    y = lin.int4_linear_triton(xr.reshape(2, -1, x.shape[1]), wr, br, seed=seed)
    assert y.shape == (2, x.shape[0] // 2, w.shape[0]) and y.dtype == x.dtype
    y.backward(gy.reshape(y.shape))
    # The custom ops are the kernel-level pair: the backward samples into a static capacity (sync-free).
    y2, saved = lin.int4_linear_fwd(x, w, b, block_size=32)
    gx, gw = lin.int4_linear_bwd(gy, saved, lss_keep_ratio=0.5, seed=seed, sync_free=True, x_dtype=x.dtype,
                                 w_dtype=w.dtype)
    torch.testing.assert_close(y.reshape(y2.shape), y2, rtol=0, atol=0)
    torch.testing.assert_close(xr.grad, gx, rtol=0, atol=0)
    torch.testing.assert_close(wr.grad, gw, rtol=0, atol=0)
    torch.testing.assert_close(br.grad, gy.float().sum(0), rtol=0, atol=0)


@pytest.mark.parametrize("device", [CPU, GPU])
def test_sync_free_sampling_equals_the_synced_one(device):
    # The same seed keeps the same rows; the static capacity only appends zero rows to the ∇W product, so
    # the results agree up to the product's summation order (fp32, 4·U32 of the sum of |terms|).
    x, w, gy = _problem(device, seed=8)
    _, saved = lin.int4_linear_fwd(x, w, block_size=32, granularity="row")
    seed = torch.tensor([99], device=device)
    gx0, gw0 = lin.int4_linear_bwd(gy, saved, lss_keep_ratio=0.5, seed=seed, x_dtype=torch.float32)
    gx1, gw1 = lin.int4_linear_bwd(gy, saved, lss_keep_ratio=0.5, seed=seed, sync_free=True,
                                   x_dtype=torch.float32)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=0)
    bound = x.shape[0] * U32 * float(gw0.abs().max()) * 4
    torch.testing.assert_close(gw1, gw0, rtol=0, atol=bound)
    gx2, gw2 = lin.int4_linear_bwd(gy, saved, lss_keep_ratio=0.5, seed=seed + 1, sync_free=True,
                                   x_dtype=torch.float32)
    assert not torch.equal(gw2, gw1)  # another seed, other rows


def test_custom_ops_pass_opcheck():
    # Fake (meta) shapes and the autograd registration of lowbit::int4_linear_fwd (opcheck's test_schema
    # multiplies the outputs, which CPU torch cannot do for FP8).
    x, w, gy = _problem("cpu", seed=9)
    seed = torch.tensor([5])
    for args in [(x, w, None, seed, 32, "row", "bit_split", "token", 0.5, "auto", False, torch.float32),
                 (x, w, None, seed, 0, "tensor", "rtn", "tensor", 0.0, "auto", False, torch.float32)]:
        torch.library.opcheck(torch.ops.lowbit.int4_linear_fwd.default,
                              (args[0].clone().requires_grad_(True), args[1].clone().requires_grad_(True),
                               *args[2:]),
                              test_utils=("test_faketensor", "test_autograd_registration"))


def test_argument_errors():
    x, w, gy = _problem("cpu")
    with pytest.raises(ValueError, match="seed must be a one-element int64 tensor"):
        lin.int4_linear_triton(x, w, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="seed must be a one-element int64 tensor"):
        lin.int4_linear_triton(x, w, seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="share K"):
        lin.int4_linear_fwd(x, w[:, :32], block_size=None)
    with pytest.raises(ValueError, match="granularity"):
        lin.int4_linear_fwd(x, w, block_size=None, granularity="channel")
    _, saved = lin.int4_linear_fwd(x, w, block_size=None)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        lin.int4_linear_bwd(gy[:, :8], saved)
    with pytest.raises(ValueError, match="lss_keep_ratio"):
        lin.int4_linear_bwd(gy, saved, grad_quantizer="rtn", lss_keep_ratio=0.5)
    with pytest.raises(ValueError, match="grad_quantizer"):
        lin.int4_linear_bwd(gy, saved, grad_quantizer="sr")


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("block", [None, 32])
def test_backward_rtn_all_fp8(device, block):
    # Per-tensor scales everywhere and the transposed codes saved: ∇X and ∇W are exact integer products on
    # FP8 tensor cores times one fp32 scale; the only roundings are the scales (and the rotation back).
    x, w, gy = _problem(device, seed=10)
    _, saved = lin.int4_linear_fwd(x, w, block_size=block, granularity="tensor", save_x_codes_t=True,
                                   w_codes_t_dtype=torch.float8_e4m3fn)
    assert saved.x_codes_t is not None
    bad = saved.x_codes_t.t().float() != saved.x_codes.float()
    assert not bool(bad.any()), f"x_codes_t: {int(bad.sum())} of {bad.numel()} differ from x_codes.T"
    assert saved.w_codes_t.dtype == torch.float8_e4m3fn
    w_codes = hq.hadamard_quantize(w, block, granularity="tensor", codes_dtype=torch.int8).codes
    bad = saved.w_codes_t.t().float() != w_codes.float()
    assert not bool(bad.any()), f"w_codes_t: {int(bad.sum())} of {bad.numel()} differ from the int8 codes.T"
    q = quantize(gy, 4, granularity="tensor")
    gx, gw = lin.int4_linear_bwd(gy, saved, grad_quantizer="rtn", grad_granularity="tensor",
                                 x_dtype=torch.float32)
    gx_ref, gw_ref, ex, _ = _reference_backward(gy, saved, q, None, quantizer="rtn")
    _check(gx, gx_ref, ex + 4 * U32 * gx_ref.abs(), "grad_x")
    x_hat_abs = saved.x_codes.double().abs() * saved.x_scale.double()
    terms = (q.codes.double().abs() * q.scale.double()).t() @ x_hat_abs
    ew = _rot_bound((2.0**-17 + 8 * U32) * terms, block) if block else 4 * U32 * terms
    _check(gw, gw_ref, ew + 4 * U32 * gw_ref.abs(), "grad_w")


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_backward_fp8x2_grad_x_equals_int8(device, granularity):
    # The bit-split ∇X as two FP8 products (hi, lo) is the same exact integer as the int8 product of v.
    x, w, gy = _problem(device, seed=11)
    _, saved = lin.int4_linear_fwd(x, w, block_size=32, granularity=granularity)
    _, noise = _halves(gy, 5)
    gx8, _ = lin.int4_linear_bwd(gy, saved, noise=noise, need_grad_w=False, x_dtype=torch.float32)
    gx2, _ = lin.int4_linear_bwd(gy, saved, noise=noise, need_grad_w=False, x_dtype=torch.float32,
                                 grad_x_backend="fp8x2")
    bs, _ = _halves(gy, 5)
    bs_x = None  # row: the folded split (no FP8 halves of it: "fp8x2" runs the int8 product)
    if granularity == "row":
        bs_x = bit_split(gy.float() * saved.w_scale.reshape(1, -1), noise=noise)
    gx_ref, _, ex, _ = _reference_backward(gy, saved, bs, None, bs_x=bs_x)
    _check(gx2, gx_ref, ex + 4 * U32 * gx_ref.abs(), "grad_x fp8x2")
    _check(gx8, gx_ref, ex + 4 * U32 * gx_ref.abs(), "grad_x int8")


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("options", [("rtn", "triton"), ("bit_split", "fp8x2")])
def test_autograd_function_options(device, options):
    grad_quantizer, backend = options
    x, w, gy = _problem(device, seed=12)
    xr, wr = (t.detach().clone().requires_grad_(True) for t in (x, w))
    block = None if grad_quantizer == "rtn" else 32
    gran = "tensor" if grad_quantizer == "rtn" else "row"
    seed = torch.tensor([777], device=device)
    y = lin.int4_linear_triton(xr, wr, block_size=block, granularity=gran, grad_quantizer=grad_quantizer,
                               grad_granularity="tensor" if grad_quantizer == "rtn" else "token",
                               lss_keep_ratio=None, grad_x_backend=backend, seed=seed)
    y.backward(gy)
    rtn = grad_quantizer == "rtn"  # the Function saves what the all-FP8 backward needs
    wt_dtype = torch.float8_e4m3fn if rtn or backend == "fp8x2" else torch.int8
    _, saved = lin.int4_linear_fwd(x, w, block_size=block, granularity=gran, save_x_codes_t=rtn,
                                   w_codes_t_dtype=wt_dtype)
    if rtn:
        gx, gw = lin.int4_linear_bwd(gy, saved, grad_quantizer="rtn", grad_granularity="tensor",
                                     x_dtype=x.dtype, w_dtype=w.dtype)
        torch.testing.assert_close(xr.grad, gx, rtol=0, atol=0)
        torch.testing.assert_close(wr.grad, gw, rtol=0, atol=0)
    else:
        gx, gw = lin.int4_linear_bwd(gy, saved, seed=seed, x_dtype=x.dtype, w_dtype=w.dtype,
                                     grad_x_backend=backend)
        torch.testing.assert_close(xr.grad, gx, rtol=0, atol=0)
        torch.testing.assert_close(wr.grad, gw, rtol=0, atol=0)
