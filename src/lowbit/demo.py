"""``lowbit demo``: the main job in a few CPU minutes, written up as ``OUT/report.md``.

The demo is a list of parts (:data:`PARTS`). Each part is a function ``part(ctx) -> Section`` that may train
or compress models, reads and writes shared state on the :class:`DemoContext` (the encoded corpus, trained
runs, loss curves) and returns one report section. Later features add a part (INT4 training beside fp32,
OneBit compression, 8-bit optimizer memory) without touching the others. After all parts, the loss curves of
every run are drawn into ``OUT/loss.png`` and the report is written with it embedded by a relative link.

The first part trains ``gpt-tiny`` with a character tokenizer on the bundled Shakespeare corpus, reports
validation loss and perplexity against a unigram baseline, and samples a few seeded lines.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .trainer import (
    LMData,
    LMRun,
    TrainConfig,
    plot_loss_curves,
    prepare_lm_data,
    read_metrics,
    resolve_device,
    train_lm,
)

__all__ = [
    "DEFAULT_STEPS",
    "PARTS",
    "DemoContext",
    "DemoPart",
    "Section",
    "part_fp32",
    "part_int4",
    "run_demo",
]

DEMO_MODEL = "gpt-tiny"
DEMO_DATA = "shakespeare"
#: Steps of each run (fp32, then INT4 with the same batches); the whole demo takes about 3 minutes on 2 CPU
#: cores, the INT4 emulation being most of it (docs/training.md).
DEFAULT_STEPS = 300


@dataclass(frozen=True)
class Section:
    """One part of the report: a ``## title`` heading and a markdown body."""

    title: str
    body: str


@dataclass
class DemoContext:
    """State shared by the demo parts.

    ``out_dir``: the demo folder (each run writes into a subfolder); ``steps``, ``seed``, ``device``,
    ``progress``: the settings of the demo; ``runs``: label -> :class:`~lowbit.trainer.LMRun` of trained runs
    (the fp32 baseline is ``"fp32"``); ``curves``: label -> metrics records drawn in ``loss.png``.
    """

    out_dir: Path
    steps: int
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    runs: dict[str, LMRun] = field(default_factory=dict)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _data: LMData | None = None

    @property
    def data(self) -> LMData:
        """The Shakespeare corpus encoded with a character tokenizer (loaded once, on first use)."""
        if self._data is None:
            self._data = prepare_lm_data(DEMO_DATA)
        return self._data

    def train_config(self, name: str, **overrides: Any) -> TrainConfig:
        """The demo's training recipe for a run written to ``out_dir/name`` (``overrides`` replace fields)."""
        settings: dict[str, Any] = {
            "steps": self.steps,
            "batch_size": 32,
            "block_size": 128,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": min(50, self.steps // 10),
            "weight_decay": 0.1,
            "eval_every": max(25, self.steps // 6),  # about 6 points on the curve; short runs: at the end
            "eval_batches": 8,
            "log_every": max(1, min(10, self.steps // 20)),
            "save_every": 0,
            "seed": self.seed,
            "device": self.device,
            "progress": self.progress,
            "out_dir": str(self.out_dir / name),
        }
        settings.update(overrides)
        return TrainConfig(**settings)


DemoPart = Callable[[DemoContext], Section]


def unigram_loss(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``val_tokens`` under the add-one-smoothed unigram distribution of
    ``train_tokens``: the loss of a model that ignores context, the floor a trained LM must clearly beat."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_p = torch.log(counts / counts.sum())
    return float(-log_p[val_tokens].mean())


def _sample(run: LMRun, seed: int, *, chars: int = 300, lines: int = 8) -> str:
    tokenizer = run.data.tokenizer
    prompt = "\n" if "\n" in getattr(tokenizer, "vocab", "\n") else tokenizer.decode([0])
    idx = torch.tensor(
        [tokenizer.encode(prompt)], dtype=torch.long, device=next(run.model.parameters()).device
    )
    generator = torch.Generator(device=idx.device).manual_seed(seed)
    out = run.model.generate(idx, chars, temperature=0.8, generator=generator)
    text = tokenizer.decode(out[0, idx.shape[1] :].tolist())
    return "\n".join(text.strip("\n").splitlines()[:lines])


def part_fp32(ctx: DemoContext) -> Section:
    """Train gpt-tiny in fp32 (label ``"fp32"``): results table, unigram baseline and a seeded sample."""
    t0 = time.perf_counter()
    data = ctx.data
    load_s = time.perf_counter() - t0
    config = ctx.train_config("fp32")
    run = train_lm(DEMO_MODEL, DEMO_DATA, config, lm_data=data)
    ctx.runs["fp32"] = run
    if run.result.metrics_path is not None:
        ctx.curves["fp32"] = read_metrics(run.result.metrics_path)
    r = run.result
    unigram = unigram_loss(data.train_tokens, data.val_tokens, data.tokenizer.vocab_size)
    n_params = sum(p.numel() for p in run.model.parameters())
    sample = _sample(run, ctx.seed)
    body = "\n".join(
        [
            f"`{DEMO_MODEL}` ({n_params / 1e6:.2f} M parameters, context {run.model.config.block_size}), "
            f"character tokenizer ({data.tokenizer.vocab_size} symbols), Shakespeare: "
            f"{data.train_tokens.numel():,} training / {data.val_tokens.numel():,} validation characters "
            f"(validation = whole held-out plays). AdamW, lr {config.lr:g} -> {config.min_lr:g} "
            f"(warmup {config.warmup_steps}, cosine), batch {config.batch_size} x {config.block_size}.",
            "",
            "| run | steps | tokens | time | tokens/s | train loss | val loss | val ppl |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| fp32 | {r.step} | {r.tokens:,} | {r.elapsed_s:.0f} s | {r.tokens_per_s:,.0f} | "
            f"{_num(r.train_loss)} | {_num(r.val_loss)} | {_num(r.val_ppl, 2)} |",
            f"| unigram baseline | | | | | | {unigram:.3f} | {math.exp(unigram):.2f} |",
            "",
            f"Validation loss is in nats per character over {config.eval_batches} batches of held-out text "
            f"(`lowbit eval ppl --checkpoint {Path(r.checkpoint_path or '')}` recomputes it). Corpus loading "
            f"took {load_s:.1f} s.",
            "",
            f"Sample (temperature 0.8, seed {ctx.seed}):",
            "",
            "```text",
            sample,
            "```",
        ]
    )
    return Section("Train a tiny GPT (fp32)", body)


def part_int4(ctx: DemoContext) -> Section:
    """Train gpt-tiny again with INT4 fully quantized training (recipe hq-lss, label ``"int4"``) with the fp32
    run's settings, data order and seed; its curves join the fp32 ones in ``loss.png``."""
    from .int4 import Int4TrainingConfig

    int4 = Int4TrainingConfig.named("hq-lss", seed=ctx.seed)
    config = ctx.train_config("int4")
    run = train_lm(DEMO_MODEL, DEMO_DATA, config, lm_data=ctx.data, int4=int4)
    ctx.runs["int4"] = run
    if run.result.metrics_path is not None:
        ctx.curves["int4 hq-lss"] = read_metrics(run.result.metrics_path)
    rows = [("fp32", ctx.runs.get("fp32")), ("int4 hq-lss", run)]
    base = ctx.runs.get("fp32")
    lines = [
        "Every `nn.Linear` but the output head computes its forward and both backward products on INT4 "
        "codes (Xi et al. 2023: Hadamard quantizer forward; bit-split output gradient with leverage-score "
        "sampling for the weight gradient), emulated exactly in PyTorch; embeddings, norms, attention "
        "products and the head stay fp32. Same steps, batches and seed as the fp32 run.",
        "",
        "| run | steps | time | tokens/s | train loss | val loss | val ppl | val loss vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        if r is None:
            continue
        res = r.result
        rel = ""
        if base is not None and r is not base and res.val_loss is not None and base.result.val_loss:
            rel = f"{100 * (res.val_loss / base.result.val_loss - 1):+.1f}%"
        lines.append(
            f"| {label} | {res.step} | {res.elapsed_s:.0f} s | {res.tokens_per_s:,.0f} | "
            f"{_num(res.train_loss)} | {_num(res.val_loss)} | {_num(res.val_ppl, 2)} | {rel} |"
        )
    lines += ["", "The emulation is a reference, not a fast path: expect several times the fp32 step time."]
    return Section("INT4 fully quantized training beside fp32", "\n".join(lines))


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


#: The demo, in order. Later features append their parts here.
PARTS: list[DemoPart] = [part_fp32, part_int4]


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    steps: int | None = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    parts: Sequence[DemoPart] | None = None,
) -> Path:
    """Run the demo parts and write ``out_dir/report.md`` and ``out_dir/loss.png``; returns the report path.

    ``steps`` defaults to :data:`DEFAULT_STEPS`; ``parts`` to :data:`PARTS`. Each part's runs go to
    subfolders of ``out_dir``.
    """
    steps = DEFAULT_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out_dir=out_dir, steps=steps, seed=seed, device=device, progress=progress)
    t0 = time.perf_counter()
    sections = []
    for part in PARTS if parts is None else parts:
        print(f"lowbit demo: {part.__name__} ...", flush=True)
        sections.append(part(ctx))
    total_s = time.perf_counter() - t0
    plot_loss_curves(ctx.curves, out_dir / "loss.png", title="lowbit demo: loss")

    run_device = resolve_device(device)
    lines = [
        "# lowbit demo",
        "",
        f"{datetime.date.today().isoformat()} · lowbit {__version__} · torch {torch.__version__} · "
        f"device {run_device} ({platform.machine()}, {torch.get_num_threads()} threads) · "
        f"total {total_s:.0f} s · command `lowbit demo --steps {steps} --seed {seed}`",
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", "", section.body.rstrip(), ""]
    lines += ["## Loss curves", "", "![training and validation loss](loss.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    for section in sections:
        print(f"\n## {section.title}\n\n{section.body}")
    return report
