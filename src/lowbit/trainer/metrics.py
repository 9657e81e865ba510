"""Training metrics: a JSON-lines log and the loss-curve plot.

Each line of ``metrics.jsonl`` is one JSON object. Train lines carry ``step``, ``loss`` (mean train loss over
the steps since the previous train line), ``lr``, ``grad_norm`` (of the last step, before clipping),
``tokens_per_s`` and ``tokens`` (tokens trained on so far); eval lines carry ``step``, ``val_loss`` and
``val_ppl``. The plot uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
headless and does not disturb a caller's matplotlib setup.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "plot_loss_curve", "plot_loss_curves", "read_metrics", "truncate_metrics"]


class MetricsWriter:
    """Append JSON lines to ``path`` (parent folders created), flushing after each line.

    Non-finite floats are written as ``null`` so every line stays valid JSON.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines file, in order (blank lines skipped); a missing file raises
    ``FileNotFoundError``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drop every record with ``step > last_step`` (used when a run resumes from an earlier checkpoint, so the
    log shows one trajectory). A missing file is left missing. A partly written last line (crash mid-write)
    is dropped as well."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def plot_loss_curve(records: Iterable[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write a PNG of train ``loss`` and ``val_loss`` against ``step`` from one run's metrics records.

    Records without those keys (or with ``None`` values) are skipped; with no points at all the figure is
    still written (empty axes), so the file always exists afterwards.
    """
    return plot_loss_curves({"": records}, path, title=title)


def plot_loss_curves(
    runs: Mapping[str, Iterable[dict[str, Any]]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Like :func:`plot_loss_curve` for several runs on one axes; ``runs`` maps a label (e.g. "fp32",
    "int4") to that run's records; lines are labelled "<label> train" / "<label> validation"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    any_points = False
    for i, (label, records) in enumerate(runs.items()):
        records = list(records)
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        color = f"C{i}"
        prefix = f"{label} " if label else ""
        if train:
            ax.plot(*zip(*train), color=color, label=prefix + "train", linewidth=1.2, alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=prefix + "validation", linewidth=1.2, markersize=3)
        any_points = any_points or bool(train or val)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    if title:
        ax.set_title(title)
    if any_points:
        ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
