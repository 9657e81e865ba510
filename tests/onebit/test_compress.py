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


def _argv(cfg):
    """The `lowbit compress onebit` command line of a config (every field that differs from the default)."""
    default = CompressConfig()
    flags = {"time_budget_min": "--time-budget-min"}
    argv = ["compress", "onebit"]
    for field, value in vars(cfg).items():
        if value == getattr(default, field):
            continue
        flag = flags.get(field, "--" + field.replace("_", "-"))
        if field == "progress":
            argv.append("--no-progress")
        elif field == "layer_norm":
            argv.append("--layer-norm")
        else:
            argv += [flag, "0" if value is None else str(value)]
    return argv


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, tiny_hf_dir, capsys):
    from lowbit.cli import main

    cfg = _tiny_config(tiny_hf_dir, tmp_path / "run")
    argv = _argv(cfg)
    assert config_from_args(_parse(argv[2:])) == cfg
    assert main(argv) == 0  # lowbit compress onebit ...
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
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
    capsys.readouterr()
    argv = ["eval", "ppl", "--model", str(out / "model"), "--block-size", "64", "--stride", "32",
            "--max-tokens", "400", "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["ppl"] == pytest.approx(saved["rows"][3]["ppl"], rel=1e-9) and record["tokens"] == 399
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


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli_arguments_parse_into_the_config():
    argv = ["--model", "m", "--out", "o", "--steps", "7", "--time-budget-min", "0", "--layer-norm",
            "--no-progress", "--eval-tokens", "1000"]  # fmt: skip
    cfg = config_from_args(_parse(argv))
    got = (cfg.model, cfg.out, cfg.steps, cfg.time_budget_min, cfg.layer_norm, cfg.progress, cfg.eval_tokens)
    assert got == ("m", "o", 7, None, True, False, 1000)
    assert config_from_args(_parse([])) == CompressConfig()


def test_cli_commands_and_errors(tmp_path, capsys):
    from lowbit.cli import main

    assert main(["compress", "onebit", "--help"]) == 0
    assert "--time-budget-min" in capsys.readouterr().out
    for argv, message in [
        (["compress"], "choose a method: onebit"),
        (["compress", "zip"], "unknown compression method 'zip'"),
        (["compress", "onebit", "--steps", "x"], "invalid int value"),
        (["compress", "onebit", "--steps", "0", "--out", str(tmp_path / "o")], "steps must be an int >= 1"),
        (
            ["compress", "onebit", "--optimizer", "sgd9", "--out", str(tmp_path / "o")],
            "unknown optimizer 'sgd9'",
        ),
        (["eval", "ppl", "--model", str(tmp_path / "missing"), "--device", "cpu"], "not found"),
        (["eval", "ppl", "--model", str(tmp_path), "--checkpoint", "x"], "not both"),
        (["eval", "ppl", "--model", str(tmp_path), "--device", "cpu"], "not a lowbit OneBit checkpoint"),
        (["eval", "ppl"], "required: --checkpoint"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lowbit: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def test_evaluate_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        evaluate_model_dir(tmp_path / "missing", device="cpu")
    with pytest.raises(ValueError, match="split"):
        evaluate_model_dir(tmp_path, split="test")
