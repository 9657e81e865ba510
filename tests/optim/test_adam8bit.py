"""lowbit.optim.AdamW8bit / Adam8bit: training against torch's 32-bit Adam, state, checkpoints, options."""

import io
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the backend="triton" tests run in the interpreter

from lowbit.optim import Adam8bit, AdamW8bit, state_nbytes  # noqa: E402
from lowbit.optim.functional import adam8bit_reference_step, adam_scalars, dynamic_maps  # noqa: E402
from lowbit.quant.codebook import dequantize_blockwise  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def _problem(seed=0, n_in=64, n_out=96, n=512):
    """Least squares: a linear layer (6144 weights: 8-bit state; 96 biases: fp32 state) fitting a teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=gen)
    w_true = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    y = x @ w_true.t() + 0.01 * torch.randn(n, n_out, generator=gen)
    model = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        model.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.02)
        model.bias.zero_()
    return model, x, y


def _train(model, opt, x, y, steps, scheduler=None):
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("ours_cls, torch_cls",
                         [(AdamW8bit, torch.optim.AdamW), (Adam8bit, torch.optim.Adam)])
def test_trains_like_torch_adam(ours_cls, torch_cls):
    """150 steps next to torch's 32-bit optimizer on the same problem.

    Bound: a step stores m and v with an error of at most absmax * (half a code gap) <= 0.0035 * absmax
    (signed map, top decade) — fresh each step and decaying with beta, so the stored moments stay within
    0.0035 / (1 - beta) of a block's absmax, i.e. a few percent of the update of the block's largest elements.
    The trajectories may therefore drift apart by a few percent of the distance travelled, not more: we
    require ||p8 - p32|| <= 0.1 ||p32 - p0|| and final losses within 2%."""
    model8, x, y = _problem()
    model32, _, _ = _problem()
    p0 = model8.weight.detach().clone()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt8 = ours_cls(model8.parameters(), backend="torch", **kw)
    opt32 = torch_cls(model32.parameters(), **kw)
    l8 = _train(model8, opt8, x, y, 150)
    l32 = _train(model32, opt32, x, y, 150)
    assert "exp_avg_codes" in opt8.state[model8.weight] and "exp_avg" in opt8.state[model8.bias]
    assert l32[-1] < 0.2 * l32[0]  # the problem is being solved (Adam's L2 term slows it down)
    drift = (model8.weight - model32.weight).norm() / (model32.weight - p0).norm()
    assert drift <= 0.1, float(drift)
    assert abs(l8[-1] - l32[-1]) <= 0.02 * l32[-1] + 1e-4


def test_fp32_state_path_matches_torch_closely():
    """With min_8bit_size above every tensor, all state is fp32 and only rounding order differs from torch."""
    model_a, x, y = _problem(1)
    model_b, _, _ = _problem(1)
    opt_a = AdamW8bit(model_a.parameters(), lr=1e-2, min_8bit_size=10**9, backend="torch")
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    _train(model_a, opt_a, x, y, 100)
    _train(model_b, opt_b, x, y, 100)
    assert "exp_avg" in opt_a.state[model_a.weight]
    torch.testing.assert_close(model_a.weight, model_b.weight, rtol=1e-4, atol=1e-5)


def test_state_layout_and_memory():
    big = torch.nn.Parameter(torch.randn(100, 50))  # 5000 >= 4096: 8-bit
    small = torch.nn.Parameter(torch.randn(4095))  # fp32 state
    opt = AdamW8bit([big, small], backend="torch")
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    st = opt.state[big]
    assert st["step"] == 1
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_codes"].shape == (5000,)
    assert st["exp_avg_absmax"].dtype == torch.float32 and st["exp_avg_absmax"].shape == (20,)
    assert st["exp_avg_sq_codes"].shape == (5000,) and st["exp_avg_sq_absmax"].shape == (20,)
    assert opt.state[small]["exp_avg"].shape == (4095,) and opt.state[small]["exp_avg"].dtype == torch.float32
    assert state_nbytes(opt) == 2 * 5000 + 2 * 20 * 4 + 2 * 4095 * 4


def test_state_is_the_functional_reference():
    """One optimizer step = adam8bit_reference_step on the same state (the class is a thin wrapper)."""
    p = torch.nn.Parameter(torch.randn(3 * 256 + 17))
    opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1, min_8bit_size=0, backend="torch")
    for t in range(1, 4):
        p.grad = torch.randn_like(p) * 1e-2
        st = opt.state[p]
        before = [st[k].clone() for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                          "exp_avg_sq_absmax")] if st else None
        p_before = p.detach().clone()
        opt.step()
        if before is None:
            continue
        s = adam_scalars(t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        exp = adam8bit_reference_step(p_before, p.grad, *before, s, decoupled=True)
        assert torch.equal(p.detach(), exp[0])
        assert torch.equal(opt.state[p]["exp_avg_codes"], exp[1])


def test_param_groups_and_scheduler():
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(torch.randn(5000))
    groups = [{"params": [a], "lr": 0.0}, {"params": [b], "weight_decay": 0.5}]
    opt = AdamW8bit(groups, lr=1e-2, backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    a0, b0 = a.detach().clone(), b.detach().clone()
    lrs = []
    for _ in range(3):
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert torch.equal(a, a0)  # lr 0: no update, no decay
    assert lrs == [1e-2, 5e-3, 2.5e-3]
    # constant gradient 1: every Adam update is -lr (to rounding), and decay (1 - lr * 0.5) each step
    expected = b0.clone()
    for lr in lrs:
        expected = expected * (1 - lr * 0.5) - lr
    torch.testing.assert_close(b.detach(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(dtype):
    model, x, y = _problem(2)
    model = model.to(dtype)
    opt = AdamW8bit(model.parameters(), lr=1e-2, backend="torch")
    losses = _train(model, opt, x.to(dtype), y.to(dtype), 60)
    assert model.weight.dtype == dtype and opt.state[model.weight]["exp_avg_absmax"].dtype == torch.float32
    assert losses[-1] < 0.2 * losses[0]


def test_closure_and_missing_grads():
    p = torch.nn.Parameter(torch.randn(10))
    q = torch.nn.Parameter(torch.randn(10))
    opt = Adam8bit([p, q], backend="torch")

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    q0 = q.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and torch.equal(q, q0) and q not in opt.state


@pytest.mark.parametrize("option, value", [("amsgrad", True), ("maximize", True), ("foreach", True),
                                           ("fused", True), ("capturable", True), ("differentiable", True)])
def test_unsupported_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **{option: value})


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(block_size=100), "block_size"),
    (dict(min_8bit_size=-1), "min_8bit_size"), (dict(backend="cuda"), "backend"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_params_and_grads():
    with pytest.raises(TypeError, match="float32, bfloat16"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdamW8bit([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_and_exact_resume():
    """10 steps straight = 5 steps, checkpoint (through torch.save / torch.load), fresh objects, 5 steps."""
    model, x, y = _problem(3)
    ref_model, _, _ = _problem(3)
    ref_opt = AdamW8bit(ref_model.parameters(), lr=1e-2, backend="torch")
    _train(ref_model, ref_opt, x, y, 10)

    opt = AdamW8bit(model.parameters(), lr=1e-2, backend="torch")
    _train(model, opt, x, y, 5)
    ckpt = _save_load({"model": model.state_dict(), "opt": opt.state_dict()})
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            assert (torch.equal(v, ckpt["opt"]["state"][pid][k]) if isinstance(v, torch.Tensor)
                    else v == ckpt["opt"]["state"][pid][k])

    model2, _, _ = _problem(99)
    model2.load_state_dict(ckpt["model"])
    opt2 = AdamW8bit(model2.parameters(), lr=0.5, backend="torch")  # hyper-parameters: from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    _train(model2, opt2, x, y, 5)
    assert torch.equal(model2.weight, ref_model.weight) and torch.equal(model2.bias, ref_model.bias)


def test_load_keeps_state_dtypes_for_bf16_params():
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    small = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = AdamW8bit([p, small], backend="torch")
    p.grad, small.grad = torch.randn_like(p), torch.randn_like(small)
    opt.step()
    opt2 = AdamW8bit([p, small], backend="torch")
    opt2.load_state_dict(_save_load(opt.state_dict()))
    assert opt2.state[p]["exp_avg_absmax"].dtype == torch.float32  # torch's default load would cast to bf16
    assert opt2.state[small]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[small]["exp_avg"], opt.state[small]["exp_avg"])


def test_load_rejects_mismatched_state():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p], backend="torch")
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["block_size"] = 64  # the codes were made with blocks of 256
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        AdamW8bit([p], backend="torch").load_state_dict(sd)


def test_dequantized_state_tracks_fp32_state():
    """The 8-bit moments, dequantized, follow the moments of the same run kept in fp32 (the fp32 state is
    updated with the same gradients from the same starting point): the per-step quantization error is at most
    half a code gap (<= 0.0035 of the block absmax for m, <= 0.0018 for v) and decays with beta, so the
    accumulated error is at most that / (1 - beta) of the absmax."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(4096))
    opt = AdamW8bit([p], lr=1e-3, backend="torch")
    m32, v32 = torch.zeros(4096), torch.zeros(4096)
    code_s, code_u = dynamic_maps()
    for _ in range(30):
        g = torch.randn(4096, generator=gen) * 1e-2
        p.grad = g.clone()
        opt.step()
        m32 = 0.9 * m32 + 0.1 * g
        v32 = 0.999 * v32 + 0.001 * g * g
    st = opt.state[p]
    m8 = dequantize_blockwise(st["exp_avg_codes"], st["exp_avg_absmax"], code_s, 256, (4096,))
    v8 = dequantize_blockwise(st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"], code_u, 256, (4096,))
    scale_m = st["exp_avg_absmax"].repeat_interleave(256)
    scale_v = st["exp_avg_sq_absmax"].repeat_interleave(256)
    assert bool(((m8 - m32).abs() <= 0.0035 / (1 - 0.9) * scale_m).all())
    assert bool(((v8 - v32).abs() <= 0.0018 / (1 - 0.999) * scale_v).all())
    # On average: a step's error is about uniform over +-half a gap (gap <= 0.9/64 of absmax in the top
    # decade), RMS gap / (2 sqrt 3); accumulated with factor beta per step, RMS / sqrt(1 - beta^2): 0.0093.
    # 1.5x that as the statistical margin.
    assert float((m8 - m32).abs().mean()) <= 1.5 * 0.0093 * float(scale_m.mean())


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("cls", [AdamW8bit, Adam8bit])
def test_triton_backend_equals_torch_backend(cls):
    """The fused kernel path (interpreter on CPU) gives the same bits as the torch path through the class,
    with 8-bit and fp32 state, several steps, two groups."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(3 * 256 + 17, device=device))
        b = torch.nn.Parameter(torch.randn(40, device=device))
        opt = cls([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2,
                  min_8bit_size=256, backend=backend)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            w.grad = (torch.randn(w.shape, generator=gen) * 1e-2).to(device)
            b.grad = (torch.randn(b.shape, generator=gen) * 1e-2).to(device)
            opt.step()
        state = {k: v.clone() for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
        params[backend] = (w.detach().clone(), b.detach().clone(), state)
    assert torch.equal(params["torch"][0], params["triton"][0])
    assert torch.equal(params["torch"][1], params["triton"][1])
    for k, v in params["torch"][2].items():
        assert torch.equal(v, params["triton"][2][k]), k


def test_against_bitsandbytes():
    """Peer check: bitsandbytes' AdamW8bit (same map, blocks of 256) on the same problem ends near ours."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' 8-bit optimizers need CUDA here")
    model_a, x, y = _problem(4)
    model_b, _, _ = _problem(4)
    model_a, model_b, x, y = model_a.cuda(), model_b.cuda(), x.cuda(), y.cuda()
    ours = AdamW8bit(model_a.parameters(), lr=1e-2)
    theirs = bnb.optim.AdamW8bit(model_b.parameters(), lr=1e-2, min_8bit_size=4096)
    la = _train(model_a, ours, x, y, 100)
    lb = _train(model_b, theirs, x, y, 100)
    assert abs(la[-1] - lb[-1]) <= 0.05 * lb[-1] + 1e-4
