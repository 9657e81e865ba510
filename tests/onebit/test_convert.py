import copy

import pytest
import torch
import torch.nn as nn

from lowbit.models import GPT, GPTConfig
from lowbit.onebit import (
    OneBitLinear,
    apply_rtn_binarization,
    convert_to_onebit,
    onebit_layers,
    pack_onebit,
    select_linears,
    svid_error,
    unpack_onebit,
)

LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()


def test_convert_llama_replaces_exactly_the_seven_projections(make_tiny_llama):
    model = make_tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = convert_to_onebit(model)
    expected = {
        f"model.layers.{i}.{'self_attn' if p in LLAMA_PROJ[:4] else 'mlp'}.{p}"
        for i in range(2)
        for p in LLAMA_PROJ
    }
    assert set(report) == expected
    assert set(onebit_layers(model)) == expected
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    for name, p in model.named_parameters():  # embeddings, norms, head untouched
        if not any(name.startswith(e + ".") for e in expected):
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    for name, r in report.items():
        w = before[name + ".weight"]
        layer = model.get_submodule(name)
        assert (r.out_features, r.in_features) == tuple(w.shape)
        assert r.svid_error == pytest.approx(svid_error(w, layer.signs(), layer.g, layer.h), rel=1e-12)


def test_convert_gpt_replaces_the_four_block_linears():
    model = tiny_gpt()
    report = convert_to_onebit(model, "svd")
    assert set(report) == {
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    logits, _ = model(torch.randint(0, 50, (2, 8)))
    assert logits.shape == (2, 8, 50) and torch.isfinite(logits).all()


def test_without_layer_norm_the_model_computes_with_the_svid_weights():
    model = tiny_gpt()
    dense = copy.deepcopy(model)
    convert_to_onebit(model, layer_norm=False)
    with torch.no_grad():
        for name, layer in onebit_layers(model).items():
            dense.get_submodule(name).weight.copy_(layer.dense_weight())
    x = torch.randint(0, 50, (2, 16))
    # Same weights S ⊙ h gᵀ, associated differently (x ⊙ g first): agreement to fp32 round-off of O(1) logits.
    torch.testing.assert_close(model(x)[0], dense(x)[0], rtol=0, atol=1e-5)


def test_filter_fn_and_return_value(make_tiny_llama):
    model = make_tiny_llama()
    report = convert_to_onebit(model, module_filter_fn=lambda m, fqn: fqn.endswith("down_proj"))
    assert set(report) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert convert_to_onebit(model, module_filter_fn=lambda m, fqn: False) == {}


def test_selecting_a_tied_head_is_an_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="shares its weight"):
        select_linears(model, lambda m, fqn: fqn == "lm_head")


def test_pack_and_unpack_whole_model_keep_outputs(make_tiny_llama):
    model = make_tiny_llama()
    convert_to_onebit(model)
    x = torch.randint(0, 96, (2, 12))
    y = model(x).logits
    pack_onebit(model)
    assert all(m.is_packed for m in onebit_layers(model).values())
    torch.testing.assert_close(model(x).logits, y, rtol=0, atol=0)
    unpack_onebit(model)
    torch.testing.assert_close(model(x).logits, y, rtol=0, atol=0)


def test_rtn_baseline(make_tiny_llama):
    model = make_tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    errors = apply_rtn_binarization(model)
    assert len(errors) == 14
    w1 = model.model.layers[0].mlp.up_proj.weight
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)
    torch.testing.assert_close(w1, expected, rtol=0, atol=0)
    rel = float((w.double() - expected.double()).norm() / w.double().norm())
    assert errors["model.layers.0.mlp.up_proj"] == pytest.approx(rel, rel=1e-12)


def test_convert_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        convert_to_onebit(tiny_gpt(), "pca")
    with pytest.raises(TypeError, match="module_filter_fn"):
        convert_to_onebit(tiny_gpt(), module_filter_fn="q_proj")
    with pytest.raises(TypeError, match="nn.Module"):
        convert_to_onebit("model")


def test_converted_layer_types():
    model = tiny_gpt()
    convert_to_onebit(model)
    assert all(isinstance(m, OneBitLinear) for m in onebit_layers(model).values())
    assert len(onebit_layers(model)) == 8


def test_conversion_installs_inductors_read_back_barrier():
    triton_codegen = pytest.importorskip("torch._inductor.codegen.triton")
    from lowbit.kernels import inductor_fix

    if inductor_fix._fixed_upstream(triton_codegen.TritonKernel):
        pytest.skip("this torch guards the read-back itself")
    model = nn.Sequential(nn.ModuleList([nn.Linear(32, 32)]))
    assert convert_to_onebit(model)
    assert getattr(triton_codegen.TritonKernel.codegen_body, inductor_fix._MARK, False)
