"""lowbit bench optim: 8-bit AdamW step time and state memory against torch AdamW and the 8-bit peers.

Parameter sets: "12x4096x4096" (12 fp32 tensors of 4096 x 4096, 201M parameters) and a GPT's real
parameter set ("gpt-medium": lowbit.models.GPT at the "medium" size with a 50304-token vocabulary, split into
the trainer's two groups: weight decay on matrices only). For each set and each optimizer (ours = lowbit
AdamW8bit; torch AdamW fused and foreach; bitsandbytes AdamW8bit; torchao AdamW8bit — the peers are imported
if installed, else reported as "not installed") it times ``optimizer.step()`` with fixed gradients after
warm-up steps, two ways: ``step_ms``, the median of CUDA-event timings of single steps (the device idles
while Python prepares the launches, so launch overhead counts), and ``pipelined_ms``, the mean of ``--reps``
steps issued back to back between two events (launch overhead hidden behind the previous step, as in a
training loop that does not synchronize). It counts the bytes of the optimizer state. Ratios are to torch
fused AdamW in the same run. Our kernel runs once per tiling of ``lowbit.kernels.adam8bit.VARIANTS``
(``--variants``): row "ours" is the default tiling, rows "ours:<name>" the others. Bytes moved per parameter:
28 for fp32-state AdamW (p, g, m, v read; p, m, v written), 16 for the 8-bit step (p, g read, p written, 2
code bytes read and written, absmax negligible).

Optionally (``--quality-steps N``; 0, the default, skips it) it trains a GPT (``--quality-model``, "small":
6 x 384, context 256) on the bundled Shakespeare corpus, character level, with AdamW and with AdamW8bit for N
steps each (same seed, same batches, bf16 autocast on CUDA) through lowbit.trainer, evaluating every
``--quality-eval-every`` steps; it reports both final validation losses, their relative difference and
writes both curves to ``--out-dir``/quality_curves.png. Everything goes to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from datetime import date
from pathlib import Path

import torch

__all__ = ["OPTIMIZERS", "add_arguments", "run"]

OPTIMIZERS = ("ours", "torch-fused", "torch-foreach", "bnb", "torchao")
BASELINE = "torch-fused"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lowbit bench optim``."""
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
    parser.add_argument("--variants", default="all",
                        help="tilings of our kernel to time: names of lowbit.kernels.adam8bit.VARIANTS, "
                             "comma-separated, or 'all' (row 'ours' is always the default tiling)")
    parser.add_argument("--sets", default="12x4096x4096,gpt-medium",
                        help="parameter sets: NxRxC (N fp32 tensors of R x C) and/or gpt-<size> (tiny, "
                             "small, medium, 350m, 1.3b); comma-separated")
    parser.add_argument("--vocab-size", type=int, default=50304, help="vocabulary of the gpt-<size> sets")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    parser.add_argument("--block-size", type=int, default=256, help="absmax block of the 8-bit optimizers")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (state allocation)")
    parser.add_argument("--reps", type=int, default=30, help="timed steps; the median is reported")
    parser.add_argument("--quality-steps", type=int, default=0,
                        help="Shakespeare training steps per optimizer (0 = no quality run)")
    parser.add_argument("--quality-model", default="small", help="GPT size of the quality run")
    parser.add_argument("--quality-batch-size", type=int, default=64)
    parser.add_argument("--quality-lr", type=float, default=1e-3)
    parser.add_argument("--quality-eval-every", type=int, default=200)
    parser.add_argument("--quality-eval-batches", type=int, default=50)
    parser.add_argument("--out-dir", default="runs/bench_optim",
                        help="folder of the quality run's metrics and its curves (quality_curves.png)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="runs/bench_optim.json", help="where to write the results")


# ---------------------------------------------------------------------------------------------- parameters


def _shapes(name: str, vocab_size: int) -> list[list[tuple[int, ...]]]:
    """Parameter shapes of set ``name`` as param groups: [[decayed shapes], [not decayed shapes]]."""
    if name.startswith("gpt-"):
        from lowbit.models import GPT, GPTConfig

        with torch.device("meta"):
            model = GPT(GPTConfig.named(name[4:], vocab_size))
        seen, decay, no_decay = set(), [], []
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(tuple(p.shape))
        return [decay, no_decay]
    try:
        n, rows, cols = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"parameter set must be NxRxC or gpt-<size>, got {name!r}") from None
    return [[(rows, cols)] * n, []]


def _make_params(groups_shapes, device, dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = []
    for shapes, wd in zip(groups_shapes, (0.1, 0.0)):
        params = []
        for shape in shapes:
            p = torch.randn(shape, device=device, dtype=torch.float32, generator=gen).mul_(0.02).to(dtype)
            g = torch.randn(shape, device=device, dtype=torch.float32, generator=gen)
            p.grad = g.mul_(1e-3).to(dtype)
            params.append(p)
        if params:
            groups.append({"params": params, "weight_decay": wd})
    return groups


def _build(name: str, groups, block_size: int):
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95))
    if name == "ours" or name.startswith("ours:"):
        from lowbit.optim import AdamW8bit

        variant = name.partition(":")[2] or "default"
        return AdamW8bit(groups, block_size=block_size, kernel_variant=variant, **kwargs)
    if name == "torch-fused":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if name == "torch-foreach":
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if name == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)  # block-wise, blocks of 256, min_8bit_size 4096
    if name == "torchao":
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, block_size=block_size, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def _state_bytes(optimizer) -> int:
    """Bytes of the tensors in the optimizer state (shared storages once; tensor subclasses such as torchao's
    quantized state are measured through their inner tensors)."""
    seen, total = set(), 0

    def add(t: torch.Tensor):
        nonlocal total
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) is not torch.Tensor:
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                add(value)
    return total


def _time_steps(step, device, warmup: int, reps: int) -> tuple[float, float]:
    """(median milliseconds of one ``step()`` timed alone, mean milliseconds of ``reps`` steps issued back to
    back). On the CPU both are wall-clock times."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2], sum(times) / len(times)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # ~25 ms of device work queued first: the host runs ahead from the start
    start.record()
    for _ in range(reps):
        step()
    end.record()
    end.synchronize()
    return sorted(times)[len(times) // 2], start.elapsed_time(end) / reps


def _error(exc: BaseException) -> dict:
    if isinstance(exc, ImportError):
        return {"error": "not installed", "detail": str(exc)[:200]}
    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
            "trace": traceback.format_exc(limit=4)[-1500:]}


def _rows(args) -> list[str]:
    """Optimizer rows in order: "ours" expands to the default tiling and one "ours:<name>" per variant."""
    rows = []
    for name in args.optimizers:
        rows.append(name)
        if name == "ours":
            rows += [f"ours:{v}" for v in args.variants if v != "default"]
    return rows


def _bench_set(set_name: str, args, device, dtype) -> dict:
    shapes = _shapes(set_name, args.vocab_size)
    n_params = sum(torch.Size(s).numel() for group in shapes for s in group)
    out = {"n_params": n_params, "n_tensors": sum(len(g) for g in shapes), "optimizers": {}}
    for name in _rows(args):
        try:
            groups = _make_params(shapes, device, dtype, seed=0)
            opt = _build(name, groups, args.block_size)
            ms, pipelined = _time_steps(opt.step, device, args.warmup, args.reps)
            state = _state_bytes(opt)
            out["optimizers"][name] = {"step_ms": ms, "pipelined_ms": pipelined, "state_bytes": state,
                                       "state_MiB": state / 2**20, "state_bytes_per_param": state / n_params}
            del opt, groups
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported, the run goes on
            out["optimizers"][name] = _error(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = out["optimizers"].get(BASELINE, {})
    for row in out["optimizers"].values():
        if "step_ms" in row and "step_ms" in base:
            row["time_vs_torch_fused"] = row["step_ms"] / base["step_ms"]
            row["pipelined_vs_torch_fused"] = row["pipelined_ms"] / base["pipelined_ms"]
            row["state_vs_torch_fused"] = row["state_bytes"] / base["state_bytes"]
    fp32 = dtype == torch.float32
    for name, row in out["optimizers"].items():
        if name == "torch-fused" or name == "ours" or name.startswith("ours:"):
            per_param = (28 if fp32 else 16) if name == "torch-fused" else (16 if fp32 else 10)
            if "step_ms" in row:
                row["bytes_moved_per_param"] = per_param
                row["effective_GB_per_s"] = per_param * n_params / (row["pipelined_ms"] * 1e-3) / 1e9
    return out


# ---------------------------------------------------------------------------------------------- quality


def _quality(args, device) -> dict:
    """A GPT on Shakespeare: AdamW vs AdamW8bit, same seed and batches; final validation losses, curves."""
    from lowbit.data import CharTokenizer, TokenBatcher, encode_corpus, load_corpus
    from lowbit.models import GPT, GPTConfig
    from lowbit.optim import AdamW8bit
    from lowbit.trainer import TrainConfig, plot_loss_curves, read_metrics, train

    corpus = load_corpus("shakespeare")
    tok = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
    train_ids, val_ids = encode_corpus(tok, corpus.train_text), encode_corpus(tok, corpus.val_text)
    gpt_config = GPTConfig.named(args.quality_model, tok.vocab_size)
    out_dir = Path(args.out_dir)
    base = dict(
        steps=args.quality_steps, batch_size=args.quality_batch_size, block_size=gpt_config.block_size,
        lr=args.quality_lr, eval_every=args.quality_eval_every, eval_batches=args.quality_eval_batches,
        precision="bf16" if device.type == "cuda" else "fp32", progress=False, device=str(device), seed=1337,
    )
    fused = device.type == "cuda"
    factories = {
        "adamw": lambda cfg: lambda groups: torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas,
                                                              fused=fused),
        "adamw8bit": lambda cfg: lambda groups: AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas),
    }
    out = {"model": args.quality_model, "vocab_size": tok.vocab_size, **{k: base[k] for k in
           ("steps", "batch_size", "block_size", "lr", "eval_every", "eval_batches", "precision", "seed")}}
    curves = {}
    for name, factory in factories.items():
        config = TrainConfig(**base, out_dir=str(out_dir / f"quality_{name}"))
        torch.manual_seed(config.seed)
        model = GPT(gpt_config)
        train_b = TokenBatcher(train_ids, config.batch_size, config.block_size, generator=0, device=device)
        val_b = TokenBatcher(val_ids, config.batch_size, config.block_size, generator=0, device=device)
        result = train(model, train_b, val_b, config, optimizer=factory(config))
        records = read_metrics(result.metrics_path) if result.metrics_path else []
        curves[name] = records
        out[name] = {
            "val_loss": result.val_loss, "best_val_loss": result.best_val_loss,
            "train_loss": result.train_loss,
            "elapsed_s": result.elapsed_s, "tokens_per_s": result.tokens_per_s,
            "val_curve": [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None],
        }
        del model
    if out["adamw"]["val_loss"] and out["adamw8bit"]["val_loss"]:
        out["relative_val_loss_difference"] = out["adamw8bit"]["val_loss"] / out["adamw"]["val_loss"] - 1
    try:
        png = plot_loss_curves(curves, out_dir / "quality_curves.png",
                               title=f"GPT {args.quality_model}, Shakespeare: AdamW vs AdamW8bit")
        out["plot"] = str(png)
    except ImportError as exc:  # matplotlib missing: the numbers are still in the JSON
        out["plot"] = f"not written: {exc}"
    return out


# ---------------------------------------------------------------------------------------------- entry


def run(args: argparse.Namespace) -> dict:
    """Run the suite with parsed ``args``; returns (and writes to ``args.json``) the results."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if isinstance(args.optimizers, str):
        args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizers {unknown}; choose from {OPTIMIZERS}")
    quality_steps = args.quality_steps
    if isinstance(args.variants, str):
        from lowbit.kernels.adam8bit import VARIANTS

        names = list(VARIANTS) if args.variants == "all" else [
            v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in names if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown kernel variants {bad}; choose from {sorted(VARIANTS)}")
        args.variants = names
    result = {
        "suite": "optim",
        "date": date.today().isoformat(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "block_size": args.block_size,
        "baseline": BASELINE,
        "sets": {},
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    for set_name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        try:
            result["sets"][set_name] = _bench_set(set_name, args, device, dtype)
        except Exception as exc:  # noqa: BLE001
            result["sets"][set_name] = _error(exc)
    if quality_steps > 0:
        try:
            result["quality"] = _quality(args, device)
        except Exception as exc:  # noqa: BLE001
            result["quality"] = _error(exc)
    for set_name, res in result["sets"].items():
        for name, row in res.get("optimizers", {}).items():
            if "step_ms" in row:
                ratio = row.get("time_vs_torch_fused", float("nan"))
                ratio_p = row.get("pipelined_vs_torch_fused", float("nan"))
                print(f"{set_name:>14} {name:>20}: {row['step_ms']:8.3f} ms ({ratio:.2f}x)  pipelined "
                      f"{row['pipelined_ms']:8.3f} ms ({ratio_p:.2f}x torch fused)  "
                      f"state {row['state_MiB']:9.1f} MiB")
            else:
                print(f"{set_name:>14} {name:>20}: {row.get('error')}")
    q = result.get("quality")
    if q and "adamw" in q:
        print(f"quality {q['model']} x {q['steps']} steps: val loss AdamW {q['adamw']['val_loss']:.4f} "
              f"({q['adamw']['elapsed_s']:.0f} s), AdamW8bit {q['adamw8bit']['val_loss']:.4f} "
              f"({q['adamw8bit']['elapsed_s']:.0f} s), "
              f"relative {q.get('relative_val_loss_difference', 0):+.4f}; "
              f"curves {q.get('plot')}")
    elif q:
        print(f"quality: {q.get('error')}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
    return result
