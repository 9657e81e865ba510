"""lowbit bench optim runs end to end (CPU smoke run on tiny parameter sets) and reports what it promises."""

import argparse
import json

import pytest
import torch

from lowbit.bench import optim as bench


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--sets", "2x64x100", "--optimizers",
                              "ours,torch-fused,bnb,torchao", "--variants", "default,v1",
                              "--quality-steps", "0", "--device", "cpu",
                              "--reps", "2", "--warmup", "1", "--json", str(tmp_path / "out.json"), *extra])


def test_bench_optim_smoke(tmp_path):
    result = bench.run(_args(tmp_path))
    assert json.loads((tmp_path / "out.json").read_text())["suite"] == "optim"
    for name in ("2x64x100",):
        rows = result["sets"][name]["optimizers"]
        ours, base = rows["ours"], rows["torch-fused"]
        assert base["time_vs_torch_fused"] == 1.0
        assert ours["step_ms"] > 0 and ours["pipelined_ms"] > 0 and ours["bytes_moved_per_param"] == 16
        assert "step_ms" in rows["ours:v1"]  # one row per kernel variant besides the default
        for peer in ("bnb", "torchao"):
            assert "step_ms" in rows[peer] or "error" in rows[peer]  # "not installed" where missing
    # 12800 params, all in 8-bit state: 2 bytes + 8 bytes per 256 -> 2.03 of fp32 AdamW's 8 bytes per param
    rows = result["sets"]["2x64x100"]["optimizers"]
    assert rows["ours"]["state_vs_torch_fused"] == pytest.approx((2 + 8 / 256) / 8, rel=0.01)


def test_gpt_parameter_set_shapes():
    """gpt-<size>: the parameters of lowbit.models.GPT (tied head once), in the trainer's two groups."""
    from lowbit.models import GPT, GPTConfig

    decay, no_decay = bench._shapes("gpt-tiny", 65)
    model = GPT(GPTConfig.named("tiny", 65))
    n_model = sum(p.numel() for p in model.parameters())
    assert sum(torch.Size(s).numel() for s in decay + no_decay) == n_model
    assert all(len(s) >= 2 for s in decay) and all(len(s) == 1 for s in no_decay)
    with pytest.raises(ValueError, match="NxRxC"):
        bench._shapes("big", 65)


def test_bench_optim_rejects_unknown(tmp_path):
    args = _args(tmp_path)
    args.optimizers = "ours,sgd"
    with pytest.raises(ValueError, match="sgd"):
        bench.run(args)


def test_bench_optim_quality_smoke(tmp_path):
    """--quality-steps: both optimizers train the same model on Shakespeare; losses, curves and the PNG."""
    pytest.importorskip("matplotlib")
    args = _args(tmp_path, "--sets", "", "--quality-steps", "2", "--quality-model", "tiny",
                 "--quality-batch-size", "2", "--quality-eval-every", "1", "--quality-eval-batches", "1",
                 "--out-dir", str(tmp_path / "q"))
    q = bench.run(args)["quality"]
    assert "error" not in q, q
    for name in ("adamw", "adamw8bit"):
        assert q[name]["val_loss"] > 0 and len(q[name]["val_curve"]) == 2
    assert abs(q["relative_val_loss_difference"]) < 0.05  # 2 steps from one init: nearly the same loss
    assert (tmp_path / "q" / "quality_curves.png").stat().st_size > 0
