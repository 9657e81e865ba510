"""lowbit bench onebit: the CPU side of the suite (options, the decode models' shapes and the result layout).
The timings need CUDA: the decode run itself is the ``gpu`` test at the end."""

from __future__ import annotations

import argparse

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


def _fake_rate(model, tokens, graph):
    return (200.0 if graph else 20.0) / (1 + isinstance(model.proj, torch.nn.Linear)), list(range(8))


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
    with pytest.raises(ValueError, match="unknown decode model"):
        bo.decode_benchmark(16, 32, 0, torch.device("cpu"), model="nope")


def _decode_result(label):
    rate = {"graph_tokens_per_s": 100.0, "eager_tokens_per_s": 10.0}
    return {"model": f"{label} shape (random weights)", "tokens": 200, "bf16": rate, "onebit": rate,
            "graph_speedup": 1.0, "eager_speedup": 1.0}


def test_result_layout_and_table(monkeypatch):
    """smollm2-135m keeps its keys at the top of result["decode"] (read by docs and scripts), the other models
    go under result["decode"]["models"], and the table prints a decode line for each."""
    calls = []

    def fake(tokens, context, seed, device, model="smollm2-135m"):
        calls.append(model)
        return _decode_result(bo.DECODE_MODELS[model][0])

    monkeypatch.setattr(bo, "decode_benchmark", fake)
    result, saved = {}, []
    bo.run_decode(result, ["smollm2-135m", "smollm2-1.7b"], 200, 256, 0, torch.device("cpu"),
                  on_model=lambda: saved.append(1))
    assert calls == ["smollm2-135m", "smollm2-1.7b"] and len(saved) == 2
    assert result["decode"]["model"] == "SmolLM2-135M shape (random weights)"
    assert result["decode"]["graph_speedup"] == 1.0
    assert result["decode"]["models"]["smollm2-1.7b"]["model"] == "SmolLM2-1.7B shape (random weights)"
    table = bo.format_table(result)
    assert "decode (SmolLM2-135M shape" in table and "decode (SmolLM2-1.7B shape" in table

    # 1.7B alone; and a model that fails is recorded without stopping the others
    def failing(tokens, context, seed, device, model="smollm2-135m"):
        if model == "smollm2-135m":
            raise RuntimeError("boom")
        return _decode_result("SmolLM2-1.7B")

    monkeypatch.setattr(bo, "decode_benchmark", failing)
    result = {}
    bo.run_decode(result, ["smollm2-135m", "smollm2-1.7b"], 200, 256, 0, torch.device("cpu"))
    assert result["decode_error"] == "RuntimeError: boom" and "model" not in result["decode"]
    table = bo.format_table(result)
    assert "decode error (SmolLM2-135M): RuntimeError: boom" in table and "SmolLM2-1.7B shape" in table


@pytest.mark.gpu
def test_gpu_decode_1_7b_graph_matches_eager():
    """The 1.7B decoder (bf16 3.2 GB; OneBit gate/up rows of 8192 take the chunked fused-LN path) for a few
    tokens: graph replay gives the eager tokens for every model kind."""
    r = bo.decode_benchmark(4, 8, 0, torch.device("cuda"), model="smollm2-1.7b")
    for kind in ("bf16", "onebit", "onebit_module"):
        assert "error" not in r[kind], r[kind]
        assert r[kind]["graph_matches_eager"], (kind, r[kind]["first_tokens"])
    assert r["onebit"]["projection_weight_bytes"] * 8 < r["bf16"]["projection_weight_bytes"]
