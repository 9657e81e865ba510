"""The ``lowbit`` command line: ``lowbit demo | train | eval ppl | compress onebit | bench``.

The CLI only parses into configurations (``TrainConfig``) and calls the library. Heavy imports (torch, the
models) happen inside the command handlers, so ``--help`` and ``--version`` answer at once. A bad argument
or a library error about the user's input (``ValueError``, ``FileNotFoundError`` and other ``OSError``,
``ImportError``) ends with one line ``lowbit: error: ...`` on stderr and exit status 2; set ``LOWBIT_DEBUG=1``
to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import __version__

__all__ = ["build_parser", "main"]

MODEL_HELP = "gpt-tiny, gpt-small, gpt-medium or gpt-350m"
EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line mistake: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UsageError(f"{message} (see '{self.prog} --help')")


# TrainConfig fields settable from `lowbit train`, with the defaults of a fresh run. Options default to
# argparse.SUPPRESS, so the handler knows what was given and a resumed run keeps its checkpoint's settings.
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 32,
    "block_size": None,  # the model's context
    "grad_accum": 1,
    "lr": 1e-3,
    "min_lr": None,
    "warmup_steps": None,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_every": 200,
    "eval_batches": 20,
    "log_every": 10,
    "save_every": 1000,
    "precision": "fp32",
    "embedding_grad_scale": 1.0,
    "spike_guard": "off",
    "seed": 1337,
    "device": "auto",
    "optimizer": "adamw",
}


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    d = TRAIN_DEFAULTS
    p.add_argument("--model", default=s, help=f"model to train: {MODEL_HELP} (default gpt-tiny)")
    p.add_argument("--data", default=s, help="'shakespeare' (bundled) or a .txt file / folder of .txt files")
    p.add_argument("--out", default=s, help="output folder (default runs/<model>)")
    p.add_argument("--steps", type=int, default=s, help=f"optimizer steps (default {d['steps']})")
    p.add_argument("--batch-size", type=int, default=s, help=f"sequences per micro-batch ({d['batch_size']})")
    p.add_argument("--block-size", type=int, default=s, help="tokens per sequence (default: model context)")
    p.add_argument("--grad-accum", type=int, default=s, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=s, help=f"peak learning rate (default {d['lr']})")
    p.add_argument("--min-lr", type=float, default=s, help="cosine floor (default lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=s, help="linear warmup (default min(100, steps/10))")
    p.add_argument("--weight-decay", type=float, default=s, help=f"on matrices only ({d['weight_decay']})")
    p.add_argument("--grad-clip", type=float, default=s, help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--dropout", type=float, default=s, help="model dropout (default 0.0)")
    p.add_argument("--optimizer", default=s, help="registered optimizer name (default adamw)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16", "int4"),
        default=s,
        help="fp32 (default), or bf16 / fp16 autocast with norms, embeddings, head, softmax and loss in fp32 "
        "(fp16 with loss scaling), or int4: INT4 fully quantized training of the Linear layers (the rest "
        "under bf16 autocast)",
    )
    p.add_argument(
        "--recipe",
        choices=("hq-lss", "hq", "rtn"),
        default=s,
        help="with --precision int4: hq-lss (default; Hadamard forward, bit splitting + leverage-score "
        "sampling backward), hq (no sampling) or rtn (plain round to nearest, the naive baseline)",
    )
    p.add_argument(
        "--embedding-grad-scale",
        type=float,
        default=s,
        metavar="ALPHA",
        help="multiply the embeddings' gradient by ALPHA in (0, 1] (GLM-130B: 0.1; default 1 = off)",
    )
    p.add_argument(
        "--spike-guard",
        nargs="?",
        const="skip",
        choices=("off", "skip", "lower_lr", "rollback"),
        default=s,
        help="skip steps whose loss or gradient norm is non-finite or spikes; after 3 in a row also "
        "lower_lr (halve the LR) or rollback (reload OUT/checkpoint.pt). Bare flag: skip. Default off",
    )
    p.add_argument("--eval-every", type=int, default=s, help=f"steps between evaluations ({d['eval_every']})")
    p.add_argument("--eval-batches", type=int, default=s, help=f"validation batches ({d['eval_batches']})")
    p.add_argument("--log-every", type=int, default=s, help=f"steps between metrics lines ({d['log_every']})")
    p.add_argument("--save-every", type=int, default=s, help=f"steps between checkpoints ({d['save_every']})")
    p.add_argument("--seed", type=int, default=s, help=f"random seed (default {d['seed']})")
    p.add_argument("--device", default=s, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--resume", default=s, help="'auto' (OUT/checkpoint.pt if present) or a checkpoint path")
    p.add_argument("--no-progress", action="store_true", default=s, help="no progress bar")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=s,
        metavar="N",
        help="train on N processes of this machine (one per GPU; gloo CPU processes with --device cpu): "
        "starts torch.distributed.run (torchrun --standalone) on this same command. --batch-size stays the "
        "global batch (a multiple of N). Default 1",
    )
    p.add_argument(
        "--parallel",
        choices=("ddp", "fsdp2"),
        default=s,
        help="with several processes: ddp (replicated model, default) or fsdp2 (parameters, gradients and "
        "optimizer state sharded per transformer block)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``lowbit`` argument parser (each command's handler is stored as ``args.handler``)."""
    parser = _Parser(prog="lowbit", description="Train and compress transformers in very few bits.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="train a tiny GPT on Shakespeare and write a report (a few minutes on a CPU)",
        description="Train gpt-tiny on the bundled Shakespeare corpus with a character tokenizer, report "
        "validation perplexity and a sample, and write OUT/report.md with loss.png.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the tuned demo value)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_cmd_demo)

    train = commands.add_parser(
        "train",
        help="train a GPT on a text corpus",
        description="Train a GPT with a character tokenizer. Writes OUT/checkpoint.pt, OUT/metrics.jsonl and "
        "OUT/loss.png. With --resume, settings not given on the command line come from the checkpoint.",
    )
    _add_train_arguments(train)
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint", description="Evaluate a checkpoint.")
    evals = evaluate.add_subparsers(dest="eval_command", metavar="METRIC", parser_class=_Parser)
    evaluate.set_defaults(handler=_cmd_eval_missing)
    ppl = evals.add_parser(
        "ppl",
        help="validation perplexity of a `lowbit train` checkpoint",
        description="Mean cross-entropy and perplexity of a checkpoint on a corpus split. By default the "
        "windows, batch size and precision of the training run's own evaluation are used, so the number "
        "matches its final validation perplexity.",
    )
    ppl.add_argument("--checkpoint", default=None, help="path to checkpoint.pt (required unless --model)")
    ppl.add_argument("--model", default=None, help="OneBit folder from `lowbit compress onebit` (OUT/model)")
    ppl.add_argument(
        "--data", default=None, help="'shakespeare' or a .txt file/folder (default: training data)"
    )
    ppl.add_argument("--split", choices=("val", "train"), default="val", help="corpus split (default val)")
    ppl.add_argument("--batch-size", type=int, default=None, help="default: the training batch size")
    ppl.add_argument("--block-size", type=int, default=None, help="default: the training block size")
    ppl.add_argument(
        "--max-batches",
        type=int,
        default=-1,
        help="batches to evaluate; 0 = all windows (default: as training)",
    )
    ppl.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default=None, help="default: as training"
    )
    ppl.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.add_argument("--stride", type=int, default=None, help="--model: new tokens per window (block / 2)")
    ppl.add_argument("--max-tokens", type=int, default=50_000, help="--model: tokens scored, 0 = all (50000)")
    ppl.set_defaults(handler=_cmd_eval_ppl)

    compress = commands.add_parser(
        "compress",
        help="compress a pretrained model (onebit)",
        description="Compress a pretrained model; 'lowbit compress onebit --help' shows the options.",
    )
    compress.add_argument("method", nargs="?", help="onebit")
    compress.add_argument("method_args", nargs=argparse.REMAINDER, help="options of the method")
    compress.set_defaults(handler=_cmd_compress)
    inspect = commands.add_parser(
        "inspect",
        help="quantization diagnostics of every linear layer (outliers, SQNR, Hadamard)",
        description="Hook every nn.Linear, run a few batches and report per layer: input and weight absmax, "
        "kurtosis, share of outlier channels, SQNR of INT8 and INT4 quantization with and without the "
        "Hadamard rotation; dead ReLU units and saturated sigmoid/tanh inputs. Prints a ranked table with "
        "recommendations and writes OUT/inspect.json, OUT/histogram.png (the worst layer's input before "
        "and after the rotation) and OUT/sqnr.png.",
    )
    inspect.add_argument(
        "--model",
        default="gpt-small",
        help=f"{MODEL_HELP} (random weights), smollm2-135m, a `lowbit train` checkpoint.pt, or a Hugging "
        "Face folder / .gguf file (default gpt-small)",
    )
    inspect.add_argument("--data", default="shakespeare", help="'shakespeare' or a .txt file / folder")
    inspect.add_argument("--batches", type=int, default=4, help="batches to run (default 4)")
    inspect.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    inspect.add_argument("--block-size", type=int, default=128, help="tokens per sequence (default 128)")
    inspect.add_argument("--blocks", default="32,128", help="Hadamard block sizes (default 32,128)")
    inspect.add_argument("--top", type=int, default=None, help="rows of the printed table (default all)")
    inspect.add_argument("--out", default="runs/inspect", help="output folder (default runs/inspect)")
    inspect.add_argument("--seed", type=int, default=0, help="seed of a randomly initialized GPT (default 0)")
    inspect.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    inspect.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    inspect.set_defaults(handler=_cmd_inspect)

    from .bench import SUITES

    bench = commands.add_parser(
        "bench",
        help="run a benchmark suite",
        description="Run a benchmark suite; 'lowbit bench SUITE --help' shows its options. Without SUITE, "
        "list the suites.",
        epilog="suites: " + (", ".join(sorted(SUITES)) or "none registered yet"),
    )
    bench.add_argument("suite", nargs="?", help="suite name")
    bench.add_argument("suite_args", nargs=argparse.REMAINDER, help="options of the suite")
    bench.set_defaults(handler=_cmd_bench)
    return parser


# ------------------------------------------------------------------------------------------------ handlers


def _train_argv(given: dict[str, Any]) -> list[str]:
    """The ``lowbit train`` options in ``given`` (those on the command line) as arguments again, without
    --nproc-per-node: what every torchrun worker runs."""
    argv = ["train"]
    for key, value in given.items():
        if key in ("command", "handler", "nproc_per_node"):
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _launch_torchrun(nproc: int, given: dict[str, Any]) -> int:
    """``torchrun --standalone --nproc-per-node N -m lowbit.cli train ...`` (torch.distributed.run)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    torchrun_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "lowbit.cli", *_train_argv(given)]
    )
    print(f"lowbit train: torchrun --standalone --nproc-per-node {nproc} -m lowbit.cli "
          + " ".join(_train_argv(given)), flush=True)
    try:
        run(torchrun_args)
    except ChildFailedError as exc:
        print(f"lowbit: error: a training process failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import TrainConfig, load_checkpoint, train_lm

    given = vars(args)
    nproc = given.get("nproc_per_node", 1)
    if nproc < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, got {nproc}")
    if nproc > 1 and os.environ.get("WORLD_SIZE") is None:
        return _launch_torchrun(nproc, given)
    if "parallel" in given and os.environ.get("WORLD_SIZE") is None:
        raise UsageError("--parallel needs several processes: add --nproc-per-node N (or run under torchrun)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:  # one copy of each warning and line: rank 0's
        warnings.simplefilter("ignore")
    resume = given.get("resume")
    out = given.get("out")
    if out is None:  # continue in the checkpoint's folder, else runs/<model>
        if resume is not None and resume != "auto":
            out = os.path.dirname(os.path.abspath(resume))
        else:
            out = os.path.join("runs", given.get("model", "gpt-tiny"))
    ckpt_path = None
    if resume == "auto":
        candidate = os.path.join(out, "checkpoint.pt")
        ckpt_path = candidate if os.path.isfile(candidate) else None
    elif resume is not None:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume checkpoint not found: {resume!r}")
        ckpt_path = resume
    base = dict(TRAIN_DEFAULTS)
    model_name, data, dropout = "gpt-tiny", "shakespeare", 0.0
    if ckpt_path is not None:  # resumed: the checkpoint's settings unless overridden
        payload = load_checkpoint(ckpt_path)
        extra = payload.get("extra", {})
        base.update({k: v for k, v in payload.get("config", {}).items() if k in TRAIN_DEFAULTS})
        model_name = extra.get("model_name", model_name)
        data = extra.get("data", data)
        dropout = extra.get("model_config", {}).get("dropout", dropout)
    model_name = given.get("model", model_name)
    data = given.get("data", data)
    dropout = given.get("dropout", dropout)
    fields = {k: given.get(k, v) for k, v in base.items()}
    if ckpt_path is None:  # fresh run: check the model name and context before loading any data
        from .models import NAMED_CONFIGS

        size = model_name.removeprefix("gpt-") if model_name.startswith("gpt-") else None
        if size not in NAMED_CONFIGS:
            raise ValueError(f"unknown model {model_name!r}; choose one of: {MODEL_HELP}")
        context = NAMED_CONFIGS[size][3]
        if fields["block_size"] is None:
            fields["block_size"] = context
        elif fields["block_size"] > context:
            raise ValueError(
                f"--block-size {fields['block_size']} exceeds the context of {model_name} ({context})"
            )
    int4 = None
    if fields["precision"] == "int4" or "recipe" in given:
        if fields["precision"] != "int4":
            raise UsageError("--recipe needs --precision int4")
        from .int4 import Int4TrainingConfig

        int4 = Int4TrainingConfig.named(given.get("recipe", "hq-lss"), seed=fields["seed"])
        fields["precision"] = "bf16"  # what INT4 training leaves in high precision runs under bf16 autocast
    if world > 1 and fields["batch_size"] % world:
        raise ValueError(
            f"--batch-size {fields['batch_size']} (the global batch) must be a multiple of the {world} "
            "processes"
        )
    config = TrainConfig(**fields, out_dir=out, progress=not given.get("no_progress", False))
    say = print if is_main else (lambda *a, **k: None)
    say(
        f"lowbit train: {model_name} on {data}, {config.steps} steps of {config.tokens_per_step:,} tokens "
        f"-> {out}"
        + (f", INT4 recipe {int4.recipe}" if int4 is not None else "")
        + (f" (resuming {ckpt_path})" if ckpt_path else "")
        + (f", {world} processes ({given.get('parallel', 'ddp')})" if world > 1 else ""),
        flush=True,
    )
    try:
        run = train_lm(model_name, data, config, dropout=dropout, resume=ckpt_path, int4=int4,
                       parallel=given.get("parallel", "ddp"))
    finally:
        if world > 1:
            from .trainer.distributed import destroy_distributed

            destroy_distributed()
    r = run.result
    summary = f"step {r.step}: train loss {_fmt(r.train_loss)}"
    if r.val_loss is not None:
        summary += f", val loss {_fmt(r.val_loss)} (ppl {_fmt(r.val_ppl, 3)})"
    # (the loop counts the global batch: every rank's tokens)
    summary += f", {r.tokens_per_s:,.0f} tokens/s, {r.elapsed_s:.1f} s"
    say(summary)
    say(f"checkpoint: {r.checkpoint_path}\nmetrics:    {r.metrics_path}\nplot:       {r.plot_path}")
    return 0


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cmd_eval_missing(args: argparse.Namespace) -> int:
    raise UsageError("choose what to evaluate: ppl (see 'lowbit eval --help')")


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    from .trainer import evaluate_checkpoint

    if args.model is not None:
        if args.checkpoint is not None:
            raise UsageError("give --checkpoint or --model, not both")
        return _cmd_eval_ppl_onebit(args)
    if args.checkpoint is None:
        raise UsageError("the following arguments are required: --checkpoint (or --model, a OneBit folder)")
    if args.max_batches is not None and args.max_batches < -1:
        raise UsageError(f"--max-batches must be >= 0 (0 = all windows), got {args.max_batches}")
    result = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        block_size=args.block_size,
        max_batches=None if args.max_batches == 0 else args.max_batches,
        device=args.device,
        precision=args.precision,
    )
    record = {"split": args.split, "loss": result.loss, "ppl": result.ppl, "tokens": result.tokens}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{args.split} loss {result.loss:.4f}  ppl {result.ppl:.3f}  ({result.tokens:,} tokens)")
    return 0


def _cmd_eval_ppl_onebit(args: argparse.Namespace) -> int:
    from .onebit.compress import evaluate_model_dir

    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0 (0 = all), got {args.max_tokens}")
    result = evaluate_model_dir(
        args.model,
        args.data or "shakespeare",
        split=args.split,
        seq_len=args.block_size or 512,
        stride=args.stride,
        max_tokens=args.max_tokens or None,
        batch_size=args.batch_size or 8,
        device=args.device,
        precision=args.precision,
        progress=not args.json,
    )
    record = {"split": args.split, "loss": result.loss, "ppl": result.ppl, "tokens": result.tokens}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{args.split} loss {result.loss:.4f}  ppl {result.ppl:.3f}  ({result.tokens:,} tokens)")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    if args.method is None:
        raise UsageError("choose a method: onebit (see 'lowbit compress onebit --help')")
    if args.method != "onebit":
        raise UsageError(f"unknown compression method {args.method!r}; choose: onebit")
    from .onebit.compress import add_arguments, config_from_args, run_compress

    parser = _Parser(
        prog="lowbit compress onebit",
        description="Compress a pretrained LLM to about one bit per weight (OneBit: SVID + distillation) and "
        "print a table: teacher, 1-bit round-to-nearest, SVID without training, distilled student.",
    )
    add_arguments(parser)
    try:
        options = parser.parse_args(args.method_args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    run_compress(config_from_args(options))
    return 0


def _load_inspect_target(name: str, data: str, device: Any, seed: int) -> tuple[Any, Any]:
    """(model, tokenizer) for ``lowbit inspect --model NAME``."""
    import torch

    from .data import CharTokenizer, HFTokenizer, load_corpus
    from .models import KNOWN_MODELS, MODEL_NAMES, build_model, load_causal_lm

    if name in MODEL_NAMES:
        corpus = load_corpus(data)
        tokenizer = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
        torch.manual_seed(seed)
        return build_model(name, tokenizer.vocab_size).to(device), tokenizer
    if name in KNOWN_MODELS or os.path.isdir(name) or name.endswith(".gguf"):
        model, hf_tokenizer = load_causal_lm(name, device=device)
        return model, HFTokenizer(hf_tokenizer)
    if os.path.isfile(name):
        from .trainer import load_lm

        model, tokenizer, _ = load_lm(name, device=str(device))
        return model, tokenizer
    raise ValueError(
        f"unknown model {name!r}: give {MODEL_HELP}, {', '.join(sorted(KNOWN_MODELS))}, a checkpoint.pt, "
        "or a Hugging Face folder / .gguf file"
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .data import TokenBatcher, encode_corpus, load_corpus
    from .inspect import InspectSettings, inspect_model
    from .trainer import resolve_device

    for flag in ("batches", "batch_size", "block_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    try:
        blocks = tuple(int(b) for b in args.blocks.split(",") if b.strip())
    except ValueError as exc:
        raise UsageError(f"--blocks must be comma-separated powers of two, got {args.blocks!r}") from exc
    settings = InspectSettings(blocks=blocks, max_batches=args.batches)
    device = resolve_device(args.device)
    model, tokenizer = _load_inspect_target(args.model, args.data, device, args.seed)
    context = getattr(getattr(model, "config", None), "block_size", None)
    block_size = min(args.block_size, context) if isinstance(context, int) else args.block_size
    # encode only as much validation text as the batches need (a BPE tokenizer on a whole corpus is slow)
    text = load_corpus(args.data).val_text
    need = args.batches * args.batch_size * block_size + 1
    chars = 8 * need
    while True:
        tokens = encode_corpus(tokenizer, text[:chars])
        if tokens.numel() >= need or chars >= len(text):
            break
        chars *= 2
    batcher = TokenBatcher(tokens, args.batch_size, block_size)
    report = inspect_model(
        model,
        batcher.eval_batches(args.batches),
        settings,
        out_dir=args.out,
        model_name=args.model,
        device=device,
    )
    if args.json:
        print(report.to_json())
    else:
        print(report.table(top=args.top))
        print(f"\nreport:    {os.path.join(args.out, 'inspect.json')}")
        for name, path in report.figures.items():
            print(f"{name + ':':11s}{path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(
        out_dir=args.out, steps=args.steps, seed=args.seed, device=args.device, progress=not args.no_progress
    )
    print(f"report: {report}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import SUITES, get_suite

    if args.suite is None:
        if SUITES:
            print("benchmark suites: " + ", ".join(sorted(SUITES)))
        else:
            print("no benchmark suites registered yet")
        return 0
    module = get_suite(args.suite)
    parser = _Parser(prog=f"lowbit bench {args.suite}", description=(module.__doc__ or "").strip() or None)
    module.add_arguments(parser)
    try:
        suite_args = parser.parse_args(args.suite_args)
    except SystemExit as exc:  # the suite's --help
        return exc.code if isinstance(exc.code, int) else 0
    result = module.run(suite_args)
    print(json.dumps(result, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------------------ entry


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        message = f"{exc.strerror}: {exc.filename!r}"
    else:
        message = str(exc) or type(exc).__name__
    return " ".join(message.split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lowbit: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowbit`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            raise UsageError("choose a command: demo, train, eval, compress, bench (see 'lowbit --help')")
        with warnings.catch_warnings():  # restores the caller's warning display afterwards
            warnings.showwarning = _show_warning
            return args.handler(args)
    except (UsageError, ValueError, OSError, ImportError) as exc:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        print(f"lowbit: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
