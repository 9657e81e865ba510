"""Ranking, recommendations, figures and JSON of lowbit.inspect, on a small GPT with an injected outlier."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lowbit.inspect import InspectSettings, SqnrSum, build_report, inspect_model
from lowbit.inspect.collect import Collected, LinearStats
from lowbit.models import GPT, GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTLIER = 17
SCALE = 20.0


def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=128, block_size=64))


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 65, (4, 64), generator=g) for _ in range(2)]


def inject_outlier(model):
    """Input channel 17 of block 1's c_attn becomes 20x larger, the matching weight column 20x smaller: the
    model computes the same function (as in LLMs, where outlier features are real and harmless in fp)."""
    with torch.no_grad():
        model.transformer.h[1].ln_1.weight[OUTLIER] *= SCALE
        model.transformer.h[1].attn.c_attn.weight[:, OUTLIER] /= SCALE


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    model = small_gpt()
    x = batches()[0]
    logits_before = model(x)[0].detach()
    inject_outlier(model)
    torch.testing.assert_close(model(x)[0].detach(), logits_before, rtol=1e-4, atol=1e-5)  # same function
    report = inspect_model(model, batches(), out_dir=out, model_name="gpt-test")
    return report, out


def test_outlier_layer_ranked_first_and_rotation_helps(outlier_run):
    report, _ = outlier_run
    worst = report.worst
    assert worst.name == "transformer.h.1.attn.c_attn" and worst.rank == 1
    assert worst.outlier_channels == 1 and worst.outlier_share == pytest.approx(1 / 128)
    assert "outlier_channels" in worst.problems and "low_int4_sqnr" in worst.problems
    # Without rotation the per-token INT4 step is set by the outlier (about 20x the other channels' absmax),
    # so the other 127 channels round to 0 or one step. A 128-block rotation spreads the outlier: the step
    # then follows the token's whole energy, 20^2 + 127 vs 127 for the signal that matters, which predicts
    # 10·log10(127/527 · 12·49/9) ≈ 12 dB. Ask for half of the predicted gain over the plain INT4 SQNR.
    plain = worst.sqnr["int4"]
    assert plain < 6.0
    assert worst.sqnr["int4_h128"] >= plain + 6.0
    assert worst.sqnr["int4_h32"] >= plain + 3.0
    assert worst.recommendation.startswith("Hadamard-rotate the input (block 128)")
    others = [r for r in report.layers if r is not worst]
    assert all(r.sqnr["int4"] > plain + 6.0 for r in others)
    assert not any(r.problems for r in others)
    assert worst.input_kurtosis > 20 * 3  # heavy tails


def test_clean_model_has_no_problem_layers():
    report = inspect_model(small_gpt(), batches())
    assert report.problem_layers == ()
    assert "no problem layers found" in report.table()
    assert report.figures == {}


def test_table_json_and_figures(outlier_run):
    report, out = outlier_run
    table = report.table()
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["#", "layer", "K->M"]
    assert lines[3].split()[:2] == ["1*", "transformer.h.1.attn.c_attn"]
    assert "recommendations (1 problem layers):" in table
    assert "1. transformer.h.1.attn.c_attn: Hadamard-rotate" in table
    assert len(report.table(top=3).split("recommendations")[0].strip().splitlines()) == 3 + 3
    data = json.loads((out / "inspect.json").read_text())
    assert data == json.loads(report.to_json())
    assert data["layers"][0]["name"] == "transformer.h.1.attn.c_attn"
    assert data["rank_key"] == "int4" and data["model"] == "gpt-test"
    assert [r["rank"] for r in data["layers"]] == list(range(1, 10))
    for name in ("histogram", "sqnr"):
        path = out / f"{name}.png"
        assert data["figures"][name] == str(path)
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def synthetic(name, sqnr_db_by_key, *, is_head=False, in_features=128):
    stats = LinearStats(name, in_features, 64, is_head, 1.0, 3.0, {}, tokens=100, calls=1)
    stats.channel_absmax = torch.ones(in_features)
    for key, db in sqnr_db_by_key.items():
        stats.output_sqnr[key] = SqnrSum(signal=10 ** (db / 10), noise=1.0)
    return stats


def test_recommendation_branches():
    normal = {"int8": 40.0, "int4": 15.0, "int4_h32": 15.0, "int4_h128": 15.0}
    layers = [synthetic(f"ok{i}", normal) for i in range(9)]  # median INT4 SQNR 15 dB
    layers += [
        synthetic("rotate", {"int8": 25.0, "int4": 3.0, "int4_h32": 8.0, "int4_h128": 12.0}),
        synthetic("int8", {"int8": 35.0, "int4": 5.0, "int4_h32": 6.0, "int4_h128": 5.0}),
        synthetic(
            "int8rot", {"int8": 20.0, "int8_h128": 33.0, "int4": 2.0, "int4_h32": 2.5, "int4_h128": 5.5}
        ),
        synthetic("bf16", {"int8": 12.0, "int4": 1.0, "int4_h32": 1.5, "int4_h128": 1.0}),
        synthetic("lm_head", {"int8": 30.0, "int4": 0.5, "int4_h32": 9.0, "int4_h128": 9.0}, is_head=True),
    ]
    report = build_report(Collected(layers, [], 1, 100, InspectSettings()))
    recs = {r.name: r.recommendation for r in report.layers}
    assert [r.name for r in report.layers[:5]] == ["lm_head", "bf16", "int8rot", "rotate", "int8"]
    assert recs["rotate"].startswith("Hadamard-rotate the input (block 128) before INT4: SQNR 3.0 -> 12.0")
    assert recs["int8"].startswith("keep in INT8 (SQNR 35.0 dB)")
    assert recs["int8rot"].startswith("keep in INT8 with a Hadamard rotation (block 128")
    assert "rotation reaches only 5.5 dB" in recs["int8rot"]
    assert recs["bf16"].startswith("keep in bf16")
    assert recs["lm_head"].startswith("output head")
    assert all(recs[f"ok{i}"] is None for i in range(9))
    top2 = report.table(top=2)
    assert "recommendations (5 problem layers):" in top2 and "... 3 more below row 2" in top2
    assert math.isclose(report.layers[-1].sqnr["int4"], 15.0)
