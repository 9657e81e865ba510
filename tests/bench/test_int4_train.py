"""lowbit bench int4-train: a CPU smoke run with a tiny GPT (the GPU run is the benchmark itself)."""

from __future__ import annotations

import argparse
import json

import torch

from lowbit.bench import SUITES, get_suite
from lowbit.bench.int4_train import add_arguments, make_batches, run


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--device", "cpu", "--model", "tiny", "--vocab-size", "64", "--batch-size", "2", "--seq-len", "16",
         "--warmup", "1", "--steps", "1", "--backend", "emulate", "--no-compile",
         "--json", str(tmp_path / "out.json"), *extra]
    )


def test_registered():
    assert SUITES["int4-train"] == "lowbit.bench.int4_train"
    assert get_suite("int4-train").run is run


def test_smoke_run_reports_every_method(tmp_path, capsys):
    result = run(_args(tmp_path))
    methods = [r["method"] for r in result["methods"]]
    assert methods == ["bf16", "int4-hq-lss", "int4-hq"]
    for r in result["methods"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 2 and r["finite"]
        assert r["compiled"] is False and r["params"] > 0 and r["graph_breaks"] is None
    bf16, lss = result["methods"][0], result["methods"][1]
    assert bf16["int4_backends"] == [] and lss["int4_backends"] == ["emulate"]
    assert lss["conversion"]["converted"] == 16  # 4 Linear layers per block, 4 blocks; lm_head kept
    assert "speedup_vs_bf16" in lss and len(lss["loss_gap_vs_bf16"]) == 2
    # Same initialization and batches: the first losses differ only by the INT4 forward error.
    assert abs(lss["losses"][0] - bf16["losses"][0]) < 0.05 * bf16["losses"][0]
    assert json.loads((tmp_path / "out.json").read_text())["suite"] == "int4-train"
    out = capsys.readouterr().out
    assert "tokens/s" in out and "int4-hq-lss" in out


def test_table_warns_of_graph_breaks():
    from lowbit.bench.int4_train import _table

    row = {"method": "int4-hq", "compiled": True, "graph_breaks": 3, "step_ms": 1.0, "tokens_per_s": 1.0,
           "peak_mem_gb": None, "losses": [1.0], "final_loss": 1.0}
    text = _table({"methods": [row]})
    assert "3 graph break(s)" in text
    assert "graph break" not in _table({"methods": [{**row, "graph_breaks": 0}]})


def test_a_failing_method_is_reported_and_the_run_goes_on(tmp_path):
    result = run(_args(tmp_path, "--methods", "bf16,int4-nope"))
    assert "tokens_per_s" in result["methods"][0]
    assert "recipe must be one of" in result["methods"][1]["error"]


def test_batches_are_a_learnable_markov_chain():
    a = make_batches(2, 3, 20, 50, seed=1)
    b = make_batches(2, 3, 20, 50, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (3, 21)
    # Every token is followed by one of at most 4 successors.
    pairs = torch.cat([torch.stack((x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)), 1) for x in a])
    for tok in pairs[:, 0].unique():
        assert len(pairs[pairs[:, 0] == tok, 1].unique()) <= 4
