"""lowbit bench int4-train: end-to-end training throughput of a GPT, bf16 vs INT4 fully quantized training.

One GPT (default ``GPTConfig.named("350m")``: 24 layers, width 1024, context 1024, vocabulary 50304, about
354M parameters) trained from the same initialization on the same batches by each method:

- ``bf16``: every Linear in bf16 under ``torch.autocast`` (the baseline, measured in the same run);
- ``int4-<recipe>`` (default ``int4-hq-lss`` and ``int4-hq``): ``convert_to_int4_training`` with that
  recipe and ``--backend`` (default "triton": ``lowbit.kernels.int4_linear``), the rest under bf16 autocast.

Each method runs ``--warmup`` steps (compilation happens there), then ``--steps`` timed steps (forward,
backward, fused AdamW step) between two device synchronizations: tokens/s = steps · batch · context / time;
peak memory = ``torch.cuda.max_memory_allocated`` over warm-up and timed steps (weights, AdamW state,
activations; with CUDA graphs their pool is allocated during warm-up, so the timed steps alone miss it).
Models are ``torch.compile``d unless ``--no-compile`` (the INT4 kernels are an opaque call inside the
compiled graph; a method whose compilation fails runs eagerly and says so). The loss of every step is
reported: the batches come from a fixed random Markov chain (4 successors per token, entropy ln 4), the same
for every method, so the losses of the same steps are comparable. Prints a table; writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import time
import traceback
from datetime import date
from pathlib import Path

import torch

from ..kernels.inductor_fix import read_back_guarded

__all__ = ["add_arguments", "make_batches", "run"]

DEFAULT_METHODS = "bf16,int4-hq-lss,int4-hq"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lowbit bench int4-train``."""
    parser.add_argument("--model", default="350m",
                        help="GPT size: tiny, small, medium, 350m, 1.3b (default 350m)")
    parser.add_argument("--vocab-size", type=int, default=50304, help="vocabulary (default 50304)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: context)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated: bf16, int4-<recipe> (hq-lss, hq, rtn); default %(default)s")
    parser.add_argument("--backend", default="triton", choices=("triton", "emulate", "auto"),
                        help="Int4TrainingConfig.backend of the INT4 methods (default triton)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run eagerly (default: torch.compile each model)")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode of every method (reduce-overhead: CUDA graphs, which "
                             "remove the launch overhead; the INT4 layers are custom ops with no host sync, "
                             "so they are captured too); default %(default)s")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="runs/bench_int4_train.json", help="where to write the results")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs)")


def make_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches (batch, seq_len + 1) int64 of a fixed random Markov chain: each token has 4 successors
    drawn uniformly, so a model can learn the data (entropy ln 4 per token once the table is known)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, 4), generator=gen)
    out = []
    for _ in range(n):
        cur = torch.randint(0, vocab, (batch,), generator=gen)
        choice = torch.randint(0, 4, (batch, seq_len), generator=gen)
        seq = [cur]
        for t in range(seq_len):
            cur = table[cur, choice[:, t]]
            seq.append(cur)
        out.append(torch.stack(seq, dim=1))
    return out


def _build(method: str, args, device: torch.device):
    from lowbit.models import GPT, GPTConfig

    cfg = GPTConfig.named(args.model, args.vocab_size)
    torch.manual_seed(args.seed)  # the same initialization for every method
    model = GPT(cfg).to(device)
    conversion = None
    if method.startswith("int4-"):
        from lowbit.int4 import Int4TrainingConfig, convert_to_int4_training

        recipe = method[len("int4-"):]
        report = convert_to_int4_training(model, Int4TrainingConfig.named(recipe, backend=args.backend))
        conversion = {"converted": len(report.converted), "kept": [list(s) for s in report.skipped]}
    elif method != "bf16":
        raise ValueError(f"unknown method {method!r}: bf16 or int4-<recipe>")
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=fused)
    return cfg, model, opt, conversion


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_method(method: str, args, device: torch.device, batches: list[torch.Tensor]) -> dict:
    cfg, model, opt, conversion = _build(method, args, device)
    n_params = sum(p.numel() for p in model.parameters())
    step_fn = model
    compiled, compile_error = False, None
    mode = getattr(args, "compile_mode", "default")
    graphs = args.compile and mode == "reduce-overhead"
    if args.compile:
        step_fn = torch.compile(model, mode=None if mode == "default" else mode)
        compiled = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(idx: torch.Tensor) -> torch.Tensor:
        x, y = idx[:, :-1].to(device, non_blocking=True), idx[:, 1:].to(device, non_blocking=True)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            _, loss = step_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # (a CUDA graph's output is overwritten by its next replay: keep a copy)
        return loss.detach().clone() if graphs else loss.detach()

    losses = []
    if device.type == "cuda":
        # Peak over warm-up and timed steps: with CUDA graphs (reduce-overhead) the graphs' memory pool is
        # allocated while they are recorded in warm-up, and replays allocate nothing, so a peak over the
        # timed steps alone would leave out the activations.
        torch.cuda.reset_peak_memory_stats(device)
    from torch._dynamo.utils import counters

    counters["graph_break"].clear()
    t0 = time.perf_counter()
    for i in range(args.warmup):
        try:
            losses.append(step(batches[i]))
        except Exception as exc:  # noqa: BLE001 - compilation failed: measure the eager model instead
            if not compiled or i > 0:
                raise
            compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            torch._dynamo.reset()
            step_fn, compiled = model, False
            opt.zero_grad(set_to_none=True)
            losses.append(step(batches[i]))
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        losses.append(step(batches[i]))
    _sync(device)
    elapsed = time.perf_counter() - t0
    tokens = args.steps * batches[0].shape[0] * (batches[0].shape[1] - 1)
    loss_values = [float(v) for v in losses]
    backends = sorted({m.backend_for(device) for m in model.modules() if hasattr(m, "backend_for")})
    result = {
        "method": method,
        "params": n_params,
        "model": {"name": args.model, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                  "block_size": cfg.block_size, "vocab_size": cfg.vocab_size},
        "compiled": compiled,
        "compile_mode": mode if compiled else None,
        "compile_error": compile_error,
        # Graph breaks Dynamo took while compiling (a break inside the model's loop over its blocks makes
        # Dynamo run the whole forward eagerly; the INT4 layers are meant to trace with none).
        "graph_breaks": sum(counters["graph_break"].values()) if compiled else None,
        "int4_backends": backends,
        "conversion": conversion,
        "warmup_s": warmup_s,
        "timed_s": elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "tokens_per_s": tokens / elapsed,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": loss_values,
        "final_loss": loss_values[-1],
        "finite": all(math.isfinite(v) for v in loss_values),
    }
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _table(result: dict) -> str:
    rows = [r for r in result["methods"] if "tokens_per_s" in r]
    base = next((r for r in rows if r["method"] == "bf16"), None)
    lines = [f"{'method':<14} {'compiled':>8} {'breaks':>6} {'step ms':>9} {'tokens/s':>11} {'vs bf16':>8} "
             f"{'peak GiB':>8} {'loss[0]':>8} {'loss[-1]':>8}"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        breaks = "-" if r.get("graph_breaks") is None else str(r["graph_breaks"])
        lines.append(f"{r['method']:<14} {str(r['compiled']):>8} {breaks:>6} {r['step_ms']:>9.1f} "
                     f"{r['tokens_per_s']:>11.0f} {ratio:>8} {mem:>8} {r['losses'][0]:>8.4f} "
                     f"{r['final_loss']:>8.4f}")
    for r in result["methods"]:
        if "error" in r:
            lines.append(f"{r['method']:<14} failed: {r['error']}")
        elif r.get("graph_breaks"):
            lines.append(f"{r['method']:<14} warning: {r['graph_breaks']} graph break(s) while compiling; a "
                         "break inside the model's block loop runs the whole forward eagerly "
                         "(TORCH_LOGS=graph_breaks shows them)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Train each method for warm-up + timed steps on the same batches; returns (and writes to ``args.json``)
    tokens/s, peak memory and the losses."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("lowbit bench int4-train needs a CUDA GPU (or --device cpu for a smoke run)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    from lowbit.models import GPTConfig

    block = GPTConfig.named(args.model, args.vocab_size).block_size
    seq_len = args.seq_len or block
    if not 0 < seq_len <= block:
        raise ValueError(f"--seq-len must be in [1, {block}] for model {args.model!r}, got {seq_len}")
    batches = make_batches(args.warmup + args.steps, args.batch_size, seq_len, args.vocab_size, args.seed + 1)
    settings = {k: v for k, v in vars(args).items() if k != "handler"}
    result = {
        "suite": "int4-train",
        "date": date.today().isoformat(),
        "device": _device_name(device),
        "versions": {"torch": torch.__version__},
        "settings": {**settings, "seq_len": seq_len, "tokens_per_step": args.batch_size * seq_len},
        "methods": [],
    }
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        try:
            entry = _run_method(method, args, device, batches)
        except Exception as exc:  # noqa: BLE001 - a method that fails is reported, the run goes on
            entry = {"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                     "trace": traceback.format_exc(limit=6)[-2000:]}
        result["methods"].append(entry)
        path.write_text(json.dumps(result, indent=2, default=str))  # a run cut short keeps what it measured
        print(f"[int4-train] {method}: " + (f"{entry['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in entry
                                             else entry["error"]), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    base = next((r for r in result["methods"] if r["method"] == "bf16" and "tokens_per_s" in r), None)
    if base is not None:
        for r in result["methods"]:
            if "tokens_per_s" in r:
                r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
                steps = min(len(r["losses"]), len(base["losses"]))
                r["loss_gap_vs_bf16"] = [r["losses"][i] - base["losses"][i] for i in range(steps)]
    path.write_text(json.dumps(result, indent=2, default=str))
    print(_table(result))
    if args.compile and any(m != "bf16" for m in methods) and not read_back_guarded():
        print("note: inductor's read-back barrier is off (LOWBIT_INDUCTOR_READ_BACK_BARRIER=0, or no Triton "
              "backend): compiled INT4 training can compute wrong gradients (docs/int4.md, known problems); "
              "these tokens/s time the kernels only")
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="lowbit bench int4-train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
