"""lowbit bench int4-linear: forward + backward of one linear layer, INT4 training (Triton, FP8) vs bf16.

For each shape M × K × N (tokens × D_in × D_out) it times one ``y = x·wᵀ`` forward and the backward to
∇x and ∇w (``torch.autograd.grad``, nothing accumulated) for: bf16 eager, bf16 under torch.compile, torchao
float8 training (tensorwise, compiled; when torchao is importable) and variants of ours
(``lowbit.kernels.int4_linear``), all in this run, on Gaussian bf16 data.

A variant of ours is named ``ours-<recipe>[+option...]``: recipe "hq-lss", "hq" or "rtn" (the fields of
``lowbit.int4.RECIPES``: hq / hq-lss block 32, per-row scales, bit splitting per token; rtn per tensor, no
rotation); options "tensor" / "row" (forward scale granularity), "fp8dw" (``grad_weight_fp8``),
"dx=auto|triton|cublas|fp8x2" (``grad_x_backend``, default auto), "keep=0.25" (LSS keep ratio),
"block=64". E.g.
``--methods bf16-eager,ours-hq-lss,ours-hq-lss+fp8dw,ours-hq+dx=fp8x2``. For the first shape it also times
every kernel of ours alone, with its bytes or FLOPs, against a device-to-device copy and the library
products measured in the same run. Prints a table; writes everything to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import traceback
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_SHAPES", "add_arguments", "run"]

DEFAULT_SHAPES = ((16384, 4096, 4096), (16384, 4096, 11008), (8192, 8192, 8192), (16384, 2048, 2048))
BASELINES = ("bf16-eager", "bf16-compiled", "torchao-float8-compiled")
#: Old names of variants of ours (the per-tensor forward scales of the first runs).
ALIASES = {"ours": "ours-hq-lss+tensor", "ours-nolss": "ours-hq+tensor",
           "ours-cublas-dx": "ours-hq-lss+tensor+dx=cublas", "ours-fp8dw": "ours-hq-lss+tensor+fp8dw"}
DEFAULT_METHODS = ("bf16-eager,bf16-compiled,torchao-float8-compiled,ours-hq,ours-hq-lss,ours-hq-lss+fp8dw,"
                   "ours-rtn")
METHODS = BASELINES + tuple(ALIASES)  # plus any ours-<recipe>[+option...]


def parse_ours(name: str, block_size: int = 32, keep_ratio: float = 0.5) -> dict:
    """Keyword arguments of ``int4_linear_triton`` for the variant ``name`` (module docstring)."""
    spec = ALIASES.get(name, name)
    if not spec.startswith("ours-"):
        raise ValueError(f"not a variant of ours: {name!r}")
    recipe, *opts = spec[len("ours-"):].split("+")
    if recipe in ("hq", "hq-lss"):
        kw = {"block_size": block_size, "granularity": "row", "grad_quantizer": "bit_split",
              "grad_granularity": "token", "lss_keep_ratio": keep_ratio if recipe == "hq-lss" else None}
    elif recipe == "rtn":
        kw = {"block_size": None, "granularity": "tensor", "grad_quantizer": "rtn",
              "grad_granularity": "tensor", "lss_keep_ratio": None}
    else:
        raise ValueError(f"unknown recipe {recipe!r} in {name!r}: hq-lss, hq or rtn")
    kw.update(grad_weight_fp8=False, grad_x_backend="auto")
    for opt in opts:
        key, _, val = opt.partition("=")
        if opt in ("tensor", "row"):
            kw["granularity"] = opt
        elif opt == "fp8dw":
            kw["grad_weight_fp8"] = True
        elif key == "dx" and val in ("auto", "triton", "cublas", "fp8x2"):
            kw["grad_x_backend"] = val
        elif key == "keep" and recipe == "hq-lss":
            kw["lss_keep_ratio"] = float(val)
        elif key == "block" and recipe != "rtn":
            kw["block_size"] = int(val)
        else:
            raise ValueError(f"unknown option {opt!r} in {name!r}")
    if kw["grad_weight_fp8"] and kw["lss_keep_ratio"] is None:
        raise ValueError(f"{name!r}: fp8dw needs sampling (hq-lss)")
    return kw


def _check_method(name: str, args) -> None:
    if name not in BASELINES:
        parse_ours(name, args.block_size, args.keep_ratio)


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for part in text.split(";"):
        dims = tuple(int(v) for v in part.replace("x", ",").split(",") if v.strip())
        if len(dims) != 3 or min(dims) <= 0:
            raise argparse.ArgumentTypeError(f"a shape is M,K,N (three positive ints), got {part!r}")
        shapes.append(dims)
    return shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lowbit bench int4-linear``."""
    parser.add_argument("--shapes", type=_parse_shapes, default=list(DEFAULT_SHAPES),
                        help="M,K,N;M,K,N;... (default: the four shapes of the issue)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated: {','.join(BASELINES)} and ours-<recipe>[+option...] "
                             "(module docstring); default: %(default)s")
    parser.add_argument("--block-size", type=int, default=32, help="Hadamard block of ours (default 32)")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="LSS keep ratio of ours (default 0.5)")
    parser.add_argument("--kernels", choices=("first", "all", "none"), default="first",
                        help="per-kernel timing of ours: for the first shape, all shapes or none")
    parser.add_argument("--sweep", action="store_true",
                        help="also try tile configurations of the Triton kernels (first shape)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="skip the CUDA-graph timing (GPU time without the launchers' host time) and the "
                             "host enqueue time of each method")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--time-budget", type=float, default=220.0,
                        help="seconds; skip what is left once passed (0: no limit; default %(default)s)")
    parser.add_argument("--json", default="runs/bench_int4_linear.json", help="where to write the results")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": interpreter smoke run


# ---------------------------------------------------------------------------------------------- timing


class _Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> bool:
        return self.seconds <= 0 or time.monotonic() - self.start < self.seconds


def _bench(fn, args) -> float:
    """Median milliseconds of fn (CUDA events, L2 flushed between runs; triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))


def _graphed(step):
    """``step`` captured in a CUDA graph (after warm-up on a side stream): returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph.replay


def _host_ms(fn, n: int = 20) -> float:
    """Median host milliseconds to enqueue one call of fn, from an idle GPU each time (no sync after it)."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return sorted(times)[n // 2]


def _try(record: dict, key: str, fn):
    """Run fn, store its result (or the error) under record[key]; never raises."""
    try:
        record[key] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark row that fails is reported, the run goes on
        record[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                       "trace": traceback.format_exc(limit=4)[-1500:]}
    return record[key]


# ---------------------------------------------------------------------------------------------- methods


def _step_fn(method: str, x, w, gy, args):
    """A closure doing one forward + backward of ``method`` (grads returned, not accumulated)."""
    if method == "bf16-eager":
        def step():
            y = F.linear(x, w)
            return torch.autograd.grad(y, (x, w), gy)
        return step
    if method == "bf16-compiled":
        lin = torch.compile(lambda a, b: F.linear(a, b), dynamic=False)

        def step():
            y = lin(x, w)
            return torch.autograd.grad(y, (x, w), gy)
        return step
    if method == "torchao-float8-compiled":
        from torchao.float8 import convert_to_float8_training

        module = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.weight.copy_(w)
        module = convert_to_float8_training(torch.nn.Sequential(module))
        compiled = torch.compile(module, dynamic=False)
        weight = module[0].weight

        def step():
            y = compiled(x)
            return torch.autograd.grad(y, (x, weight), gy)
        return step
    if method.startswith("ours"):
        from lowbit.kernels import int4_linear as lin4

        kw = parse_ours(method, args.block_size, args.keep_ratio)
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)  # the same draws every step: capturable

        def step():
            y = lin4.int4_linear_triton(x, w, seed=seed, **kw)
            return torch.autograd.grad(y, (x, w), gy)
        return step
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# ---------------------------------------------------------------------------------------------- kernels


def _kernel_rows(m, k, n, x, w, gy, args, budget, on_row=None) -> list[dict]:
    """Time every kernel of ours alone, plus the library baselines they are compared with; ``on_row(rows)``
    after each row."""
    from lowbit.kernels import hadamard_quant as hq
    from lowbit.kernels import int4_linear as lin4
    from lowbit.kernels import int4_matmul as mm

    b = args.block_size
    f8 = torch.float8_e4m3fn
    rows: list[dict] = []

    def add(name, fn, *, bytes_=None, flops=None, note=""):
        if not budget.left():
            rows.append({"kernel": name, "skipped": "time budget"})
            return
        row = {"kernel": name, "note": note}
        res = _try(row, "ms", lambda: _bench(fn, args))
        if isinstance(res, float):
            if bytes_:
                row["bytes"] = bytes_
                row["GB/s"] = bytes_ / res / 1e6
            if flops:
                row["flops"] = flops
                row["TFLOP/s"] = flops / res / 1e9
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    # ceilings of this run: copy bandwidth and the library products on INT4-valued / Gaussian data
    big = torch.randn(m, k, device=x.device, dtype=torch.bfloat16)
    dst = torch.empty_like(big)
    add("copy bf16 M×K (ceiling)", lambda: dst.copy_(big), bytes_=4 * m * k)
    add("bf16 GEMM M×K×N, x·wᵀ (Gaussian)", lambda: F.linear(x, w), flops=2 * m * k * n)

    # forward
    ascale = torch.ones(1, device=x.device)
    add("fwd: HQ(X) absmax pass", lambda: hq.row_absmax(x, b), bytes_=2 * m * k)
    add("fwd: HQ(X) quantize pass (given scale)", lambda: hq.hadamard_quantize(x, b, scale=ascale),
        bytes_=3 * m * k)
    add("fwd: HQ(X) per tensor, both passes", lambda: hq.hadamard_quantize(x, b, granularity="tensor"),
        bytes_=5 * m * k, note="bytes = 2 reads + 1 write; ideal single pass 3·M·K")
    add("fwd: HQ(X) per row (one kernel)", lambda: hq.hadamard_quantize(x, b, granularity="row"),
        bytes_=3 * m * k, note="bytes = one read + one write (the second read hits L2 or not)")
    add("fwd: HQ(W) per tensor + transposed int8", lambda: hq.hadamard_quantize(
        w, b, granularity="tensor", transposed_dtype=torch.int8), bytes_=6 * n * k)
    qx = hq.hadamard_quantize(x, b, granularity="tensor")
    qw = hq.hadamard_quantize(w, b, granularity="tensor", transposed_dtype=torch.int8)
    add("fwd: int4_mm (FP8 _scaled_mm, bf16 out)", lambda: mm.int4_mm(qx.codes, qw.codes, qx.scale, qw.scale),
        flops=2 * m * k * n)

    # backward
    add("bwd: bit split (v + packed halves)", lambda: hq.bit_split_quantize(gy, seed=1, write_packed=True),
        bytes_=4 * m * n)
    bs = hq.bit_split_quantize(gy, seed=1, write_packed=True, write_fp8=True)

    def sample():
        return hq.leverage_sample_compact(bs.sumsq_hi, bs.sumsq_lo, bs.scale_hi, bs.scale_lo, qx.code_sumsq,
                                          qx.scale, args.keep_ratio, seed=7)
    add("bwd: LSS kernel: probabilities, Bernoulli, compaction (+ sync)", sample)
    lss = sample()
    r, src, half, factor = lss.count, lss.src, lss.half, lss.factor
    norm = lin4._pow2_normalizer(factor)
    add(f"bwd: gather kept rows → fp16 operands (R = {r})", lambda: hq.gather_scaled_rows(
        bs.hl, qx.codes, src, factor / norm, half=half, out_dtype=torch.float16), bytes_=r * (n + k) * 3)
    a16, b16 = hq.gather_scaled_rows(bs.hl, qx.codes, src, factor / norm, half=half, out_dtype=torch.float16)
    add(f"bwd: ∇W fp16 GEMM N×R×K (R = {r})", lambda: lin4._mm_fp32(a16.t(), b16), flops=2 * n * r * k)
    gvw = lin4._mm_fp32(a16.t(), b16)
    add("bwd: ∇W rotation back (fp32 in, bf16 out)", lambda: hq.hadamard_rows(gvw, b), bytes_=6 * n * k)
    pow2 = (lss.factor_max, 9)
    add(f"alt ∇W: gather → FP8 K-major, pow2 factors (R = {r})", lambda: hq.gather_scaled_rows(
        bs.hl, qx.codes, src, factor, half=half, out_dtype=f8, transposed=True, pad_to=16, pow2_round=pow2),
        bytes_=r * (n + k) * 2)
    a8, b8, t8 = hq.gather_scaled_rows(bs.hl, qx.codes, src, factor, half=half, out_dtype=f8, transposed=True,
                                       pad_to=16, pow2_round=pow2)
    add(f"alt ∇W: FP8 _scaled_mm N×R×K (R = {r}), fp32 out", lambda: mm.int4_mm(
        a8, b8, torch.ones(1, device=x.device), t8, out_dtype=torch.float32), flops=2 * n * r * k)
    one = torch.ones(1, device=x.device)
    add("bwd: ∇X int8 GEMM + scales + rotation (Triton)", lambda: mm.int8_scaled_mm(
        bs.v, qw.codes_t, bs.scale_lo, qw.scale, hadamard_block=b), flops=2 * m * n * k)
    add("bwd: ∇X int8 GEMM, no rotation (Triton)", lambda: mm.int8_scaled_mm(
        bs.v, qw.codes_t, bs.scale_lo, qw.scale), flops=2 * m * n * k)
    add("alt ∇X: torch._int_mm (int32 out)", lambda: torch._int_mm(bs.v, qw.codes_t.t()), flops=2 * m * n * k)
    acc = torch._int_mm(bs.v, qw.codes_t.t())
    add("alt ∇X: rotation pass of the int32 product", lambda: hq.hadamard_rows(
        acc, b, row_scale=bs.scale_lo, scale=qw.scale), bytes_=6 * m * k)
    w_codes_t_f8 = qw.codes_t.to(f8)
    add("alt ∇X: two FP8 _scaled_mm (hi and lo), bf16 out", lambda: (
        mm.int4_mm(bs.hi_f8, w_codes_t_f8, bs.scale_hi, one),
        mm.int4_mm(bs.lo_f8, w_codes_t_f8, bs.scale_lo, one)), flops=4 * m * n * k,
        note="plus a pass adding the two bf16 products (not timed)")
    add("ref: FP8 _scaled_mm M×N×K (INT4 data)", lambda: mm.int4_mm(bs.hi_f8, w_codes_t_f8, one, one),
        flops=2 * m * n * k)
    add("alt ∇X: two FP8 products in one Triton kernel + scales + rotation (dx=fp8x2)",
        lambda: mm.bit_split_fp8_mm(bs.hi_f8, bs.lo_f8, w_codes_t_f8, bs.scale_lo, qw.scale,
                                    hadamard_block=b),
        flops=4 * m * n * k)

    # per-row forward scales (the recipes' default): the per-channel W scale lies on ∇X's inner dimension, so
    # it is folded into ∇Y before the split (one more split in the same pass); ∇X is then the int8 product
    qwr = hq.hadamard_quantize(w, b, granularity="row", transposed_dtype=torch.int8)
    add("row: bit split with s_w folded (v + folded v2, one pass)", lambda: hq.bit_split_quantize(
        gy, seed=1, col_scale=qwr.scale), bytes_=4 * m * n, note="bytes = 1 read + 2 int8 writes")
    v2, _, s2_lo = hq.bit_split_quantize(gy, seed=1, col_scale=qwr.scale).folded
    add("row: ∇X int8 (folded v2) + scales + rotation (Triton)", lambda: mm.int8_scaled_mm(
        v2, qwr.codes_t, s2_lo, one, hadamard_block=b), flops=2 * m * n * k)

    # rtn: all three products on FP8, transposed codes written by the quantizer passes
    add("rtn fwd: HQ(X) per tensor, codes + transposed FP8 (no rotation)", lambda: hq.hadamard_quantize(
        x, None, granularity="tensor", transposed_dtype=f8), bytes_=6 * m * k,
        note="bytes = 2 reads + 2 writes")
    add("rtn bwd: ∇Y per tensor, codes + transposed FP8", lambda: hq.hadamard_quantize(
        gy, None, granularity="tensor", transposed_dtype=f8), bytes_=6 * m * n)
    qg = hq.hadamard_quantize(gy, None, granularity="tensor", transposed_dtype=f8)
    qxt = hq.hadamard_quantize(x, None, granularity="tensor", transposed_dtype=f8)
    add("rtn bwd: ∇W FP8 _scaled_mm over the tokens (fp32 out)", lambda: mm.int4_mm(
        qg.codes_t, qxt.codes_t, one, one, out_dtype=torch.float32), flops=2 * m * n * k)
    add("rtn bwd: ∇X FP8 _scaled_mm", lambda: mm.int4_mm(qg.codes, w_codes_t_f8, one, one),
        flops=2 * m * n * k)

    if args.sweep:
        for cfg in ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}):
            tag = "x".join(str(v) for v in cfg.values())
            add(f"sweep ∇X int8 GEMM + rotation {tag}", lambda cfg=cfg: mm.int8_scaled_mm(
                bs.v, qw.codes_t, bs.scale_lo, qw.scale, hadamard_block=b, config=cfg), flops=2 * m * n * k)
        for cfg in ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
                    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}):
            tag = "x".join(str(v) for v in cfg.values())
            add(f"sweep ∇X two FP8 + rotation {tag}", lambda cfg=cfg: mm.bit_split_fp8_mm(
                bs.hi_f8, bs.lo_f8, w_codes_t_f8, bs.scale_lo, qw.scale, hadamard_block=b, config=cfg),
                flops=4 * m * n * k)
        for rows_, chunk, warps in ((32, 512, 4), (64, 1024, 4), (128, 512, 8), (64, 256, 4)):
            add(f"sweep HQ(X) quantize pass rows={rows_} chunk={chunk} warps={warps}",
                lambda r_=rows_, c_=chunk, w_=warps: hq.hadamard_quantize(
                    x, b, scale=ascale, block_rows=r_, chunk=c_, num_warps=w_), bytes_=3 * m * k)
        for rows_, cols, warps in ((4, 512, 4), (16, 512, 4), (8, 1024, 8), (8, 256, 4)):
            add(f"sweep bit split rows={rows_} cols={cols} warps={warps}",
                lambda r_=rows_, c_=cols, w_=warps: hq.bit_split_quantize(
                    gy, seed=1, write_packed=True, block_rows=r_, block_cols=c_, num_warps=w_),
                bytes_=4 * m * n)
    copy = next((row for row in rows if row["kernel"].startswith("copy")), {})
    if isinstance(copy.get("GB/s"), float):
        for row in rows:
            if isinstance(row.get("GB/s"), float):
                row["% of copy"] = 100.0 * row["GB/s"] / copy["GB/s"]
    return rows


# ---------------------------------------------------------------------------------------------- run


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def _run_shape(idx: int, shape, methods: list[str], args, budget: _Budget, dev: torch.device, save) -> dict:
    """One shape: every method, then (maybe) the kernel table; ``save(entry)`` after each step."""
    m, k, n = shape
    g = torch.Generator(device=dev).manual_seed(idx)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) / math.sqrt(k)
    w.requires_grad_(True)
    gy = torch.randn(m, n, device=dev, dtype=torch.bfloat16, generator=g) / math.sqrt(n)
    entry = {"shape": [m, k, n], "flops_fwd_bwd": 6 * m * k * n, "methods": {}}
    for method in methods:
        if not budget.left():
            entry["methods"][method] = {"skipped": "time budget"}
            continue
        rec: dict = {}
        t0 = time.monotonic()
        step = _try(rec, "setup", lambda method=method: _step_fn(method, x, w, gy, args))
        if callable(step):
            del rec["setup"]
            ms = _try(rec, "ms", lambda step=step: _bench(step, args))
            if isinstance(ms, float):
                rec["TFLOP/s"] = 6 * m * k * n / ms / 1e9
            if dev.type == "cuda" and args.graphs:
                # The GPU time alone: one CUDA graph replay per step (eager times include the launchers'
                # Python where it exceeds the kernels); and the host time to enqueue one eager step.
                _try(rec, "host_ms", lambda step=step: _host_ms(step))
                replay = _try(rec, "graph_ms", lambda step=step: _graphed(step))
                if callable(replay):
                    _try(rec, "graph_ms", lambda replay=replay: _bench(replay, args))
        rec["wall_s"] = round(time.monotonic() - t0, 1)
        entry["methods"][method] = rec
        save(entry)
        print(f"[{m}x{k}x{n}] {method}: {rec.get('ms', rec.get('setup'))}", flush=True)
    base = entry["methods"].get("bf16-eager", {}).get("ms")
    if isinstance(base, float):
        for rec in entry["methods"].values():
            if isinstance(rec.get("ms"), float):
                rec["speedup_vs_bf16_eager"] = base / rec["ms"]
    base = entry["methods"].get("bf16-eager", {}).get("graph_ms")
    if isinstance(base, float):
        for rec in entry["methods"].values():
            if isinstance(rec.get("graph_ms"), float):
                rec["graph_speedup_vs_bf16"] = base / rec["graph_ms"]
    if args.kernels == "all" or (args.kernels == "first" and idx == 0):
        x_d, w_d = x.detach(), w.detach()
        def on_row(rows):
            entry["kernels"] = rows
            save(entry)
        outcome = _try({}, "rows", lambda: _kernel_rows(m, k, n, x_d, w_d, gy, args, budget, on_row))
        if isinstance(outcome, dict):  # keep the rows measured before the failure
            entry["kernels_error"] = outcome
            entry.setdefault("kernels", [])
        else:
            entry["kernels"] = outcome
        from lowbit.kernels import int4_linear as lin4

        entry["mm_fp32_out"] = lin4.MM_FP32_OUT
    return entry


def run(args: argparse.Namespace) -> dict:
    """Time the methods over the shapes; returns (and writes to ``args.json``) the results."""
    dev = torch.device(getattr(args, "device", "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("lowbit bench int4-linear needs a CUDA GPU")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        _check_method(m, args)
    budget = _Budget(args.time_budget)
    import triton

    settings = {k: ([list(s) for s in v] if k == "shapes" else v) for k, v in vars(args).items()
                if k != "handler"}
    result = {
        "suite": "int4-linear",
        "date": date.today().isoformat(),
        "device": _device_name() if dev.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "settings": settings,
        "shapes": [],
    }
    try:
        import torchao

        result["versions"]["torchao"] = torchao.__version__
    except ImportError:
        if "torchao-float8-compiled" in methods:
            methods.remove("torchao-float8-compiled")
            result["note"] = "torchao is not importable: no torchao row"
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(entry=None):  # after every measurement: a run cut short keeps what it measured
        shapes = result["shapes"] + ([entry] if entry is not None else [])
        path.write_text(json.dumps({**result, "shapes": shapes}, indent=2, default=str))

    for idx, shape in enumerate(args.shapes):
        result["shapes"].append(_run_shape(idx, shape, methods, args, budget, dev, save))
        save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    """Markdown tables of a result of :func:`run`: methods per shape, then the kernels of ours."""
    ver = result["versions"]
    lines = [f"{result['date']}, {result['device']}, torch {ver.get('torch')}, triton {ver.get('triton')}, "
             f"torchao {ver.get('torchao', '-')}", ""]
    methods = list(dict.fromkeys(m for e in result["shapes"] for m in e["methods"]))
    lines.append("| M×K×N | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for e in result["shapes"]:
        cells = []
        for meth in methods:
            rec = e["methods"].get(meth, {})
            if isinstance(rec.get("ms"), float):
                sp = rec.get("speedup_vs_bf16_eager")
                cells.append(f"{rec['ms']:.3f} ms" + (f" ({sp:.2f}x)" if sp else ""))
            else:
                failed = rec.get("ms") or rec.get("setup") or {}
                cells.append(str(rec.get("skipped") or failed.get("error", "-"))[:60])
        lines.append(f"| {'×'.join(map(str, e['shape']))} | " + " | ".join(cells) + " |")
    if any("graph_ms" in rec for e in result["shapes"] for rec in e["methods"].values()):
        lines += ["", "In CUDA graphs (GPU time; × = bf16 eager's graph time / this), and host ms per eager "
                  "step:", "", "| M×K×N | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for e in result["shapes"]:
            cells = []
            for meth in methods:
                rec = e["methods"].get(meth, {})
                g, h = rec.get("graph_ms"), rec.get("host_ms")
                cell = f"{g:.3f} ms" if isinstance(g, float) else "-"
                if isinstance(rec.get("graph_speedup_vs_bf16"), float):
                    cell += f" ({rec['graph_speedup_vs_bf16']:.2f}x)"
                if isinstance(h, float):
                    cell += f", host {h:.2f}"
                cells.append(cell)
            lines.append(f"| {'×'.join(map(str, e['shape']))} | " + " | ".join(cells) + " |")
    for e in result["shapes"]:
        rows = e.get("kernels")
        if not isinstance(rows, list):
            continue
        lines += ["", f"Kernels of ours at {'×'.join(map(str, e['shape']))}:", "",
                  "| kernel | ms | GB/s | % of copy | TFLOP/s |", "|---|---|---|---|---|"]
        for row in rows:
            ms = row.get("ms")
            if not isinstance(ms, float):
                err = row.get("skipped") or (ms or {}).get("error", "")
                lines.append(f"| {row['kernel']} | {str(err)[:70]} | | | |")
                continue
            keys = ("GB/s", "% of copy", "TFLOP/s")
            cells = [format(row[key], ".0f") if key in row else "" for key in keys]
            lines.append(f"| {row['kernel']} | {ms:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit.bench.int4_linear", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
