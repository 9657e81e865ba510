import re

import pytest

from lowbit.cli import main
from lowbit.demo import DEFAULT_STEPS, PARTS, DemoContext, Section, part_fp32, run_demo, unigram_loss


def test_demo_reduced_steps_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "6", "--no-progress"]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert "![training and validation loss](loss.png)" in report  # relative link, next to the report
    assert "| run | steps | tokens | time | tokens/s | train loss | val loss | val ppl |" in report
    row = re.search(
        r"^\| fp32 \| (\d+) \| ([\d,]+) \| .* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", report, re.M
    )
    assert row, report
    steps, tokens, _, val_loss, val_ppl = row.groups()
    assert int(steps) == 6 and int(tokens.replace(",", "")) == 6 * 32 * 128
    assert float(val_ppl) == pytest.approx(2.718281828 ** float(val_loss), rel=5e-3)  # both printed rounded
    assert "```text\n" in report  # the sample
    assert (out / "fp32" / "checkpoint.pt").is_file()


def test_demo_parts_are_pluggable(tmp_path):
    calls = []

    def first(ctx: DemoContext) -> Section:
        calls.append(ctx.steps)
        ctx.curves["a"] = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
        return Section("First", "body one")

    def second(ctx: DemoContext) -> Section:
        assert "a" in ctx.curves  # parts see what earlier parts left on the context
        return Section("Second", "body two")

    report = run_demo(tmp_path, steps=3, parts=[first, second], progress=False).read_text()
    assert calls == [3]
    assert report.index("## First") < report.index("body one") < report.index("## Second")
    assert report.index("## Second") < report.index("## Loss curves")
    assert (tmp_path / "loss.png").is_file()


def test_defaults_and_errors(tmp_path):
    assert PARTS[0] is part_fp32 and DEFAULT_STEPS > 0
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        run_demo(tmp_path, steps=0)


def test_unigram_loss_uniform_counts():
    import math

    import torch

    tokens = torch.arange(8).repeat(10)  # uniform over 8 symbols, smoothing keeps it uniform
    assert unigram_loss(tokens, tokens, 8) == pytest.approx(math.log(8), rel=1e-12)
