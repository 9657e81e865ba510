import json
import math

import pytest
import torch

from lowbit.onebit import load_onebit, read_onebit_config
from lowbit.onebit.compress import (
    CompressConfig,
    add_arguments,
    config_from_args,
    evaluate_model_dir,
    run_compress,
)


def _tiny_config(model_dir, out, **kw):
    base = dict(
        model=str(model_dir),
        out=str(out),
        synthetic=6,
        synthetic_len=24,
        synthetic_batch=6,
        real_fraction=0.5,
        real_tokens=2000,
        steps=4,
        time_budget_min=None,
        batch_size=4,
        seq_len=16,
        eval_tokens=400,
        eval_seq_len=64,
        eval_points=2,
        device="cpu",
        progress=False,
        lr=3e-3,
    )
    base.update(kw)
    return CompressConfig(**base)


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, tiny_hf_dir, capsys):
    results = run_compress(_tiny_config(tiny_hf_dir, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("results.json", "table.md", "ppl_vs_tokens.png", "synthetic.safetensors"):
        assert (out / name).is_file(), name
    assert read_onebit_config(out / "model")["architecture"] == "hf"
    saved = json.loads((out / "results.json").read_text())
    assert saved["load_exact"] is True and results["load_exact"] is True
    names = [r["name"] for r in saved["rows"]]
    assert (
        names[0].startswith("teacher")
        and "RTN" in names[1]
        and "SVID" in names[2]
        and "distilled" in names[3]
    )
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in saved["rows"])
    assert saved["distill"]["steps"] == 4 and saved["distill"]["tokens"] == 4 * 4 * 16
    assert [p["step"] for p in saved["curve"]] == [0, 2, 4]
    assert saved["eval"]["tokens"] == 400
    assert saved["rows"][3]["size_ratio"] < 1.0
    table = (out / "table.md").read_text()
    assert table.count("\n") == 6 and "OneBit, distilled" in table
    assert "OneBit, distilled" in capsys.readouterr().out
    # lowbit eval ppl --model DIR: the same number as the pipeline's last row on the same tokens
    r = evaluate_model_dir(
        out / "model", "shakespeare", seq_len=64, stride=32, max_tokens=400, device="cpu", progress=False
    )
    assert r.ppl == pytest.approx(saved["rows"][3]["ppl"], rel=1e-9)
    loaded = load_onebit(out / "model")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_time_budget_mode_measures_and_fits(tmp_path, tiny_hf_dir):
    cfg = _tiny_config(
        tiny_hf_dir,
        tmp_path / "run",
        steps=None,
        time_budget_min=0.05,
        synthetic=0,
        real_fraction=1.0,
        eval_points=1,
        distill_checkpoint=False,
    )
    results = run_compress(cfg)
    d = results["distill"]
    assert d["step_seconds_measured"] > 0 and d["steps"] >= 1
    assert d["batch_rows"] == {"synthetic": 0, "real": 4}
    assert not (tmp_path / "run" / "distill").exists()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(steps=None, time_budget_min=None), "steps, time_budget_min"),
        (dict(synthetic=0, real_fraction=0.5), "real_fraction=1"),
        (dict(real_fraction=1.5), "real_fraction"),
        (dict(real_fraction=0.01, batch_size=4), "no real row"),
        (dict(trainable="x"), "trainable"),
        (dict(method="pca"), "method"),
        (dict(save_dtype="int8"), "save_dtype"),
        (dict(eval_stride=0), "eval_stride"),
        (dict(batch_size=0), "batch_size"),
        (dict(time_budget_min=-1), "time_budget_min"),
    ],
)
def test_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        CompressConfig(**kw)


def test_cli_arguments_parse_into_the_config():
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(
        p.parse_args(
            [
                "--model",
                "m",
                "--out",
                "o",
                "--steps",
                "7",
                "--time-budget-min",
                "0",
                "--layer-norm",
                "--no-progress",
                "--eval-tokens",
                "1000",
            ]
        )
    )
    assert (
        cfg.model,
        cfg.out,
        cfg.steps,
        cfg.time_budget_min,
        cfg.layer_norm,
        cfg.progress,
        cfg.eval_tokens,
    ) == ("m", "o", 7, None, True, False, 1000)
    assert config_from_args(p.parse_args([])) == CompressConfig()


def test_evaluate_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        evaluate_model_dir(tmp_path / "missing", device="cpu")
    with pytest.raises(ValueError, match="split"):
        evaluate_model_dir(tmp_path, split="test")
