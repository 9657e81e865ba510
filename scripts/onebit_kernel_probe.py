"""Probe of every OneBit kernel variant on one GPU: correctness against the unpacked fp32 product, then
kernel times (CUDA graphs, weights rotated through copies larger than L2) beside bf16 ``x @ W.t()`` and
the copy bandwidth, for the bench shapes. One command, about 3 minutes:

    PYTHONPATH=src python scripts/onebit_kernel_probe.py    # writes $OUT/onebit_probe.json (OUT or /tmp)

Phase 1 runs the correctness checks in ``--workers`` parallel processes (this also compiles every kernel
into Triton's on-disk cache); phase 2 times everything in this process. A variant that fails to compile, or
exceeds its error bound, is reported and the run goes on. Timing: each call is replayed from a CUDA graph
of >= 20 back-to-back calls, each call on the next of C copies of the weights (C · weight bytes >= 128 MB,
so weights come from HBM, not L2); the median over 7 replays divided by the number of calls.

Phase 3 (before the timing, fast) measures the host side of eager calls at M <= 16: the packed
``OneBitLinear`` (bf16, post-LN; the cached words + plan path), the plan alone, the public
``onebit_matmul`` (argument checks + plan cache) and bf16 ``nn.Linear``. "host µs" is the median of
time.perf_counter around one call made right after torch.cuda.synchronize (no sync after: the host cost of
issuing the call); "loop µs" is the wall time per call of 200 back-to-back calls with one sync at the end
(eager throughput: max of host and GPU time).

The timing phase also times, for M <= 16, the decode call (post-LN fused) through the dispatcher.

Error bound of a check (relative to Σ_k |x_k g_k h_n| per output): 2 · (3K + 2) · 2^-24 (the kernel's fp32
summation and the fp32 reference's own) + 2^-8 (bf16 output), + 2^-8 more for the unpack variant whose
cuBLAS result is rounded to bf16 before h.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (576, 1536), (1536, 576))
MS = (1, 4, 16, 256, 4096)
L2_DEFEAT_BYTES = 128 << 20


def _jobs(shapes, ms):
    from lowbit.kernels.onebit import VARIANT_M_RANGE, VARIANTS

    groups = []  # (variant, m) -> all shapes: one worker compiles each specialization once
    for name in VARIANTS:
        lo, hi = VARIANT_M_RANGE[name]
        for m in ms:
            if lo <= m <= hi:
                groups.append((name, m))
    return groups


def _operands(k, n, m, device, seed=0, copies=1):
    from lowbit.quant import pack_bits_int32

    gen = torch.Generator(device=device).manual_seed(seed + 7 * k + n)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
    g = (torch.rand(k, device=device, generator=gen) + 0.5).to(torch.bfloat16)
    h = (torch.rand(n, device=device, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)
    ws = [pack_bits_int32(torch.rand(n, k, device=device, generator=gen) >= 0.5) for _ in range(copies)]
    return x, ws, g, h


def _check(name, k, n, m, device) -> dict:
    from lowbit.kernels.onebit import VARIANTS, UnpackMMConfig, onebit_matmul
    from lowbit.quant import unpack_bits_int32

    x, (w,), g, h = _operands(k, n, m, device)
    t0 = time.perf_counter()
    y = onebit_matmul(x, w, g, h, k, config=name)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t0
    xg = x.float() * g.float()
    s = unpack_bits_int32(w, k, dtype=torch.float32)
    ref = (xg @ s.t()) * h.float()
    terms = (xg.abs().sum(-1, keepdim=True) * h.float().abs()[None, :]).clamp_min(1e-30)
    rel = float(((y.float() - ref).abs() / terms).max())
    bound = 2 * (3 * k + 2) * 2.0**-24 + 2.0**-8
    cfg = VARIANTS[name]
    if isinstance(cfg, UnpackMMConfig) and not cfg.fp32_acc:
        bound += 2.0**-8
    ok = bool(math.isfinite(rel) and rel <= bound)
    return {"variant": name, "K": k, "N": n, "M": m, "max_err_over_terms": rel, "bound": bound, "ok": ok,
            "first_call_s": first_call_s}


def worker(shard: int, shards: int, shapes, ms, path: str) -> None:
    device = torch.device("cuda")
    results = []
    for i, (name, m) in enumerate(_jobs(shapes, ms)):
        if i % shards != shard:
            continue
        for k, n in shapes:
            try:
                results.append(_check(name, k, n, m, device))
            except Exception as exc:  # compile error, launch error: report, go on
                results.append({"variant": name, "K": k, "N": n, "M": m, "ok": False,
                                "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            with open(path, "w") as f:
                json.dump(results, f)
    # the decode-style calls: post-LN fused, through the dispatcher (compiles those specializations too)
    if shard == 0:
        from lowbit.kernels.onebit import onebit_matmul

        for k, n in shapes:
            x, (w,), g, h = _operands(k, n, 1, device)
            onebit_matmul(x, w, g, h, k, layernorm_eps=1e-5)
            onebit_matmul(x, w, g, h, k)
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ timing


def graph_us(fns, min_calls: int = 20, replays: int = 7) -> float:
    """Median time per call in µs of the callables ``fns`` (called in rotation), from CUDA-graph replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream (the kernels' counters live per stream)
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    calls = len(fns) * max(1, -(-min_calls // len(fns)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def copy_bandwidth_GBps() -> float:
    nbytes = 1 << 30
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = graph_us([lambda: dst.copy_(src)], min_calls=10)
    return 2 * nbytes / (t * 1e-6) / 1e9


def time_row(k, n, m, names, device) -> dict:
    from lowbit.kernels.onebit import onebit_matmul

    row = {"K": k, "N": n, "M": m, "packed_bytes": n * (-(-k // 32)) * 4, "bf16_bytes": 2 * n * k}
    copies_b = max(2, min(8, -(-L2_DEFEAT_BYTES // row["bf16_bytes"])))
    wb = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies_b)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    row["bf16_us"] = graph_us([lambda w=w: x @ w.t() for w in wb])
    del wb
    copies = max(2, min(64, -(-L2_DEFEAT_BYTES // row["packed_bytes"])))
    x, ws, g, h = _operands(k, n, m, device, copies=copies)
    row["variants"] = {}
    for name in names:
        try:
            t = graph_us([lambda w=w, name=name: onebit_matmul(x, w, g, h, k, config=name) for w in ws])
            row["variants"][name] = {"us": t}
        except Exception as exc:
            row["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            torch.cuda.synchronize()
    if m <= 16:  # the decode call: dispatcher with the fused post-LN
        try:
            row["dispatch_ln_us"] = graph_us([lambda w=w: onebit_matmul(x, w, g, h, k, layernorm_eps=1e-5)
                                              for w in ws])
        except Exception as exc:
            row["dispatch_ln_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        row["dispatch_us"] = graph_us([lambda w=w: onebit_matmul(x, w, g, h, k) for w in ws])
    except Exception as exc:
        row["dispatch_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    del ws
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------ host


def host_us(f, calls: int = 200) -> tuple[float, float]:
    """(median host µs of one call issued right after a sync, wall µs per call of ``calls`` back-to-back
    calls with one sync at the end)."""
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    torch.cuda.synchronize()
    loop = (time.perf_counter() - t0) / calls
    return sorted(times)[len(times) // 2] * 1e6, loop * 1e6


def _host_row(layer, lin, k: int, n: int, m: int, device, direct: bool = False) -> dict:
    import lowbit.kernels.onebit as kern

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    row = {"K": k, "N": n, "M": m, "direct_launch": direct}
    if direct:  # the same calls with DIRECT_LAUNCH; first check that it gives the JIT path's bits
        ref = layer(x)
        kern.DIRECT_LAUNCH = True
        try:
            same = all(torch.equal(layer(x), ref) for _ in range(3))
            row["direct_same_bits"] = same
            if not same:
                return row
            return {**row, **_host_entries(layer, lin, k, n, m, x, device, ("layer", "plan"))}
        finally:
            kern.DIRECT_LAUNCH = False
    return {**row, **_host_entries(layer, lin, k, n, m, x, device,
                                   ("layer", "plan", "onebit_matmul", "bf16_linear"))}


def _host_entries(layer, lin, k, n, m, x, device, names) -> dict:
    import lowbit.kernels.onebit as kern

    row = {}
    words = layer._kernel_words()
    plan = kern.onebit_matmul_plan(m, n, k, device=device, x_dtype=x.dtype, g_dtype=layer.g.dtype,
                                   layernorm_eps=layer.eps)
    row["plan"] = repr(plan)
    row["plan_launches"] = plan.launches
    g, h = layer.g.detach(), layer.h.detach()
    entries = {
        "layer": lambda: layer(x),
        "plan": lambda: plan(x, words, g, h),
        "onebit_matmul": lambda: kern.onebit_matmul(x, layer.weight_packed, g, h, k, layernorm_eps=layer.eps),
        "bf16_linear": lambda: lin(x),
    }
    for name, f in entries.items():
        if name not in names:
            continue
        try:
            row[f"{name}_host_us"], row[f"{name}_loop_us"] = host_us(f)
        except Exception as exc:
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            torch.cuda.synchronize()
    return row


def host_rows(shapes, ms, device, direct: bool = False) -> list[dict]:
    """Eager host cost per call of the packed layer and its parts (see the module docstring)."""
    import torch.nn as nn

    from lowbit.onebit import OneBitLinear

    rows = []
    nan = float("nan")
    for k, n in shapes:
        layer = OneBitLinear(k, n, packed=True, device=device).pack(torch.bfloat16)
        lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.weight_packed.copy_(torch.randint(0, 256, layer.weight_packed.shape, dtype=torch.uint8,
                                                    device=device))
            layer.g.uniform_(0.5, 1.5)
            layer.h.uniform_(0.001, 0.02)
            for m in ms:
                row = _host_row(layer, lin, k, n, m, device, direct)
                rows.append(row)
                print(f"host{' (DIRECT_LAUNCH)' if direct else ''} K={k} N={n} M={m}: " + " ".join(
                    f"{e} {row.get(e + '_host_us', nan):.1f}/{row.get(e + '_loop_us', nan):.1f}"
                    for e in ("layer", "plan", "onebit_matmul", "bf16_linear")
                ) + f" (host/loop µs; {row.get('plan')}; direct same bits {row.get('direct_same_bits')})",
                    flush=True)
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--check-timeout", type=float, default=100.0, help="seconds for phase 1 (100)")
    ap.add_argument("--budget", type=float, default=170.0, help="stop timing new rows after this many s")
    ap.add_argument("--host-ms", default="1,4,16",
                    help="token counts of the eager host-cost phase ('' skips it)")
    ap.add_argument("--skip-checks", action="store_true", help="no phase 1 (checks in parallel processes)")
    ap.add_argument("--no-direct", action="store_true", help="no phase 4 (host cost with DIRECT_LAUNCH)")
    ap.add_argument("--variants", default="", help="time only variants whose name contains one of these "
                    "comma-separated strings (default: all)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    ms = [int(v) for v in args.ms.split(",") if v]
    if args.worker:
        i, n = (int(v) for v in args.worker.split("/"))
        worker(i, n, shapes, ms, args.worker_out)
        return 0

    t_start = time.perf_counter()
    out_dir = os.environ.get("OUT", "/tmp")
    os.makedirs(out_dir, exist_ok=True)
    import triton

    from lowbit.kernels.onebit import VARIANT_M_RANGE, VARIANTS, select_config

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "variants": {k: repr(v) for k, v in VARIANTS.items()}}
    # phase 1: checks (and compilation) in parallel processes
    procs = []
    for i in range(0 if args.skip_checks else args.workers):
        path = f"/tmp/onebit_probe_check_{i}.json"
        if os.path.exists(path):
            os.remove(path)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{i}/{args.workers}",
               "--worker-out", path, "--shapes", args.shapes, "--ms", args.ms]
        log = open(f"/tmp/onebit_probe_check_{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), path, log))
    deadline = time.perf_counter() + args.check_timeout
    for p, _, _ in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
    checks = []
    for i, (p, path, log) in enumerate(procs):
        log.close()
        if os.path.exists(path):
            with open(path) as f:
                checks.extend(json.load(f))
        if p.returncode not in (0, None):
            with open(f"/tmp/onebit_probe_check_{i}.log") as f:
                tail = f.read()[-600:]
            checks.append({"worker": i, "returncode": p.returncode, "log_tail": tail})
    result["checks"] = checks
    bad = [c for c in checks if not c.get("ok", False)]
    print(f"[{time.perf_counter() - t_start:.0f}s] checks: {sum(c.get('ok', False) for c in checks)} ok, "
          f"{len(bad)} failed or errored", flush=True)
    for c in bad[:40]:
        print("  FAIL", json.dumps(c)[:400], flush=True)
    wrong = {(c["variant"], c["K"], c["N"], c["M"]) for c in bad if "variant" in c}

    # phase 3 (run first: quick): eager host cost per call
    device = torch.device("cuda")
    host_ms = [int(v) for v in args.host_ms.split(",") if v]
    if host_ms:
        result["host"] = host_rows(shapes, host_ms, device)
        with open(os.path.join(out_dir, "onebit_probe.json"), "w") as f:
            json.dump(result, f, indent=1)

    # phase 2: timing
    result["copy_GBps"] = copy_bandwidth_GBps()
    print(f"copy bandwidth {result['copy_GBps']:.0f} GB/s", flush=True)
    rows = []
    for k, n in shapes:
        for m in ms:
            if time.perf_counter() - t_start > args.budget:
                print(f"budget reached: skipped K={k} N={n} M={m}", flush=True)
                continue
            names = [v for v in VARIANTS if VARIANT_M_RANGE[v][0] <= m <= VARIANT_M_RANGE[v][1]]
            if args.variants:
                names = [v for v in names if any(p in v for p in args.variants.split(",") if p)]
            try:
                row = time_row(k, n, m, names, device)
            except Exception as exc:
                print(f"K={k} N={n} M={m}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            row["dispatch_config"] = repr(select_config(m, n, k))
            ok_times = {v: r["us"] for v, r in row["variants"].items()
                        if "us" in r and (v, k, n, m) not in wrong}
            if ok_times:
                best = min(ok_times, key=ok_times.get)
                row["best"], row["best_us"] = best, ok_times[best]
                row["best_vs_bf16"] = row["bf16_us"] / ok_times[best]
                row["best_packed_GBps"] = row["packed_bytes"] / (ok_times[best] * 1e-6) / 1e9
                row["best_frac_copy"] = row["best_packed_GBps"] / result["copy_GBps"]
            rows.append(row)
            times = " ".join(f"{v}={r['us']:.1f}" if "us" in r else f"{v}=ERR"
                             for v, r in row["variants"].items())
            nan = float("nan")
            print(f"K={k} N={n} M={m}: bf16 {row['bf16_us']:.1f} | best {row.get('best')} "
                  f"{row.get('best_us', nan):.1f} ({row.get('best_vs_bf16', nan):.2f}x bf16, "
                  f"{100 * row.get('best_frac_copy', nan):.0f}% copy) | dispatch "
                  f"{row.get('dispatch_us', nan):.1f} ln {row.get('dispatch_ln_us', nan):.1f}"
                  f" | {times}", flush=True)
            with open(os.path.join(out_dir, "onebit_probe.json"), "w") as f:
                json.dump({**result, "rows": rows}, f, indent=1)
    result["rows"] = rows
    with open(os.path.join(out_dir, "onebit_probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    # phase 4 (last: an unproven launch path): the host phase again with DIRECT_LAUNCH
    if host_ms and not args.no_direct:
        result["host_direct"] = host_rows(shapes, host_ms, device, direct=True)
        with open(os.path.join(out_dir, "onebit_probe.json"), "w") as f:
            json.dump(result, f, indent=1)
    print("\n| K | N | M | bf16 µs | best variant | µs | vs bf16 | packed GB/s | % copy | dispatcher µs |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        nan = float("nan")
        print(f"| {r['K']} | {r['N']} | {r['M']} | {r['bf16_us']:.1f} | {r.get('best')} | "
              f"{r.get('best_us', nan):.1f} | {r.get('best_vs_bf16', nan):.2f}× | "
              f"{r.get('best_packed_GBps', nan):.0f} | {100 * r.get('best_frac_copy', nan):.0f}% | "
              f"{r.get('dispatch_us', nan):.1f} |")
    if result.get("host"):
        print("\n| K | N | M | launches (plan) | layer host µs | layer loop µs |"
              " plan host µs | onebit_matmul host µs | bf16 nn.Linear host / loop µs |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in result["host"]:
            nan = float("nan")
            print(f"| {r['K']} | {r['N']} | {r['M']} | {r.get('plan_launches')} | "
                  f"{r.get('layer_host_us', nan):.1f} | {r.get('layer_loop_us', nan):.1f}"
                  f" | {r.get('plan_host_us', nan):.1f} | {r.get('onebit_matmul_host_us', nan):.1f} | "
                  f"{r.get('bf16_linear_host_us', nan):.1f} / {r.get('bf16_linear_loop_us', nan):.1f} |")
    if result.get("host_direct"):
        print("\nDIRECT_LAUNCH | K | N | M | same bits | layer host / loop µs | plan host µs |")
        for r in result["host_direct"]:
            nan = float("nan")
            print(f"| {r['K']} | {r['N']} | {r['M']} | {r.get('direct_same_bits')} | "
                  f"{r.get('layer_host_us', nan):.1f} / {r.get('layer_loop_us', nan):.1f} | "
                  f"{r.get('plan_host_us', nan):.1f} |")
    print(f"[{time.perf_counter() - t_start:.0f}s] JSON: {os.path.join(out_dir, 'onebit_probe.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
