import json
import math

from lowbit.trainer.metrics import (
    MetricsWriter,
    plot_loss_curve,
    plot_loss_curves,
    read_metrics,
    truncate_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_writer_lines_are_json(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.write({"step": 1, "loss": 2.5, "lr": 1e-3})
        w.write({"step": 1, "val_loss": math.nan, "val_ppl": math.inf})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "lr": 1e-3},
        {"step": 1, "val_loss": None, "val_ppl": None},  # non-finite floats become null: still valid JSON
    ]
    assert read_metrics(path) == [json.loads(line) for line in lines]


def test_writer_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        with MetricsWriter(path) as w:
            w.write({"step": step})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_truncate_drops_later_steps_and_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert read_metrics(path) == [{"step": 1, "loss": 3}, {"step": 2, "loss": 2}]
    truncate_metrics(tmp_path / "absent.jsonl", 2)  # no file: nothing happens
    assert not (tmp_path / "absent.jsonl").exists()


def test_plot_written(tmp_path):
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 20)] + [{"step": 10, "val_loss": 0.5}]
    out = plot_loss_curve(records, tmp_path / "plots" / "loss.png", title="t")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000  # a rendered figure with axes and lines, not an empty stub


def test_plot_several_runs_and_empty(tmp_path):
    runs = {
        "fp32": [{"step": 1, "loss": 2.0}],
        "int4": [{"step": 1, "loss": 2.2}, {"step": 1, "val_loss": None}],
    }
    assert plot_loss_curves(runs, tmp_path / "a.png").read_bytes().startswith(PNG_SIGNATURE)
    assert plot_loss_curve([], tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)
