"""Precision policy: which ops run in fp32 and which in the low dtype (module and dispatch hooks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.amp import (
    PRECISIONS,
    FP32Functions,
    apply_precision_policy,
    autocast_context,
    find_fp32_modules,
    make_grad_scaler,
    precision_dtype,
)
from lowbit.models import GPT, GPTConfig

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LOW = [("bf16", torch.bfloat16), ("fp16", torch.float16)]

# aten ops that must see fp32 floating inputs under the policy (softmax inside the SDPA math backend,
# cross-entropy's pieces, layer norm, embedding lookup)
FP32_ATEN = (
    "_softmax",
    "_safe_softmax",
    "_log_softmax",
    "nll_loss_forward",
    "native_layer_norm",
    "embedding",
)
MATMUL_ATEN = ("mm", "addmm")


class DtypeRecorder(TorchDispatchMode):
    """Records (aten op name, dtypes of its floating tensor inputs) after autocast has cast them."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [*args, *kwargs.values()]
        flat = [t for a in flat for t in (a if isinstance(a, (list, tuple)) else (a,))]
        dtypes = [t.dtype for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]
        self.calls.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **kwargs)

    def ops(self, names):
        return [(n, d) for n, d in self.calls if n in names]


def tiny_gpt(device, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=16)).to(device)


def record_module_dtypes(model):
    seen, handles = {}, []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, out, name=name):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            y = out if isinstance(out, torch.Tensor) else None
            seen[name] = (None if x is None else x.dtype, None if y is None else y.dtype)

        handles.append(module.register_forward_hook(hook))
    return seen, handles


def test_precision_names():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert [precision_dtype(p) for p in PRECISIONS] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_dtype("int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        apply_precision_policy(nn.Linear(2, 2), "half")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision,low", LOW)
def test_gpt_modules_fp32_islands_rest_low(device, precision, low):
    model = tiny_gpt(device)
    policy = apply_precision_policy(model, precision)
    islands = {n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.Embedding))}
    islands.add("lm_head")
    assert set(policy.fp32_module_names) == islands
    seen, _ = record_module_dtypes(model)
    x = torch.randint(0, 61, (2, 16), device=device)
    with policy.autocast(device):
        logits, loss = model(x, x)
    for name in islands:
        in_dtype, out_dtype = seen[name]
        assert out_dtype == torch.float32, name
        assert in_dtype in (torch.float32, torch.int64), name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(linears) == 8
    for name in linears:
        assert seen[name][1] == low, name
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision,low", LOW)
def test_gpt_dispatch_level_dtypes(device, precision, low):
    model = tiny_gpt(device)
    policy = apply_precision_policy(model, precision)
    x = torch.randint(0, 61, (2, 16), device=device)
    rec = DtypeRecorder()
    # the math backend is the SDPA path whose softmax is visible to a dispatch mode
    with policy.autocast(device), sdpa_kernel(SDPBackend.MATH), rec:
        _, loss = model(x, x)
    fp32_ops = rec.ops(FP32_ATEN)
    names = {n for n, _ in fp32_ops}
    assert {"native_layer_norm", "embedding", "nll_loss_forward"} <= names
    assert names & {"_softmax", "_safe_softmax"}  # the attention softmax
    for name, dtypes in fp32_ops:
        assert dtypes and all(d == torch.float32 for d in dtypes), (name, dtypes)
    matmuls = rec.ops(MATMUL_ATEN)
    low_mm = [d for _, d in matmuls if all(t == low for t in d)]
    fp32_mm = [d for _, d in matmuls if all(t == torch.float32 for t in d)]
    assert len(low_mm) == 8  # c_attn, c_proj, c_fc, c_proj in each of 2 blocks
    assert len(fp32_mm) == 1 and len(matmuls) == 9  # the head


@pytest.mark.parametrize("precision,low", LOW)
def test_fp32_functions_anywhere(precision, low):
    # CPU autocast leaves softmax and layer_norm of a low-precision tensor in that dtype; the policy's
    # function mode must not.
    x = torch.randn(4, 8, dtype=low)
    target = torch.randint(0, 8, (4,))
    with torch.autocast("cpu", dtype=low):
        assert F.softmax(x, -1).dtype == low  # the gap the policy closes
    with autocast_context(precision, "cpu"):
        outs = [
            F.softmax(x, -1),
            torch.softmax(x, -1),
            x.softmax(-1),
            x.log_softmax(-1),
            F.log_softmax(x, dim=-1),
            F.layer_norm(x, (8,)),
            F.layer_norm(x, (8,), weight=torch.ones(8, dtype=low)),
            F.rms_norm(x, (8,)),
            F.cross_entropy(x, target),
            F.nll_loss(F.log_softmax(x, -1), target),
        ]
        mm = x @ x.t()
    assert all(o.dtype == torch.float32 for o in outs)
    assert mm.dtype == low
    # values equal the fp32 computation on the upcast input (same math, same dtype)
    torch.testing.assert_close(outs[0], F.softmax(x.float(), -1), rtol=0, atol=0)
    torch.testing.assert_close(outs[8], F.cross_entropy(x.float(), target), rtol=0, atol=0)
    # without the function mode it is plain autocast
    with autocast_context(precision, "cpu", fp32_functions=False):
        assert F.softmax(x, -1).dtype == low
    with FP32Functions():
        assert F.softmax(x, -1).dtype == torch.float32


def test_fp32_policy_changes_nothing():
    model = tiny_gpt("cpu")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    policy = apply_precision_policy(model, "fp32")
    assert policy.fp32_module_names == ()
    x = torch.randint(0, 61, (2, 16))
    with policy.autocast("cpu"):
        logits, _ = model(x)
    assert logits.dtype == torch.float32
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


def test_low_precision_params_are_upcast_in_islands_only():
    model = tiny_gpt("cpu").to(torch.bfloat16)
    policy = apply_precision_policy(model, "bf16")
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives the cast
    assert model.transformer.wte.weight.dtype == torch.float32
    assert model.transformer.ln_f.weight.dtype == torch.float32
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    x = torch.randint(0, 61, (2, 16))
    with policy.autocast("cpu"):
        logits, loss = model(x, x)
    assert logits.dtype == torch.float32
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.dtype == torch.bfloat16


def test_apply_twice_does_not_stack_and_remove():
    model = tiny_gpt("cpu")
    first = apply_precision_policy(model, "bf16")
    second = apply_precision_policy(model, "bf16")
    assert second.fp32_module_names == ()
    assert len(model.transformer.ln_f._forward_pre_hooks) == 1
    first.remove()
    assert len(model.transformer.ln_f._forward_pre_hooks) == 0
    seen, _ = record_module_dtypes(model)
    with autocast_context("bf16", "cpu"):
        model(torch.randint(0, 61, (1, 8)))
    assert seen["lm_head"][1] == torch.bfloat16  # plain autocast again
    third = apply_precision_policy(model, "bf16")
    assert "lm_head" in third.fp32_module_names


def test_island_restores_autocast_after_exception():
    class Boom(nn.LayerNorm):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom(4))
    apply_precision_policy(model, "bf16")
    with autocast_context("bf16", "cpu"):
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 4))
        assert torch.is_autocast_enabled("cpu")  # the island's "autocast off" was undone
        assert model[0](torch.randn(2, 4)).dtype == torch.bfloat16


def test_hugging_face_llama_rmsnorm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    names = [n for n, _ in find_fp32_modules(model)]
    rms = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(rms) == 5 and set(rms) <= set(names)
    assert {"model.embed_tokens", "lm_head"} <= set(names)
    policy = apply_precision_policy(model, "bf16")
    seen, _ = record_module_dtypes(model)
    x = torch.randint(0, 64, (2, 12))
    with policy.autocast("cpu"):
        out = model(input_ids=x, labels=x)
    for name in names:
        assert seen[name][1] == torch.float32, name
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            assert seen[name][1] == torch.bfloat16, name
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32


@pytest.mark.parametrize("precision", PRECISIONS)
def test_make_grad_scaler_enabled_for_fp16_only(precision):
    scaler = make_grad_scaler(precision, "cpu")
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.is_enabled() == (precision == "fp16")


# ------------------------------------------------------------------------------------ fp16 + GradScaler


def train_steps(precision, steps, *, device="cpu", init_scale=2.0**16, guard=None):
    """The trainer's order with a GradScaler: scale(loss).backward, unscale_, clip, [guard], step, update."""
    model = tiny_gpt(device, seed=1)
    policy = apply_precision_policy(model, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = make_grad_scaler(precision, device, init_scale=init_scale)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 61, (4, 16), generator=g).to(device)
    losses, scales, params_before = [], [], []
    with_context = policy.autocast(device)
    for step in range(1, steps + 1):
        params_before.append([p.detach().clone() for p in model.parameters()])
        with with_context:
            _, loss = model(x, x)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        vote = None
        if guard is not None:
            vote = guard.before_optimizer_step(
                step=step, model=model, optimizer=opt, loss=loss.item(), grad_norm=grad_norm
            )
        if vote is not False:
            scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
    return model, losses, scales, params_before


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_with_grad_scaler_trains(device):
    steps = 40
    _, losses16, _, _ = train_steps("fp16", steps, device=device)
    _, losses32, _, _ = train_steps("fp32", steps, device=device)
    assert all(math.isfinite(v) for v in losses16)
    # memorizing one batch: fp32 more than halves the loss in 40 steps; fp16 must do the same and stay
    # within 5% of the fp32 trajectory's final loss (fp16 rounding, 2^-11 relative, does not compound
    # into more than that in 40 steps of a clipped optimizer)
    assert losses32[-1] < 0.5 * losses32[0]
    assert losses16[-1] < 0.5 * losses16[0]
    assert abs(losses16[-1] - losses32[-1]) <= 0.05 * losses32[-1]
    assert abs(losses16[0] - losses32[0]) <= 1e-2 * losses32[0]  # same start up to fp16 rounding


def test_fp16_overflow_skipped_by_scaler_not_by_guard():
    from lowbit.amp import SpikeGuard

    guard = SpikeGuard(min_history=1, window=10, count_grad_overflow=False)
    # a scale of 2^40 overflows fp16 gradients: the scaler must skip and halve until it fits
    model, losses, scales, before = train_steps("fp16", 30, init_scale=2.0**40, guard=guard)
    overflow_steps = [e.step for e in guard.events if e.kind == "grad_overflow"]
    assert overflow_steps and overflow_steps == list(range(1, len(overflow_steps) + 1))
    n = len(overflow_steps)
    assert scales[n - 1] == 2.0 ** (40 - n)  # halved once per overflow (backoff 0.5)
    for step in overflow_steps:  # parameters untouched by an overflowing step
        after = before[step] if step < len(before) else [p.detach() for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before[step - 1], after))
    assert guard.metrics()["spikes"] == 0
    assert losses[-1] < losses[n]  # and then it trains
