"""Where the time of the INT4 Triton path goes (issue 4), and why its step-0 loss differs from the emulation.

Run on the GPU machine from the repository root: ``PYTHONPATH=src python3 scripts/int4_profile.py --out DIR``.
Parts (``--parts``, comma-separated; default all):

- ``layer``: one fwd+bwd of ``int4_linear_triton`` per recipe and shape: GPU time (do_bench), host time to
  enqueue one step (after a sync, no sync at the end), cProfile of the host side (top functions by own
  time) and torch.profiler's kernel table.
- ``launch``: host time of one launch of a tiny Triton kernel and of one tiny cuBLAS call (the floor).
- ``onebit``: host time of one eager ``onebit_matmul`` at M = 1 (4096 x 11008), with its cProfile.
- ``e2e``: GPT 350m, bf16 vs INT4 hq, eager: step time, host enqueue time and the profiler's top ops.
- ``e2e_graph``: GPT 350m (``--e2e-model``) as ``lowbit bench int4-train --compile-mode reduce-overhead``
  runs it (same build, batches and step): wall time per step, the GPU kernel time per step under
  torch.profiler (kernels replayed inside CUDA graphs included) by kernel and by family, and dynamo's
  counters (graph breaks, CUDA-graph skips). ``--e2e-methods`` picks the methods (default bf16,int4-hq).
- ``gemv``: OneBit at M = 1, the GPU time of each kernel of one call (torch.profiler), weights rotated
  through copies larger than L2, for the variants in ``--gemv-variants`` and the shapes in ``--gemv-shapes``.
- ``kernels``: torch.profiler's kernel table (GPU time per kernel) of one fwd+bwd at 16384 x 4096 x 4096 for
  the hq recipes, and the bytes each quantizer moves against a copy of the same bytes.
- ``decode``: OneBit decode (SmolLM2-135M shape, random weights): the per-kernel GPU time of one eager step
  for bf16 projections, packed OneBit projections, OneBit without its LayerNorm, and bf16 projections
  followed by the same LayerNorm; plus each model's CUDA-graph step time.
- ``agree``: GPT small under bf16 autocast, both backends on the same inputs of every INT4 layer at step 0:
  per layer the relative output gap and the fraction of X / W codes that differ.
Everything printed and written to ``DIR/profile.json`` (+ ``*.txt`` tables).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch

from lowbit.bench.int4_linear import _host_ms  # the benchmark's own host-time measure


def _cprofile(fn, n=10, top=25) -> str:
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def _kernel_table(fn, n=3, rows=30) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def part_layer(args, out: dict, outdir: Path) -> None:
    import triton.testing

    from lowbit.bench.int4_linear import parse_ours
    from lowbit.kernels import int4_linear as lin4

    res = out.setdefault("layer", [])
    for shape in [(8192, 1024, 4096), (16384, 2048, 2048), (16384, 4096, 4096)]:
        m, k, n = shape
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

        def bf16(x=x, w=w, gy=gy):
            y = torch.nn.functional.linear(x, w)
            return torch.autograd.grad(y, (x, w), gy)

        variants = {"bf16": bf16}
        for name in ("ours-rtn", "ours-hq", "ours-hq-lss", "ours-hq+tensor", "ours-hq-lss+tensor"):
            kw = parse_ours(name)
            gen = torch.Generator(device="cuda").manual_seed(0)

            def step(kw=kw, gen=gen, x=x, w=w, gy=gy):
                y = lin4.int4_linear_triton(x, w, generator=gen, **kw)
                return torch.autograd.grad(y, (x, w), gy)
            variants[name] = step
        for name, fn in variants.items():
            fn()
            gpu = float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
            host = _host_ms(fn)
            row = {"shape": shape, "variant": name, "do_bench_ms": gpu, "host_enqueue_ms": host}
            res.append(row)
            print(f"layer {shape} {name:<20} do_bench {gpu:7.3f} ms  host enqueue {host:7.3f} ms", flush=True)
            if shape == (8192, 1024, 4096) and name in ("ours-hq-lss", "ours-rtn"):
                text = _cprofile(fn)
                (outdir / f"cprofile_{name}.txt").write_text(text)
                print(text[:6000])
                tab = _kernel_table(fn)
                (outdir / f"kernels_{name}.txt").write_text(tab)
                print(tab[:8000])


def _kernel_rows(fn, n=5) -> list[dict]:
    """GPU time per kernel name (µs per call of ``fn``, summed over its launches) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        r = rows.setdefault(ev.name, [0.0, 0])
        r[0] += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        r[1] += 1
    out = [{"kernel": k[:90], "us_per_call": v[0] / n, "launches_per_call": v[1] / n}
           for k, v in rows.items()]
    return sorted(out, key=lambda r: -r["us_per_call"])


def part_kernels(args, out: dict, outdir: Path) -> None:
    import triton.testing

    res = out.setdefault("kernels", {})
    src = torch.empty(16384, 4096, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = float(triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median"))
    res["copy_bf16_16384x4096_us"] = copy_ms * 1e3
    print(f"copy 16384x4096 bf16 (268 MB moved): {copy_ms * 1e3:.1f} us", flush=True)
    for shape in args.kshapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        _kernels_of_shape(args, res if shape == "16384x4096x4096" else res.setdefault(shape, {}), m, k, n)


def _kernels_of_shape(args, res: dict, m: int, k: int, n: int) -> None:
    import triton.testing

    from lowbit.bench.int4_linear import parse_ours
    from lowbit.kernels import int4_linear as lin4

    print(f"-- M x K x N = {m} x {k} x {n}", flush=True)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=getattr(torch, args.wdtype), requires_grad=True)
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    bf = float(triton.testing.do_bench(lambda: torch.autograd.grad(x @ w.to(x.dtype).t(), (x, w), gy),
                                       warmup=10, rep=50, return_mode="median"))
    res["bf16_do_bench_ms"] = bf
    print(f"== bf16: do_bench {bf:.3f} ms", flush=True)
    for name in args.recipes.split(","):
        kw = parse_ours(name)
        gen = torch.Generator(device="cuda").manual_seed(0)

        def step(kw=kw, gen=gen):
            y = lin4.int4_linear_triton(x, w, generator=gen, **kw)
            return torch.autograd.grad(y, (x, w), gy)

        step()
        total = float(triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median"))
        rows = _kernel_rows(step)
        res[name] = {"do_bench_ms": total, "kernels": rows}
        print(f"== {name}: do_bench {total:.3f} ms, kernel sum {sum(r['us_per_call'] for r in rows):.0f} us",
              flush=True)
        for r in rows:
            print(f"   {r['us_per_call']:8.1f} us  x{r['launches_per_call']:.0f}  {r['kernel']}", flush=True)


def part_decode(args, out: dict, outdir: Path) -> None:
    import torch.nn.functional as F

    from lowbit.bench import onebit as bo

    res = out.setdefault("decode", {})
    dev = torch.device("cuda")
    dtype = torch.bfloat16

    class _Bf16LN(torch.nn.Linear):
        def forward(self, x):
            return F.layer_norm(super().forward(x).float(), (self.out_features,), eps=1e-5).to(x.dtype)

    class _NoLN(bo._PackedOneBitLinear):
        def forward(self, x):
            from lowbit.kernels.onebit import onebit_matmul
            return onebit_matmul(x, self.signs_packed, self.g, self.h, self.in_features, layernorm_eps=None)

    def linear(cls):
        def make(i, o, gen):
            lin = cls(i, o, bias=False, device=dev, dtype=dtype)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02, generator=gen)
            return lin
        return make

    makers = {"bf16": linear(torch.nn.Linear), "bf16+ln": linear(_Bf16LN),
              "onebit": lambda i, o, gen: bo._PackedOneBitLinear(i, o, dtype, dev, gen),
              "onebit-noln": lambda i, o, gen: _NoLN(i, o, dtype, dev, gen)}
    for name, make in makers.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        model = bo._Decoder(bo.SMOLLM2_135M, lambda i, o, make=make, gen=gen: make(i, o, gen), dtype, dev,
                            256, gen)
        rate, _ = bo._decode_rate(model, 200, graph=True)
        tok = torch.ones(1, dtype=torch.long, device=dev)
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        rows = _kernel_rows(lambda model=model, tok=tok, pos=pos: model.step(tok, pos), n=3)
        busy = sum(r["us_per_call"] for r in rows)
        res[name] = {"graph_tokens_per_s": rate, "graph_us_per_token": 1e6 / rate, "kernel_busy_us": busy,
                     "launches": sum(r["launches_per_call"] for r in rows), "kernels": rows[:25]}
        print(f"== decode {name}: graph {rate:.1f} tok/s ({1e6 / rate:.0f} us/token), GPU busy {busy:.0f} us "
              f"in {res[name]['launches']:.0f} launches", flush=True)
        for r in rows[:14]:
            print(f"   {r['us_per_call']:8.1f} us  x{r['launches_per_call']:.0f}  {r['kernel']}", flush=True)
        del model
        torch.cuda.empty_cache()


def part_launch(args, out: dict, outdir: Path) -> None:
    from lowbit.kernels import hadamard_quant as hq

    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, 16, device="cuda", dtype=torch.bfloat16)
    r = {}
    r["hadamard_quantize_tiny_ms"] = _host_ms(lambda: hq.hadamard_quantize(x, 32, granularity="row",
                                                                       codes_dtype=torch.float8_e4m3fn), 50)
    r["torch_mm_tiny_ms"] = _host_ms(lambda: a @ a, 50)
    r["torch_add_tiny_ms"] = _host_ms(lambda: a + a, 50)
    print("launch floors", r, flush=True)
    text = _cprofile(lambda: hq.hadamard_quantize(x, 32, granularity="row", codes_dtype=torch.float8_e4m3fn),
                     n=200, top=20)
    (outdir / "cprofile_hadamard_quantize.txt").write_text(text)
    print(text[:4000])
    out["launch"] = r


def part_onebit(args, out: dict, outdir: Path) -> None:
    from lowbit.kernels import onebit as ob
    from lowbit.quant import pack_bits

    k, n = 4096, 11008
    signs = torch.randint(0, 2, (n, k), device="cuda", dtype=torch.bool)
    packed = pack_bits(signs)
    g = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

    def call():
        return ob.onebit_matmul(x, packed, g, h, n=k)
    try:
        call()
        r = {"host_enqueue_ms": _host_ms(call, 50)}
        text = _cprofile(call, n=200, top=25)
        (outdir / "cprofile_onebit.txt").write_text(text)
        print("onebit", r, flush=True)
        print(text[:5000])
        out["onebit"] = r
    except Exception as exc:  # noqa: BLE001
        out["onebit"] = {"error": repr(exc)}
        print("onebit failed", repr(exc))


def part_e2e(args, out: dict, outdir: Path) -> None:
    from lowbit.int4 import Int4TrainingConfig, convert_to_int4_training
    from lowbit.models import GPT, GPTConfig

    res = out.setdefault("e2e", {})
    for method in ("bf16", "int4-hq"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.named("350m", 50304)).cuda()
        if method != "bf16":
            convert_to_int4_training(model, Int4TrainingConfig.named(method[5:], backend="triton"))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        idx = torch.randint(0, 50304, (8, 1025), device="cuda")

        def step(model=model, opt=opt, idx=idx):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        step_ms = 1000 * (time.perf_counter() - t0) / 5
        host = _host_ms(step, 3)
        res[method] = {"step_ms": step_ms, "host_enqueue_ms": host}
        print(f"e2e {method}: step {step_ms:.1f} ms, host enqueue {host:.1f} ms", flush=True)
        tab = _kernel_table(step, n=1, rows=40)
        (outdir / f"e2e_{method}.txt").write_text(tab)
        print(tab[:9000])
        if method != "bf16":
            text = _cprofile(step, n=2, top=30)
            (outdir / "cprofile_e2e.txt").write_text(text)
            print(text[:7000])
        del step
        torch.cuda.empty_cache()


_FAMILIES = (  # (family, substrings of the kernel name), first match wins
    ("lowbit int4", ("_hq_kernel", "_bit_split", "_gather", "_int8_mm", "_fp8_", "_lss", "hadamard", "int4")),
    ("gemm (cuBLAS/CUTLASS)", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "splitKreduce")),
    ("attention", ("flash", "fmha", "attention")),
    ("inductor fused", ("triton_",)),
    ("memcpy/memset", ("memcpy", "memset", "Memcpy", "Memset")),
)


def _family(name: str) -> str:
    for fam, keys in _FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def part_e2e_graph(args, out: dict, outdir: Path) -> None:
    from torch._dynamo.utils import counters

    from lowbit.bench import int4_train as bt

    res = out.setdefault("e2e_graph", {})
    ns = argparse.Namespace(model=args.e2e_model, vocab_size=50304, lr=3e-4, seed=0, backend="triton",
                            compile=True, compile_mode="reduce-overhead")
    device = torch.device("cuda")
    batches = bt.make_batches(10, 8, 1024, 50304, 0)
    for method in args.e2e_methods.split(","):
        torch._dynamo.reset()
        counters.clear()
        _, model, opt, _ = bt._build(method, ns, device)
        step_fn = torch.compile(model, mode="reduce-overhead")

        def step(idx, step_fn=step_fn, opt=opt):
            x, y = idx[:, :-1].to(device), idx[:, 1:].to(device)
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = step_fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach().clone()
        t0 = time.perf_counter()
        for i in range(3):
            step(batches[i])
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(3, 8):
            step(batches[i])
        torch.cuda.synchronize()
        step_ms = 1000 * (time.perf_counter() - t0) / 5
        host = _host_ms(lambda: step(batches[8]), 3)
        rows = _kernel_rows(lambda: step(batches[9]), n=2)
        fams: dict[str, list] = {}
        for r in rows:
            f = fams.setdefault(_family(r["kernel"]), [0.0, 0.0])
            f[0] += r["us_per_call"]
            f[1] += r["launches_per_call"]
        gpu_ms = sum(r["us_per_call"] for r in rows) / 1e3
        launches = sum(r["launches_per_call"] for r in rows)
        res[method] = {
            "step_ms": step_ms, "warmup_s": warm_s, "host_enqueue_ms": host, "gpu_kernel_ms": gpu_ms,
            "kernels_per_step": launches,
            "families_ms": {k: {"ms": v[0] / 1e3, "launches": v[1]} for k, v in fams.items()},
            "top_kernels": rows[:40],
            "counters": {k: dict(v) for k, v in counters.items() if v},
        }
        print(f"e2e_graph {method}: step {step_ms:.1f} ms (warm-up {warm_s:.0f} s), "
              f"host enqueue {host:.1f} ms, "
              f"GPU kernels {gpu_ms:.1f} ms in {launches:.0f} launches", flush=True)
        for k, v in sorted(fams.items(), key=lambda kv: -kv[1][0]):
            print(f"   {k:<24} {v[0] / 1e3:8.2f} ms  {v[1]:7.0f} launches", flush=True)
        for r in rows[:30]:
            print(f"   {r['us_per_call']:9.1f} us  x{r['launches_per_call']:<5.0f} {r['kernel']}", flush=True)
        print("   counters:", json.dumps(res[method]["counters"], default=str)[:3000], flush=True)
        del step_fn, model, opt
        torch.cuda.empty_cache()


def part_gemv(args, out: dict, outdir: Path) -> None:
    from lowbit.kernels import onebit as ob
    from lowbit.quant import pack_bits

    res = out.setdefault("gemv", {})
    for shape in args.gemv_shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        copies = max(2, -(-(128 << 20) // (n * k // 8)))
        packed = [pack_bits(torch.randint(0, 2, (n, k), device="cuda", dtype=torch.bool))
                  for _ in range(copies)]
        g = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for name in args.gemv_variants.split(","):
            it = iter(range(1 << 30))

            def call(name=name, it=it, packed=packed, x=x, g=g, h=h, k=k):
                return ob.onebit_matmul(x, packed[next(it) % len(packed)], g, h, n=k, config=name or None)
            try:
                rows = _kernel_rows(call, n=2 * copies)
            except Exception as exc:  # noqa: BLE001
                res[f"{shape} {name}"] = {"error": repr(exc)}
                print("gemv", shape, name, "failed", repr(exc), flush=True)
                continue
            res[f"{shape} {name}"] = rows
            print(f"gemv {shape} {name or 'dispatcher'}: " + ", ".join(
                f"{r['kernel'][:40]} {r['us_per_call']:.2f} us x{r['launches_per_call']:.0f}" for r in rows),
                flush=True)


def part_agree(args, out: dict, outdir: Path) -> None:
    from lowbit.int4 import Int4Linear, Int4TrainingConfig, convert_to_int4_training
    from lowbit.int4.function import (
        _quant_granularity,
        compute_scale,
        hadamard_rotate,
        quantize_with_scale,
    )
    from lowbit.kernels import int4_linear as lin4
    from lowbit.models import GPT, GPTConfig

    res = out.setdefault("agree", {})
    for recipe in ("hq", "rtn"):
        torch.manual_seed(0)
        size = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}
        model = GPT(GPTConfig.named("tiny", 64, **size)).cuda()
        convert_to_int4_training(model, Int4TrainingConfig.named(recipe, backend="emulate"))
        inputs = {}
        for name, mod in model.named_modules():
            if isinstance(mod, Int4Linear):
                mod.register_forward_pre_hook(
                    lambda m, a, name=name, inputs=inputs: inputs.__setitem__(name, a[0].detach()))
        idx = torch.randint(0, 64, (8, 257), generator=torch.Generator().manual_seed(1)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss_e = model(idx[:, :-1], idx[:, 1:])
        rows = []
        for name, mod in model.named_modules():
            if not isinstance(mod, Int4Linear):
                continue
            x2d = inputs[name].reshape(-1, mod.in_features).to(torch.bfloat16)
            spec = mod.spec
            with torch.autocast("cuda", enabled=False):
                y_t, saved = lin4.int4_linear_fwd(x2d, mod.weight.contiguous(), None,
                                                  block_size=spec.block_size, granularity=spec.granularity,
                                                  out_dtype=torch.bfloat16)
                vx, vw = hadamard_rotate(x2d, spec.block_size), hadamard_rotate(mod.weight, spec.block_size)
                sx = compute_scale(vx, 4, _quant_granularity(spec.granularity, "x"))
                sw = compute_scale(vw, 4, _quant_granularity(spec.granularity, "w"))
                qx, qw = quantize_with_scale(vx, sx, 4), quantize_with_scale(vw, sw, 4)
                y_e = ((qx.float() @ qw.float().t()) * sx * sw.reshape(1, -1)).to(torch.bfloat16)
            tx = saved.x_codes.float()
            tw = saved.w_codes_t.float().t()
            row = {
                "layer": name,
                "x_code_diff_frac": float((tx != qx.float()).float().mean()),
                "w_code_diff_frac": float((tw != qw.float()).float().mean()),
                "x_scale_rel": float(((saved.x_scale.reshape(-1) - sx.reshape(-1)).abs()
                                      / sx.reshape(-1)).max()),
                "w_scale_rel": float(((saved.w_scale.reshape(-1) - sw.reshape(-1)).abs()
                                      / sw.reshape(-1)).max()),
                "y_rel": float((y_t.float() - y_e.float()).norm() / y_e.float().norm()),
            }
            rows.append(row)
            print("agree", recipe, row, flush=True)
        res[recipe] = {"loss_emulated": float(loss_e), "layers": rows}


def part_grads(args, out: dict, outdir: Path) -> None:
    """GPT small under bf16 autocast, one step: the Triton backend with reference draws against the
    emulation (same weights, same generator seeds): per parameter the relative gradient gap and the fraction
    of gradient entries whose sign differs; then the loss after one AdamW step for both."""
    from lowbit.int4 import Int4Linear, Int4TrainingConfig, convert_to_int4_training
    from lowbit.models import GPT, GPTConfig

    res = out.setdefault("grads", {})
    for recipe in ("hq", "hq-lss"):
        models = {}
        for backend in ("emulate", "triton", "emulate-again"):
            torch.manual_seed(0)
            size = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}
            model = GPT(GPTConfig.named("tiny", 64, **size)).cuda()
            convert_to_int4_training(model, Int4TrainingConfig.named(recipe, backend=backend.split("-")[0],
                                                                     seed=0))
            for m in model.modules():
                if isinstance(m, Int4Linear):
                    m.reference_draws = True
            models[backend] = model
        idx = torch.randint(0, 64, (8, 257), generator=torch.Generator().manual_seed(1)).cuda()
        losses = {}
        for backend, model in models.items():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            losses[backend] = [float(loss)]
        rows = []
        for (name, pe), pt, p2 in zip(models["emulate"].named_parameters(), models["triton"].parameters(),
                                      models["emulate-again"].parameters()):
            ge, gt, g2 = pe.grad.float(), pt.grad.float(), p2.grad.float()
            rows.append({"param": name, "rel": float((gt - ge).norm() / ge.norm().clamp_min(1e-30)),
                         "rel_emu_vs_emu": float((g2 - ge).norm() / ge.norm().clamp_min(1e-30)),
                         "sign_diff": float(((gt > 0) != (ge > 0)).float().mean()),
                         "ratio": float(gt.norm() / ge.norm().clamp_min(1e-30))})
        for backend, model in models.items():
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            idx2 = torch.randint(0, 64, (8, 257), generator=torch.Generator().manual_seed(2)).cuda()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx2[:, :-1], idx2[:, 1:])
            losses[backend].append(float(loss))
        res[recipe] = {"losses": losses, "params": rows}
        print("grads", recipe, "losses", losses, flush=True)
        for r in sorted(rows, key=lambda r: -r["rel"])[:12]:
            print("  ", r, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/profile")
    ap.add_argument("--parts", default="agree,launch,layer,onebit,e2e")
    ap.add_argument("--recipes", default="ours-hq,ours-hq+tensor,ours-hq-lss", help="for the kernels part")
    ap.add_argument("--kshapes", default="16384x4096x4096", help="MxKxN,... for the kernels part")
    ap.add_argument("--wdtype", default="bfloat16",
                    help="weight dtype of the kernels part (float32: a GPT's parameters under autocast)")
    ap.add_argument("--e2e-methods", default="bf16,int4-hq", help="for the e2e_graph part")
    ap.add_argument("--e2e-model", default="350m", help="GPT size of the e2e_graph part")
    ap.add_argument("--gemv-shapes", default="4096x11008,8192x8192", help="KxN,... for the gemv part")
    ap.add_argument("--gemv-variants", default=",planes_n64_kw32,planes_n32_kw32",
                    help="VARIANTS names for the gemv part (empty: the dispatcher)")
    args = ap.parse_args()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    parts = {"layer": part_layer, "launch": part_launch, "onebit": part_onebit, "e2e": part_e2e,
             "agree": part_agree, "grads": part_grads, "kernels": part_kernels, "decode": part_decode,
             "e2e_graph": part_e2e_graph, "gemv": part_gemv}
    for p in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            parts[p](args, out, outdir)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next part
            import traceback

            traceback.print_exc()
            out[p + "_error"] = repr(exc)
        print(f"== part {p}: {time.perf_counter() - t0:.1f} s", flush=True)
        (outdir / "profile.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
