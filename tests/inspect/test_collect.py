"""Hooks and batch running of lowbit.inspect.collect."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lowbit.inspect import InspectSettings, capture_input, collect_stats, fake_quant, variant_key
from lowbit.models import GPT, GPTConfig


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=64, block_size=32))


def batches(n, b=2, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (b, t), generator=g) for _ in range(n)]


def test_every_linear_is_measured():
    model = tiny_gpt()
    collected = collect_stats(model, batches(2), InspectSettings(max_batches=2))
    names = [s.name for s in collected.layers]
    assert names == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert collected.batches == 2 and collected.tokens == 2 * 2 * 32
    for s in collected.layers:
        assert s.calls == 2 and s.tokens == 128
        assert s.is_head == (s.name == "lm_head")
        # a Hadamard block applies where it divides in_features (64: 32 only; 256: 32 and 128)
        blocks = [None] + [b for b in (32, 128) if s.in_features % b == 0]
        assert set(s.output_sqnr) == {variant_key(bits, b) for bits in (8, 4) for b in blocks}
        assert set(s.weight_sqnr) == set(s.input_sqnr) == set(s.output_sqnr)
    assert model.training  # mode restored


def test_batches_merge_like_one_batch():
    model = tiny_gpt()
    settings = InspectSettings(max_batches=4, max_tokens=10_000, max_out_features=10_000)
    parts = batches(3)
    a = collect_stats(model, parts, settings)
    b = collect_stats(model, [torch.cat(parts)], settings)
    for sa, sb in zip(a.layers, b.layers):
        assert torch.equal(sa.channel_absmax, sb.channel_absmax) and sa.input_absmax == sb.input_absmax
        for key in sa.output_sqnr:  # per-token scales: tokens are quantized independently
            assert sa.output_sqnr[key].noise == pytest.approx(sb.output_sqnr[key].noise, rel=1e-5)
            assert sa.output_sqnr[key].signal == pytest.approx(sb.output_sqnr[key].signal, rel=1e-5)
        assert sa.input_moments.kurtosis == pytest.approx(sb.input_moments.kurtosis, rel=1e-4)


def test_sqnr_of_one_layer_matches_direct_computation():
    model = tiny_gpt()
    settings = InspectSettings(max_batches=1, max_tokens=10_000, max_out_features=10_000)
    (x_tokens,) = batches(1)
    collected = collect_stats(model, [x_tokens], settings)
    layer = collected.layers[0]  # c_attn of block 0
    x = capture_input(model, layer.name, x_tokens)
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    y = x @ w.t()
    y4 = fake_quant(x, 4, "token") @ fake_quant(w, 4, "channel").t()
    noise = float(((y - y4) ** 2).sum())
    assert layer.output_sqnr[variant_key(4, None)].noise == pytest.approx(noise, rel=1e-5)
    ln = model.transformer.h[0].ln_1
    h = model.transformer.wte(x_tokens) + model.transformer.wpe(torch.arange(32))
    torch.testing.assert_close(x, ln(h).detach().reshape(-1, 64), rtol=0, atol=0)


def test_subsampling_bounds_work():
    model = tiny_gpt()
    settings = InspectSettings(max_batches=1, max_tokens=8, max_out_features=4)
    collected = collect_stats(model, batches(1), settings)
    head = collected.layers[-1]
    assert head.tokens == 64  # absmax and moments see every token
    assert head.input_moments.n == 64 * 64


def test_activation_stats():
    torch.manual_seed(0)
    lin = nn.Linear(8, 10)
    with torch.no_grad():
        lin.bias[:3] = -1e4  # three units that never fire
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(10, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Tanh())
    xs = [torch.randn(16, 8) * 3 for _ in range(2)]
    collected = collect_stats(model, xs, InspectSettings(max_batches=2))
    relu, sig, tanh = collected.activations
    assert (relu.kind, sig.kind, tanh.kind) == ("relu", "sigmoid", "tanh")
    with torch.no_grad():
        h = [model[1](model[0](x)) for x in xs]
        s_in = [model[2](v) for v in h]
        t_in = [model[4](model[3](v)) for v in s_in]
    alive = torch.stack([(v > 0).any(dim=0) for v in h]).any(dim=0)
    assert relu.dead_share == pytest.approx(1 - float(alive.float().mean()), abs=1e-12)
    assert relu.dead_share >= 0.3
    assert sig.saturated == sum(int((v.abs() > 6).sum()) for v in s_in) and sig.elements == 2 * 16 * 6
    assert tanh.saturated == sum(int((v.abs() > 3).sum()) for v in t_in)
    assert relu.saturated_share is None and sig.dead_share is None


def test_filter_errors_and_settings():
    model = tiny_gpt()
    only = collect_stats(model, batches(1), module_filter_fn=lambda m, n: n.endswith("c_fc"))
    assert [s.name for s in only.layers] == ["transformer.h.0.mlp.c_fc"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        collect_stats(model, batches(1), module_filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match="empty"):
        collect_stats(model, [])
    with pytest.raises(TypeError, match="input tensor"):
        collect_stats(model, ["text"])
    for bad in (
        dict(bits=(1,)),
        dict(blocks=(24,)),
        dict(max_tokens=0),
        dict(outlier_ratio=0),
        dict(act_granularity="group"),
    ):
        with pytest.raises(ValueError):
            InspectSettings(**bad)
    assert len(model.transformer.h[0].attn.c_attn._forward_pre_hooks) == 0  # hooks removed
