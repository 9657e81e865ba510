"""Proof that INT4 fully quantized training trains (docs/int4.md).

1. From scratch: a GPT ("gpt-small": 6 layers x 384, context 256) on character-level Shakespeare, one run per
   precision (bf16, rtn, hq, hq-lss by default), same seed, data order, steps and tokens.
2. Fine-tuning: SmolLM2-135M on the Shakespeare train split, bf16 vs hq-lss; validation perplexity on the
   held-out works (the corpus' validation split), before and after.

Every run goes through ``lowbit.trainer.train``. Non-quantized parts (attention products, norms, embeddings,
head) run under bf16 autocast in every run, so the runs differ only in the converted Linear layers. Runs
can go concurrently as separate processes (``--parallel``; a small model leaves most of an H100 idle).

Writes OUT/results.json, OUT/loss_curves.png, OUT/results.md and per-run folders OUT/<phase>/<run>/ with
metrics.jsonl and result.json (logs go to OUT/logs unless --log-dir says elsewhere). ``--report-only``
rebuilds the report from the run folders found under OUT, e.g. after runs made in separate calls.

    python scripts/int4_proof.py --out runs/int4_proof --steps 5000 --finetune-steps 600      # GPU
    python scripts/int4_proof.py --out /tmp/p --model gpt-tiny --steps 3 --finetune-steps 0   # CPU smoke
    python scripts/int4_proof.py --out /tmp/p --time-steps 10                                  # ETA only

A run spec is a recipe name, "bf16", or "recipe:field=value,...", e.g. "hq-lss:scale_mode=lsq" (fields of
``Int4TrainingConfig``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PHASES = ("scratch", "finetune")


# ---------------------------------------------------------------------------------------------- one run


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """ "hq-lss:scale_mode=lsq,block_size=auto" -> ("hq-lss", {"scale_mode": "lsq", "block_size": "auto"})."""
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad run spec {spec!r}: expected field=value after ':'")
        for conv in (int, float):
            try:
                overrides[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            overrides[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return name, overrides


def int4_config(spec: str, seed: int):
    """None for "bf16"/"fp32", else the Int4TrainingConfig of the spec."""
    from lowbit.int4 import Int4TrainingConfig

    name, overrides = parse_spec(spec)
    if name in ("bf16", "fp32"):
        if overrides:
            raise ValueError(f"run {name!r} takes no overrides, got {overrides}")
        return None
    overrides.setdefault("seed", seed)
    return Int4TrainingConfig.named(name, **overrides)


def run_label(spec: str) -> str:
    return spec.replace(":", "_").replace(",", "_").replace("=", "-")


class _Progress:
    """Prints one line every ``every`` steps with the step time and the ETA of the run."""

    def __init__(self, label: str, steps: int, every: int):
        self.label, self.steps, self.every = label, steps, max(1, every)
        self.t0 = None
        self.first = None

    def on_train_start(self, **_: Any) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, *, step: int, loss: float, **_: Any) -> None:
        if self.first is None:  # a resumed run starts past step 1
            self.first = step - 1
        if step % self.every == 0 or step == self.steps:
            dt = (time.perf_counter() - self.t0) / max(1, step - self.first)
            eta = dt * (self.steps - step)
            print(
                f"[{self.label}] step {step}/{self.steps} loss {loss:.4f} {dt * 1e3:.0f} ms/step "
                f"ETA {eta:.0f} s",
                flush=True,
            )

    def on_eval(self, *, step: int, val_loss: float, val_ppl: float) -> None:
        print(f"[{self.label}] step {step} val_loss {val_loss:.4f} ppl {val_ppl:.3f}", flush=True)


def _hf_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Next-token cross-entropy of an HF causal LM, or of its `_HFLogits` wrapper (which returns logits)."""
    x, y = batch
    out = model(x) if isinstance(model, _HFLogits) or hasattr(model, "_orig_mod") else model(input_ids=x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


class _HFLogits(torch.nn.Module):
    """model(x) -> logits, for lowbit.eval.perplexity."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def single_run(args: argparse.Namespace, phase: str, spec: str) -> dict[str, Any]:
    """Train one run; returns its summary (also written to its folder as result.json)."""
    from lowbit.data import HFTokenizer, TokenBatcher
    from lowbit.eval import perplexity
    from lowbit.int4 import convert_to_int4_training
    from lowbit.models import build_model, load_causal_lm
    from lowbit.trainer import TrainConfig, prepare_lm_data, resolve_device, train

    out = Path(args.out) / phase / run_label(spec)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    t_start = time.perf_counter()
    if phase == "scratch":
        data = prepare_lm_data("shakespeare")
        torch.manual_seed(args.seed)
        model = build_model(args.model, data.tokenizer.vocab_size)
        block = args.block_size or model.config.block_size
        steps, batch, lr = args.steps, args.batch_size, args.lr
        warmup = min(100, steps // 10)
        min_lr = lr / 10
    else:
        model, hf_tok = load_causal_lm(args.finetune_model, dtype=torch.float32)
        data = prepare_lm_data("shakespeare", HFTokenizer(hf_tok, name_or_path=args.finetune_model))
        block = args.finetune_block_size
        steps, batch, lr = args.finetune_steps, args.finetune_batch_size, args.finetune_lr
        warmup = min(50, steps // 10)
        min_lr = lr / 10
    cfg = int4_config(spec, args.seed)
    report = None
    if cfg is not None:
        report = convert_to_int4_training(model, cfg)
        print(
            f"[{spec}] {report.converted.__len__()} Linear layers converted; kept: "
            f"{[n for n, _ in report.skipped]}",
            flush=True,
        )
    model.to(device)
    eval_model = model if phase == "scratch" else _HFLogits(model)
    if args.compile:
        eval_model = torch.compile(eval_model)
    config = TrainConfig(
        steps=steps,
        batch_size=batch,
        block_size=block,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_every=args.eval_every or max(1, steps // 10),
        eval_batches=args.eval_batches,
        log_every=max(1, min(10, steps // 50)),
        save_every=args.save_every,
        precision=args.precision,
        seed=args.seed,
        out_dir=str(out / "train") if args.save_every else None,
        progress=False,
        device=str(device),
    )
    train_b = TokenBatcher(data.train_tokens, batch, block, generator=args.seed)
    val_b = TokenBatcher(data.val_tokens, batch, block)
    initial = None
    ckpt = out / "train" / "checkpoint.pt"
    resuming = bool(args.save_every) and ckpt.exists()
    initial_path = out / "initial.json"
    if resuming:
        print(f"[{spec}] resuming from {ckpt}", flush=True)
        if initial_path.exists():
            initial = json.loads(initial_path.read_text())
    elif phase == "finetune":  # the pretrained model's validation loss (INT4 runs: after conversion)
        r0 = perplexity(
            eval_model, val_b.eval_batches(args.eval_batches), device=device, precision=args.precision
        )
        initial = {"val_loss": r0.loss, "val_ppl": r0.ppl}
        initial_path.write_text(json.dumps(initial))
        print(f"[{spec}] step 0 val_loss {r0.loss:.4f} ppl {r0.ppl:.3f}", flush=True)

    # The trainer evaluates `model(x)`; an HF model needs the logits wrapper for that, and the wrapper shares
    # the parameters, so it is what we train.
    from lowbit.trainer.metrics import MetricsWriter

    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists() and not resuming:
        metrics_path.unlink()
    writer = MetricsWriter(metrics_path)

    class _Log:
        losses: list[float] = []

        def on_step_end(self, *, step: int, loss: float, grad_norm: float, lr: float, skipped: bool) -> None:
            self.losses.append(loss)
            if step % config.log_every == 0 or step == steps:
                mean = sum(self.losses) / len(self.losses)
                writer.write({"step": step, "loss": mean, "grad_norm": grad_norm, "lr": lr})
                self.losses.clear()

        def on_eval(self, *, step: int, val_loss: float, val_ppl: float) -> None:
            writer.write({"step": step, "val_loss": val_loss, "val_ppl": val_ppl})

    if initial is not None and not resuming:
        writer.write({"step": 0, **initial})
    resume = "auto" if args.save_every else None
    progress = _Progress(spec, steps, every=max(1, steps // 20))
    if phase == "scratch":
        result = train(eval_model, train_b, val_b, config, callbacks=[progress, _Log()], resume=resume)
    else:
        result = train(
            eval_model,
            train_b,
            val_b,
            config,
            loss_fn=lambda m, b: _hf_loss(m.model, b),
            callbacks=[progress, _Log()],
            resume=resume,
        )
    writer.close()
    summary = {
        "phase": phase,
        "run": spec,
        "model": args.model if phase == "scratch" else args.finetune_model,
        "int4_config": None if cfg is None else cfg.to_dict(),
        "converted_layers": None if report is None else len(report.converted),
        "steps": result.step,
        "batch_size": batch,
        "block_size": block,
        "tokens": result.tokens,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
        "best_val_loss": result.best_val_loss,
        "initial": initial,
        "tokens_per_s": result.tokens_per_s,
        "train_s": result.elapsed_s,
        "wall_s": time.perf_counter() - t_start,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------- driver


def _child_cmd(args: argparse.Namespace, phase: str, spec: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--single", f"{phase}/{spec}"]
    for key in (
        "out",
        "model",
        "steps",
        "batch_size",
        "block_size",
        "lr",
        "finetune_model",
        "finetune_steps",
        "finetune_batch_size",
        "finetune_block_size",
        "finetune_lr",
        "eval_every",
        "eval_batches",
        "seed",
        "precision",
        "device",
        "threads",
        "save_every",
    ):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.compile:
        cmd.append("--compile")
    return cmd


def run_all(args: argparse.Namespace, jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Run ``jobs`` ((phase, spec) pairs) as subprocesses, ``args.parallel`` at a time, in order."""
    pending, running, results = list(jobs), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            phase, spec = pending.pop(0)
            log_dir = Path(args.log_dir or Path(args.out) / "logs") / phase / run_label(spec)
            log_dir.mkdir(parents=True, exist_ok=True)
            log = open(log_dir / "log.txt", "w")  # noqa: SIM115 - closed when the process ends
            proc = subprocess.Popen(_child_cmd(args, phase, spec), stdout=log, stderr=subprocess.STDOUT)
            running.append((phase, spec, proc, log, log_dir))
            print(f"started {phase}/{spec} (pid {proc.pid}), log {log_dir / 'log.txt'}", flush=True)
        time.sleep(2.0)
        for item in list(running):
            phase, spec, proc, log, log_dir = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                tail = (log_dir / "log.txt").read_text()[-3000:]
                raise RuntimeError(f"{phase}/{spec} failed (exit {proc.returncode}):\n{tail}")
            summary = json.loads((Path(args.out) / phase / run_label(spec) / "result.json").read_text())
            results.append(summary)
            print(
                f"done {phase}/{spec}: val_loss {summary['val_loss']:.4f} in {summary['wall_s']:.0f} s",
                flush=True,
            )
        _print_progress(running)
    order = {job: i for i, job in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r["phase"], r["run"])])


_last_progress = [0.0]


def _print_progress(running: list) -> None:
    if time.time() - _last_progress[0] < 30 or not running:
        return
    _last_progress[0] = time.time()
    for phase, _spec, _, _, log_dir in running:
        lines = [ln for ln in (log_dir / "log.txt").read_text().splitlines() if "ETA" in ln]
        if lines:
            print(f"  {phase}: {lines[-1]}", flush=True)


def write_report(args: argparse.Namespace, results: list[dict[str, Any]], total_s: float) -> None:
    from lowbit.trainer import read_metrics

    out = Path(args.out)
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "runs": results, "total_s": total_s}, indent=2)
    )
    # Loss curves: one panel per phase.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    phases = [p for p in PHASES if any(r["phase"] == p for r in results)]
    fig = Figure(figsize=(6.4 * len(phases), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, phase in enumerate(phases):
        ax = fig.add_subplot(1, len(phases), i + 1)
        for j, r in enumerate(x for x in results if x["phase"] == phase):
            recs = read_metrics(out / phase / run_label(r["run"]) / "metrics.jsonl")
            train = [(m["step"], m["loss"]) for m in recs if m.get("loss") is not None]
            val = [(m["step"], m["val_loss"]) for m in recs if m.get("val_loss") is not None]
            if train:
                ax.plot(*zip(*train), color=f"C{j}", alpha=0.5, linewidth=1.0, label=f"{r['run']} train")
            if val:
                ax.plot(*zip(*val), "o-", color=f"C{j}", markersize=3, linewidth=1.4, label=f"{r['run']} val")
        model = next(r["model"] for r in results if r["phase"] == phase)
        ax.set_title(f"{'from scratch' if phase == 'scratch' else 'fine-tuning'}: {model}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if phase == "scratch":
            finals = [r["val_loss"] for r in results if r["phase"] == phase and r["val_loss"] is not None]
            if finals and all(math.isfinite(v) for v in finals):
                ax.set_ylim(min(finals) - 0.2, max(finals) + 1.0)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")

    lines = []
    for phase in phases:
        rows = [r for r in results if r["phase"] == phase]
        base = next((r for r in rows if r["run"] in ("bf16", "fp32")), None)
        r0 = rows[0]
        lines += [
            f"### {'From scratch' if phase == 'scratch' else 'Fine-tuning'}: {r0['model']}, "
            f"{r0['steps']} steps "
            f"of {r0['batch_size']} x {r0['block_size']} tokens",
            "",
            f"| run | val loss | val ppl | vs {base['run'] if base else 'baseline'} | initial val ppl | "
            "train loss | tokens/s | wall |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            rel = ""
            if base is not None and r is not base and r["val_loss"] is not None:
                rel = f"{100 * (r['val_loss'] / base['val_loss'] - 1):+.2f}%"
            init = f"{r['initial']['val_ppl']:.3f}" if r.get("initial") else ""
            lines.append(
                f"| {r['run']} | {_f(r['val_loss'])} | {_f(r['val_ppl'], 3)} | {rel} | {init} | "
                f"{_f(r['train_loss'])} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} s |"
            )
        lines.append("")
    dev = results[0]["device"] if results else ""
    lines.append(
        f"Device: {dev}; torch {results[0]['torch'] if results else ''}; total wall {total_s:.0f} s."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _f(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _finetune_model_for_timing(name: str) -> torch.nn.Module:
    """The fine-tuning model, or for "smollm2-135m-random" a randomly initialized model of SmolLM2-135M's
    shape (same step time; for timing where the GGUF file is not at hand)."""
    if name != "smollm2-135m-random":
        from lowbit.models import load_causal_lm

        return load_causal_lm(name, dtype=torch.float32)[0]
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg)


def time_steps(args: argparse.Namespace, jobs: list[tuple[str, str]]) -> None:
    """Measure each job's step time over ``args.time_steps`` steps (after 2 warm-up steps); print the ETA."""
    from lowbit.data import TokenBatcher
    from lowbit.int4 import convert_to_int4_training
    from lowbit.models import build_model
    from lowbit.trainer import resolve_device

    device = resolve_device(args.device)
    total = {}
    for phase, spec in jobs:
        if phase == "scratch":
            model = build_model(args.model, 65)
            block, batch, steps = args.block_size or model.config.block_size, args.batch_size, args.steps
            vocab, loss_fn = 65, (lambda m, x, y: m(x, y)[1])
        else:
            model = _finetune_model_for_timing(args.finetune_model)
            block, batch, steps = args.finetune_block_size, args.finetune_batch_size, args.finetune_steps
            vocab, loss_fn = model.config.vocab_size, (lambda m, x, y: _hf_loss(m, (x, y)))
        cfg = int4_config(spec, args.seed)
        if cfg is not None:
            convert_to_int4_training(model, cfg)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if args.compile:
            model = torch.compile(model)
        b = TokenBatcher(torch.randint(0, vocab, (100_000,)), batch, block, generator=0, device=str(device))
        times = []
        for i in range(args.time_steps + 2):
            x, y = b.sample()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        if args.profile and (phase, spec) == jobs[-1]:
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            ) as prof:
                for _ in range(3):
                    x, y = b.sample()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                        loss = loss_fn(model, x, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        dt = sorted(times)[len(times) // 2]
        total[(phase, spec)] = dt * steps
        print(
            f"{phase}/{spec}: {dt * 1e3:.1f} ms/step (median of {len(times)}) -> {dt * steps:.0f} s "
            f"for {steps} steps",
            flush=True,
        )
        del model, opt
    for phase in PHASES:
        t = [v for (p, _), v in total.items() if p == phase]
        if t:
            print(
                f"{phase}: sum {sum(t):.0f} s sequential; with --parallel {args.parallel} about "
                f"{max(max(t), sum(t) / args.parallel):.0f} s if the device had room for them all"
            )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="gpt-small", help="from-scratch model (default gpt-small)")
    p.add_argument("--steps", type=int, default=5000, help="from-scratch steps (default 5000)")
    p.add_argument("--batch-size", type=int, default=64, help="from-scratch batch (default 64)")
    p.add_argument("--block-size", type=int, default=None, help="from-scratch context (default: model's)")
    p.add_argument("--lr", type=float, default=1e-3, help="from-scratch peak lr (default 1e-3)")
    p.add_argument(
        "--runs", default="bf16,rtn,hq,hq-lss", help="from-scratch run specs (comma list; see doc)"
    )
    p.add_argument("--finetune-model", default="smollm2-135m")
    p.add_argument("--finetune-steps", type=int, default=600, help="fine-tuning steps; 0 skips (default 600)")
    p.add_argument("--finetune-batch-size", type=int, default=16)
    p.add_argument("--finetune-block-size", type=int, default=256)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-runs", default="bf16;hq-lss", help="fine-tuning run specs (';' list)")
    p.add_argument("--eval-every", type=int, default=None, help="default steps // 10")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="autocast of the non-quantized parts in every run (default bf16; fp32 is faster on CPUs)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--parallel", type=int, default=None, help="concurrent runs (default: 4 on CUDA, 1 on CPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="checkpoint each run every N steps under OUT/<phase>/<run>/train and resume from it when "
        "present (runs longer than one device command go on in the next)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")
    p.add_argument("--profile", action="store_true", help="with --time-steps: profile the last run")
    p.add_argument(
        "--time-steps", type=int, default=0, help="only measure step times over N steps, print ETA"
    )
    p.add_argument("--log-dir", default=None, help="folder for the runs' logs (default OUT/logs)")
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from OUT/*/*/result.json"
    )
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    return p


def _split_runs(text: str) -> list[str]:
    # ';' separates runs when specs carry ',' (field lists); a plain comma list also works.
    sep = ";" if ";" in text or ":" in text else ","
    return [s.strip() for s in text.split(sep) if s.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single is not None:
        phase, _, spec = args.single.partition("/")
        single_run(args, phase, spec)
        return 0
    cuda = torch.cuda.is_available() and args.device in ("auto",) or args.device.startswith("cuda")
    if args.parallel is None:
        args.parallel = 4 if cuda else 1
    jobs = [("scratch", s) for s in _split_runs(args.runs)] if args.steps > 0 else []
    if args.finetune_steps > 0:
        jobs += [("finetune", s) for s in _split_runs(args.finetune_runs)]
    for _, spec in jobs:  # fail fast on a bad spec
        int4_config(spec, args.seed)
    if args.time_steps:
        time_steps(args, jobs)
        return 0
    if args.report_only:
        found = [json.loads(f.read_text()) for f in sorted(Path(args.out).glob("*/*/result.json"))]
        order = {p: i for i, p in enumerate(PHASES)}
        found.sort(key=lambda r: (order.get(r["phase"], 9), r["run"] not in ("bf16", "fp32"), r["run"]))
        if not found:
            raise SystemExit(f"no */*/result.json under {args.out}")
        write_report(args, found, sum(r["wall_s"] for r in found))
        return 0
    if not cuda and args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.parallel)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_all(args, jobs)
    write_report(args, results, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
