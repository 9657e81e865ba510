import json
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit
import lowbit.bench
from lowbit.cli import main
from lowbit.trainer import load_checkpoint, read_metrics

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
) * 40


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _train_argv(text_file, out, steps=6, *extra):
    return [
        "train", "--model", "gpt-tiny", "--data", str(text_file), "--out", str(out), "--steps", str(steps),
        "--batch-size", "4", "--block-size", "32", "--eval-every", "3", "--eval-batches", "2",
        "--log-every", "1", "--save-every", "3", "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip


HELP_ARGVS = [
    ["--help"],
    ["train", "--help"],
    ["eval", "--help"],
    ["eval", "ppl", "--help"],
    ["demo", "--help"],
]


@pytest.mark.parametrize("argv", [*HELP_ARGVS, ["bench", "--help"]])
def test_help_exits_zero(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lowbit")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"


def _bad_cases(tmp_path):
    not_ckpt = tmp_path / "plain.pt"
    not_ckpt.write_bytes(b"not a checkpoint")
    missing = str(tmp_path / "missing")
    return [
        ([], "choose a command"),
        (["frobnicate"], "invalid choice"),
        (["train", "--steps", "abc"], "invalid int value"),
        (["train", "--data", missing, "--out", str(tmp_path / "o")], "does not exist"),
        (["train", "--steps", "0", "--out", str(tmp_path / "o")], "steps must be an int > 0"),
        (["train", "--model", "gpt-huge", "--out", str(tmp_path / "o")], "unknown model 'gpt-huge'"),
        (["train", "--block-size", "999", "--out", str(tmp_path / "o")], "exceeds the context"),
        (["train", "--resume", missing], "checkpoint not found"),
        (["train", "--precision", "fp8"], "invalid choice"),
        (["eval"], "choose what to evaluate"),
        (["eval", "ppl"], "required: --checkpoint"),
        (["eval", "ppl", "--checkpoint", missing], "checkpoint not found"),
        (["eval", "ppl", "--checkpoint", str(not_ckpt)], "cannot read checkpoint"),
        (["bench", "nope"], "unknown benchmark suite 'nope'"),
    ]


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    for argv, message in _bad_cases(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lowbit: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # bad arguments are caught before anything is written


def test_train_then_eval_ppl_matches(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(text_file, out)) == 0
    stdout = capsys.readouterr().out
    for name in ("checkpoint.pt", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file()
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 6
    assert ck["extra"]["model_name"] == "gpt-tiny" and ck["extra"]["data"] == str(text_file)
    assert ck["extra"]["tokenizer"]["type"] == "char"
    final = [r for r in read_metrics(out / "metrics.jsonl") if "val_ppl" in r][-1]
    assert final["step"] == 6
    assert f"(ppl {final['val_ppl']:.3f})" in stdout

    assert main(["eval", "ppl", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    # Same weights (saved and reloaded exactly), same windows and batch size, same fp32 math and device:
    # the only possible difference is kernel summation order, relative ~1e-7, far inside 1e-6.
    assert got["ppl"] == pytest.approx(final["val_ppl"], rel=1e-6)
    assert got["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert got["tokens"] == 2 * 4 * 32

    # all windows: more tokens, a different (still finite) number
    assert main(["eval", "ppl", "--checkpoint", str(out / "checkpoint.pt"), "--max-batches", "0"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("val loss ") and "ppl" in line


def test_resume_auto_keeps_checkpoint_settings(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(text_file, out, 3)) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "auto", "--steps", "6", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.out
    assert "lowbit: warning: resuming with changed settings ['steps']" in captured.err
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 6
    assert ck["config"]["batch_size"] == 4 and ck["config"]["block_size"] == 32  # from the checkpoint
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_model_mismatch(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(text_file, out, 3)) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "auto", "--model", "gpt-small"]) == 2
    assert "does not match the checkpoint's model 'gpt-tiny'" in capsys.readouterr().err


SUITE_SOURCE = '''
"""A fake suite for the CLI tests."""


def add_arguments(parser):
    parser.add_argument("--n", type=int, default=1)


def run(args):
    return {"n": args.n, "double": 2 * args.n}
'''


def test_bench_dispatch(tmp_path, monkeypatch, capsys):
    (tmp_path / "lowbit_fake_suite.py").write_text(SUITE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    suites = {}
    monkeypatch.setattr(lowbit.bench, "SUITES", suites)
    assert main(["bench"]) == 0
    assert "no benchmark suites registered yet" in capsys.readouterr().out
    suites["fake"] = "lowbit_fake_suite"
    assert main(["bench"]) == 0
    assert "fake" in capsys.readouterr().out
    assert main(["bench", "fake", "--n", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 3, "double": 6}
    assert main(["bench", "fake", "--help"]) == 0
    assert "--n" in capsys.readouterr().out
    assert main(["bench", "fake", "--bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: unrecognized arguments: --bad") and err.count("\n") == 1


def test_console_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("lowbit")
    if not exe.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (pip install -e .)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"lowbit {lowbit.__version__}"
    bad = subprocess.run(
        [exe, "eval", "ppl", "--checkpoint", str(tmp_path / "missing.pt")], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("lowbit: error: checkpoint not found") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr and bad.stdout == ""


def test_train_int4_then_eval_ppl_reconverts(text_file, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(_train_argv(text_file, out, 3, "--precision", "int4", "--recipe", "hq")) == 0
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["extra"]["int4"]["recipe"] == "hq"
    final = [r for r in read_metrics(out / "metrics.jsonl") if "val_ppl" in r][-1]
    capsys.readouterr()
    # eval rebuilds the model, converts it to INT4 again and gets the training's own validation loss
    # (same windows; the forward pass is deterministic: rounding, no sampling) up to summation order.
    # INT4 training evaluates under bf16 autocast with the lowbit.amp fp32 islands (norms, embeddings,
    # lm_head): eval ppl must apply the same policy, or the head runs in bf16 (~3e-5 relative off).
    assert main(["eval", "ppl", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["loss"] == pytest.approx(final["val_loss"], rel=1e-5)


def test_train_bf16_then_eval_ppl_matches(text_file, tmp_path, capsys):
    # As above without INT4: a bf16 run's evaluation keeps norms, embeddings and lm_head in fp32 (precision
    # policy); eval ppl of its checkpoint runs the same computation (a bf16 head was ~5e-5 relative off).
    out = tmp_path / "bf16"
    assert main(_train_argv(text_file, out, 3, "--precision", "bf16")) == 0
    final = [r for r in read_metrics(out / "metrics.jsonl") if "val_ppl" in r][-1]
    capsys.readouterr()
    assert main(["eval", "ppl", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["loss"] == pytest.approx(final["val_loss"], rel=1e-5)


def test_recipe_without_int4_is_a_usage_error(text_file, tmp_path, capsys):
    assert main(_train_argv(text_file, tmp_path / "x", 3, "--recipe", "rtn")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowbit: error:") and "--recipe" in err[0]
