"""From collected statistics to a ranked report: table, one-line recommendations, PNG figures, JSON.

Ranking: layers sorted by the output SQNR of the lowest bit width without rotation (INT4 by default), worst
first. A layer is a *problem layer* when it has outlier input channels (absmax above ``outlier_ratio`` times
the median channel's) or its SQNR lies more than ``LOW_SQNR_MARGIN_DB`` (6 dB: 4× the noise power) below the
median layer's. Each problem layer gets one recommendation, in this order of preference:

1. the output head: keep it in bf16/fp32 (ARCHITECTURE.md keeps it there anyway);
2. a Hadamard block that raises the SQNR by at least ``ROTATION_GAIN_DB`` (3 dB): rotate before quantizing;
   when the rotated SQNR is back within ``LOW_SQNR_MARGIN_DB`` of the median;
3. INT8 (plain, else with the best rotation) at least ``INT8_OK_DB`` (30 dB): keep this layer in INT8;
4. otherwise keep it in bf16.

A rotation cannot rescue a very strong outlier under per-token scales: the quantization noise of a token
scales with its whole energy, which the outlier dominates, rotated or not.

Activations: ReLU modules with more than 10% never-firing units, sigmoid / tanh modules with more than 5% of
inputs beyond the saturation limit get a recommendation as well.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .collect import Collected, InspectSettings, capture_input, collect_stats, variant_key
from .stats import can_rotate, outlier_channel_share, rotate

__all__ = [
    "ActivationReport",
    "InspectReport",
    "LayerReport",
    "build_report",
    "format_table",
    "inspect_model",
    "plot_histograms",
    "plot_sqnr",
    "write_report",
]

LOW_SQNR_MARGIN_DB = 6.0
ROTATION_GAIN_DB = 3.0
INT8_OK_DB = 30.0
DEAD_RELU_SHARE = 0.10
SATURATED_SHARE = 0.05


@dataclass(frozen=True)
class LayerReport:
    """One linear layer. SQNR dicts map "int8", "int4", "int4_h32", ... to dB (None: block not applicable or
    undefined). ``sqnr``: the layer output x·Wᵀ; ``input_sqnr``: x alone; ``weight_sqnr``: W alone."""

    rank: int
    name: str
    in_features: int
    out_features: int
    is_head: bool
    tokens: int
    input_absmax: float
    weight_absmax: float
    input_kurtosis: float | None
    weight_kurtosis: float | None
    outlier_share: float
    outlier_channels: int
    outlier_max_ratio: float | None
    sqnr: dict[str, float | None]
    input_sqnr: dict[str, float | None]
    weight_sqnr: dict[str, float | None]
    problems: tuple[str, ...] = ()
    recommendation: str | None = None


@dataclass(frozen=True)
class ActivationReport:
    """A ReLU (``dead_share``: units never > 0) or sigmoid / tanh (``saturated_share``: inputs beyond the
    limit) module."""

    name: str
    kind: str
    dead_share: float | None
    saturated_share: float | None
    recommendation: str | None = None


@dataclass(frozen=True)
class InspectReport:
    """``layers`` ranked worst first; ``rank_key`` the SQNR variant they are ranked by; ``figures`` maps
    "histogram" / "sqnr" to written PNG paths."""

    layers: tuple[LayerReport, ...]
    activations: tuple[ActivationReport, ...]
    rank_key: str
    batches: int
    tokens: int
    settings: dict[str, Any]
    model: str | None = None
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def problem_layers(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if layer.problems)

    @property
    def worst(self) -> LayerReport:
        return self.layers[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (infinite SQNR written as the strings "inf" / "-inf")."""
        return _json_safe(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, top: int | None = None) -> str:
        """The ranked table (``top`` rows, default all) followed by one recommendation line per problem
        layer among those rows and per flagged activation."""
        return format_table(self, top)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _lowest_bits(settings: InspectSettings) -> int:
    return min(settings.bits)


def _best_rotated(layer: LayerReport, bits: int, blocks) -> tuple[float | None, int | None]:
    found = [
        (layer.sqnr[variant_key(bits, b)], b)
        for b in blocks
        if layer.sqnr.get(variant_key(bits, b)) is not None
    ]
    return max(found) if found else (None, None)


def _recommend_layer(layer: LayerReport, settings: InspectSettings, median: float | None) -> str:
    bits = _lowest_bits(settings)
    plain = layer.sqnr.get(variant_key(bits, None))
    best, block = _best_rotated(layer, bits, settings.blocks)
    gain = None if best is None or plain is None else best - plain
    outliers = ""
    if layer.outlier_channels:
        outliers = (
            f"; {layer.outlier_channels} outlier input channel(s), up to "
            f"{layer.outlier_max_ratio:.0f}x the median channel absmax"
        )
    if layer.is_head:
        return f"output head: keep it in bf16/fp32 (INT{bits} SQNR {_db(plain)} dB){outliers}"
    normal = median is None or (best is not None and best >= median - LOW_SQNR_MARGIN_DB)
    if gain is not None and gain >= ROTATION_GAIN_DB and normal:
        return (
            f"Hadamard-rotate the input (block {block}) before INT{bits}: SQNR {_db(plain)} -> "
            f"{_db(best)} dB{outliers}"
        )
    rotation_note = ""
    if gain is not None and gain >= ROTATION_GAIN_DB:
        rotation_note = f" (rotation reaches only {_db(best)} dB)"
    high = max(settings.bits)
    if high != bits:
        high_plain = layer.sqnr.get(variant_key(high, None))
        high_best, high_block = _best_rotated(layer, high, settings.blocks)
        if high_plain is not None and high_plain >= INT8_OK_DB:
            return (
                f"keep in INT{high} (SQNR {_db(high_plain)} dB): INT{bits} gives {_db(plain)} dB"
                f"{rotation_note}{outliers}"
            )
        if high_best is not None and high_best >= INT8_OK_DB:
            return (
                f"keep in INT{high} with a Hadamard rotation (block {high_block}, SQNR {_db(high_plain)} -> "
                f"{_db(high_best)} dB): INT{bits} gives {_db(plain)} dB{rotation_note}{outliers}"
            )
    return f"keep in bf16: INT{bits} SQNR {_db(plain)} dB{rotation_note}{outliers}"


def _db(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def build_report(collected: Collected, *, model: str | None = None) -> InspectReport:
    """Rank the layers of ``collected``, flag problem layers and activations, and write recommendations."""
    settings = collected.settings
    bits = _lowest_bits(settings)
    rank_key = variant_key(bits, None)
    rows = []
    for s in collected.layers:
        if s.channel_absmax is not None:
            share, count = outlier_channel_share(s.channel_absmax, settings.outlier_ratio)
            med = float(s.channel_absmax.median())
            max_ratio = float(s.channel_absmax.max()) / med if med > 0 else None
        else:
            share, count, max_ratio = 0.0, 0, None
        rows.append(
            LayerReport(
                rank=0,
                name=s.name,
                in_features=s.in_features,
                out_features=s.out_features,
                is_head=s.is_head,
                tokens=s.tokens,
                input_absmax=s.input_absmax,
                weight_absmax=s.weight_absmax,
                input_kurtosis=s.input_moments.kurtosis,
                weight_kurtosis=s.weight_kurtosis,
                outlier_share=share,
                outlier_channels=count,
                outlier_max_ratio=max_ratio,
                sqnr={k: acc.db for k, acc in s.output_sqnr.items()},
                input_sqnr={k: acc.db for k, acc in s.input_sqnr.items()},
                weight_sqnr=dict(s.weight_sqnr),
            )
        )
    ranked_values = [r.sqnr.get(rank_key) for r in rows if r.tokens > 0 and r.sqnr.get(rank_key) is not None]
    finite = [v for v in ranked_values if math.isfinite(v)]
    median = statistics.median(finite) if finite else None

    def sort_key(r: LayerReport):
        v = r.sqnr.get(rank_key)
        return (r.tokens == 0 or v is None, v if v is not None else math.inf)

    ranked = []
    for i, r in enumerate(sorted(rows, key=sort_key), start=1):
        problems = []
        if r.outlier_channels:
            problems.append("outlier_channels")
        v = r.sqnr.get(rank_key)
        if v is not None and median is not None and v < median - LOW_SQNR_MARGIN_DB:
            problems.append(f"low_{rank_key}_sqnr")
        r = dataclasses.replace(r, rank=i, problems=tuple(problems))
        if problems:
            r = dataclasses.replace(r, recommendation=_recommend_layer(r, settings, median))
        ranked.append(r)

    acts = []
    for a in collected.activations:
        rec = None
        if a.dead_share is not None and a.dead_share > DEAD_RELU_SHARE:
            rec = (
                f"{a.dead_share:.0%} of ReLU units never fired: lower the learning rate or warm up longer, "
                "or use GELU / leaky ReLU"
            )
        sat = a.saturated_share
        if sat is not None and sat > SATURATED_SHARE:
            limit = settings.sigmoid_limit if a.kind == "sigmoid" else settings.tanh_limit
            rec = (
                f"{sat:.1%} of {a.kind} inputs beyond ±{limit:g}: their gradients vanish; normalize the "
                "pre-activation or lower its scale"
            )
        acts.append(ActivationReport(a.name, a.kind, a.dead_share, sat, rec))
    return InspectReport(
        layers=tuple(ranked),
        activations=tuple(acts),
        rank_key=rank_key,
        batches=collected.batches,
        tokens=collected.tokens,
        settings=dataclasses.asdict(settings),
        model=model,
    )


def _table_columns(report: InspectReport) -> list[str]:
    bits = sorted(report.settings["bits"], reverse=True)
    low = bits[-1]
    keys = [variant_key(b, None) for b in bits[:-1]]
    keys += [variant_key(low, None)] + [variant_key(low, blk) for blk in report.settings["blocks"]]
    return keys


def _label(key: str) -> str:
    return key.upper().replace("_H", "+H")


def format_table(report: InspectReport, top: int | None = None) -> str:
    """See :meth:`InspectReport.table`."""
    keys = _table_columns(report)
    head = ["#", "layer", "K->M", "|x|max", "|w|max", "kurt x", "kurt w", "outl%"] + [_label(k) for k in keys]
    lines = []
    layers = report.layers if top is None else report.layers[:top]
    for r in layers:
        lines.append(
            [
                str(r.rank) + ("*" if r.problems else ""),
                r.name,
                f"{r.in_features}->{r.out_features}",
                f"{r.input_absmax:.3g}",
                f"{r.weight_absmax:.3g}",
                "n/a" if r.input_kurtosis is None else f"{r.input_kurtosis:.1f}",
                "n/a" if r.weight_kurtosis is None else f"{r.weight_kurtosis:.1f}",
                f"{100 * r.outlier_share:.1f}",
            ]
            + [_db(r.sqnr.get(k)) for k in keys]
        )
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    out = [
        f"lowbit inspect: {report.model or 'model'}, {len(report.layers)} linear layers, {report.batches} "
        f"batches, {report.tokens:,} tokens; output SQNR in dB (ranked by {_label(report.rank_key)}, worst "
        "first; * = problem layer)",
        fmt(head),
        fmt(["-" * w for w in widths]),
    ]
    out += [fmt(row) for row in lines]
    problems = report.problem_layers
    shown = [r for r in layers if r.problems]
    flagged = [a for a in report.activations if a.recommendation]
    out.append("")
    if problems or flagged:
        out.append(f"recommendations ({len(problems)} problem layers):")
        out += [f"  {r.rank}. {r.name}: {r.recommendation}" for r in shown]
        if len(shown) < len(problems):
            out.append(
                f"  ... {len(problems) - len(shown)} more below row {len(layers)} (see the JSON report)"
            )
        out += [f"  {a.name} ({a.kind}): {a.recommendation}" for a in flagged]
    else:
        out.append("no problem layers found")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_histograms(
    x: torch.Tensor, path: str | os.PathLike, *, block: int | None, title: str, bins: int = 200
) -> Path:
    """Histograms of a layer input x (N, K) before and after the Hadamard rotation (blocks of ``block``),
    log-count axis, plus each input channel's absmax before and after (outlier channels stand out before and
    are spread after). ``block`` None (no block divides K): the "after" panels are left empty with a note.
    Writes a PNG at ``path`` (parent created) and returns it."""
    x = x.detach().float().cpu()
    rotated = rotate(x, block) if block is not None and can_rotate(x.shape[1], block) else None
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2)
    panels = [(x, "before rotation"), (rotated, f"after Hadamard rotation (block {block})")]
    for col, (t, label) in enumerate(panels):
        ax_hist, ax_ch = axes[0][col], axes[1][col]
        if t is None:
            for ax in (ax_hist, ax_ch):
                ax.text(0.5, 0.5, "no Hadamard block divides K", ha="center", va="center")
                ax.set_axis_off()
            continue
        values = t.reshape(-1).numpy()
        amax = float(abs(values).max()) if values.size else 0.0
        ax_hist.hist(values, bins=bins, color="C0" if col == 0 else "C1", log=True)
        ax_hist.set_title(f"{label}: |x|max {amax:.3g}, kurtosis {_kurt(t):.1f}", fontsize=9)
        ax_hist.set_xlabel("value")
        ax_hist.set_ylabel("count (log)")
        ch = t.abs().amax(dim=0).numpy()
        # vlines, not bars: a bar 1/600 of the axis wide can vanish when rasterized, the outlier with it
        ax_ch.vlines(range(len(ch)), 0, ch, color="C0" if col == 0 else "C1", linewidth=0.8)
        ax_ch.set_ylim(bottom=0)
        ax_ch.set_xlabel("input channel")
        ax_ch.set_ylabel("channel absmax")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _kurt(t: torch.Tensor) -> float:
    from .stats import kurtosis

    k = kurtosis(t)
    return math.nan if k is None else k


def plot_sqnr(report: InspectReport, path: str | os.PathLike, *, top: int = 30) -> Path:
    """Grouped bar chart of the output SQNR (dB) of the ``top`` worst layers for every table variant
    (INT8, INT4, INT4+H32, INT4+H128 by default). Writes a PNG at ``path`` and returns it."""
    keys = _table_columns(report)
    layers = report.layers[:top]
    fig = _figure(max(8.0, 0.45 * len(layers) + 3), 5)
    ax = fig.subplots()
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        vals = [r.sqnr.get(key) for r in layers]
        vals = [0.0 if v is None or not math.isfinite(v) else v for v in vals]
        ax.bar(
            [j + (i - (len(keys) - 1) / 2) * width for j in range(len(layers))],
            vals,
            width,
            label=_label(key),
        )
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([r.name for r in layers], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(f"{report.model or 'model'}: SQNR per layer, worst {len(layers)} first")
    tops = [v for r in layers for v in r.sqnr.values() if v is not None and math.isfinite(v)]
    ax.set_ylim(min(0.0, min(tops, default=0.0)), 1.2 * max(tops, default=1.0))
    ax.legend(fontsize=8, ncol=len(keys), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report(
    report: InspectReport, out_dir: str | os.PathLike, *, worst_input: torch.Tensor | None = None
) -> InspectReport:
    """Write ``inspect.json``, ``sqnr.png`` and (given ``worst_input``, the worst layer's input (N, K))
    ``histogram.png`` into ``out_dir``; returns the report with ``figures`` filled in (the JSON includes
    them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"sqnr": str(plot_sqnr(report, out / "sqnr.png"))}
    if worst_input is not None:
        worst = report.worst
        blocks = [b for b in report.settings["blocks"] if can_rotate(worst.in_features, b)]
        block = max(blocks) if blocks else None
        figures["histogram"] = str(
            plot_histograms(
                worst_input,
                out / "histogram.png",
                block=block,
                title=f"{report.model or 'model'}: input of {worst.name} (rank 1)",
            )
        )
    report = dataclasses.replace(report, figures=figures)
    (out / "inspect.json").write_text(report.to_json() + "\n", encoding="utf-8")
    return report


def inspect_model(
    model: nn.Module,
    batches: Iterable[Any],
    settings: InspectSettings | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    device: str | torch.device | None = None,
) -> InspectReport:
    """Collect statistics on up to ``settings.max_batches`` batches, rank the layers, and (with ``out_dir``)
    write the JSON and the figures (the histogram uses the worst layer's input on the first batch).

    ``batches``: input tensors or ``(x, y)`` pairs (see :func:`lowbit.inspect.collect_stats`).
    """
    settings = InspectSettings() if settings is None else settings
    kept = []
    for batch in batches:
        if len(kept) >= settings.max_batches:
            break
        kept.append(batch)
    collected = collect_stats(model, kept, settings, module_filter_fn=module_filter_fn, device=device)
    report = build_report(collected, model=model_name)
    if out_dir is not None:
        worst_input = capture_input(
            model, report.worst.name, kept[0], max_tokens=4 * settings.max_tokens, device=device
        )
        report = write_report(report, out_dir, worst_input=worst_input)
    return report
