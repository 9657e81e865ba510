"""Probe for issue 4: the fp16 products of the per-channel ("row") INT4 backward, cuBLAS + a rotation pass
against the Triton GEMM with the rotation (and scales) in its epilogue, at 16384 x 4096 x 4096.

    PYTHONPATH=src python3 scripts/int4_gemm_probe.py [--json OUT.json]

∇X: v (fp16 integers of the bit split) · (s_w ⊙ W codes)ᵀ, then ·H per row: (A) cuBLAS fp16 with fp32 output
+ ``hadamard_rows`` (the "cublas" path until 2026-11-24,
when the fold replaced it); (B) ``_scaled_mm_triton`` fp16 x fp16 with several tiles;
(C) the same with int8 v converted on chip (today's "triton" path).
∇W: gathered rows (fp16) a (R, M), b (R, K): (A) cuBLAS ``aᵀ b`` + ``hadamard_rows``; (B) transposed gather +
``_scaled_mm_triton`` with the rotation in its epilogue. Each variant is checked against (A) (relative max
error over the max magnitude) and timed with ``triton.testing.do_bench`` (median).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from lowbit.kernels import hadamard_quant as hq
from lowbit.kernels import int4_linear as lin
from lowbit.kernels.int4_matmul import _scaled_mm_triton

CONFIGS = {
    "128x128x64_w8_s4": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                         "num_stages": 4},
    "128x128x64_w4_s4": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                         "num_stages": 4},
    "256x128x64_w8_s3": {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                         "num_stages": 3},
    "128x128x128_w8_s3": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
                          "num_stages": 3},
    "256x128x64_w8_s4": {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                         "num_stages": 4},
}


def _bench(fn) -> float:
    fn()
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) * 1e3


def _err(y, ref) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--shape", default="16384,4096,4096", help="tokens N, in K, out M")
    args = ap.parse_args()
    n, k, m = map(int, args.shape.split(","))
    dev = "cuda"
    torch.manual_seed(0)
    blk = 32
    out: dict = {"shape": (n, k, m), "device": torch.cuda.get_device_name(), "dx": {}, "dw": {}}
    # operands as the backward sees them
    v8 = torch.randint(-105, 106, (n, m), device=dev, dtype=torch.int8)
    v16 = v8.to(torch.float16)
    w_codes_t = torch.randint(-7, 8, (k, m), device=dev, dtype=torch.int8)
    w_scale = torch.rand(m, 1, device=dev) * 0.01 + 0.001
    s_lo = torch.rand(n, 1, device=dev) * 1e-3
    norm = lin._pow2_normalizer(w_scale)
    w_scaled = (w_codes_t.float() * (w_scale.reshape(1, m) / norm)).to(torch.float16)  # (K, M)
    rs = s_lo.reshape(-1).contiguous()

    def dx_cublas():
        prod = lin._mm_fp32(v16, w_scaled.t())
        return hq._hadamard_rows(prod, blk, s_lo, norm, torch.bfloat16)

    ref = dx_cublas()
    out["dx"]["cublas+rotation"] = {"us": _bench(dx_cublas), "err": 0.0}
    out["dx"]["scaled_codes_f16 (W side, per step)"] = {
        "us": _bench(lambda: (w_codes_t.float() * (w_scale.reshape(1, m) / norm)).to(torch.float16))}
    for name, cfg in CONFIGS.items():
        for a_name, a in (("f16", v16), ("int8", v8)):
            key = f"triton_{a_name}_{name}"
            try:
                def fn(a=a, cfg=cfg):
                    return _scaled_mm_triton(a, None, w_scaled, rs, norm.reshape(1), blk, torch.bfloat16, cfg)
                y = fn()
                out["dx"][key] = {"us": _bench(fn), "err": _err(y, ref)}
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported
                out["dx"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            print("dx", key, out["dx"][key], flush=True)
    print("dx cublas+rotation", out["dx"]["cublas+rotation"], flush=True)

    # ∇W: R = n rows (no sampling), factor per row on the inner dimension
    x_codes = torch.randint(-7, 8, (n, k), device=dev, dtype=torch.int8).to(torch.float8_e4m3fn)
    factor = (torch.rand(n, device=dev) * 1e-4).contiguous()
    fnorm = lin._pow2_normalizer(factor)

    def dw_cublas():
        a, b = hq._gather(v8, x_codes, None, factor, n, out_dtype=torch.float16, norm=fnorm)
        prod = lin._mm_fp32(a.t(), b)
        return hq._hadamard_rows(prod, blk, None, fnorm, torch.float32)

    ref_w = dw_cublas()
    out["dw"]["gather+cublas+rotation"] = {"us": _bench(dw_cublas), "err": 0.0}
    a, b = hq._gather(v8, x_codes, None, factor, n, out_dtype=torch.float16, norm=fnorm)
    out["dw"]["gather only"] = {"us": _bench(lambda: hq._gather(v8, x_codes, None, factor, n,
                                                                 out_dtype=torch.float16, norm=fnorm))}
    out["dw"]["cublas only"] = {"us": _bench(lambda: lin._mm_fp32(a.t(), b))}
    out["dw"]["gather transposed only"] = {"us": _bench(lambda: hq._gather(
        v8, x_codes, None, factor, n, out_dtype=torch.float16, norm=fnorm, transposed=True))}
    ones_m = torch.ones(1, device=dev)
    for name, cfg in CONFIGS.items():
        key = f"gatherT+triton_{name}"
        try:
            def fn(cfg=cfg):
                at, bt = hq._gather(v8, x_codes, None, factor, n, out_dtype=torch.float16, norm=fnorm,
                                    transposed=True)
                return _scaled_mm_triton(at, None, bt, ones_m, fnorm.reshape(1), blk, torch.float32, cfg)
            y = fn()
            at, bt = hq._gather(v8, x_codes, None, factor, n, out_dtype=torch.float16, norm=fnorm,
                                transposed=True)
            out["dw"][key] = {"us": _bench(fn), "err": _err(y, ref_w),
                              "gemm_only_us": _bench(lambda cfg=cfg, at=at, bt=bt: _scaled_mm_triton(
                                  at, None, bt, ones_m, fnorm.reshape(1), blk, torch.float32, cfg))}
        except Exception as exc:  # noqa: BLE001
            out["dw"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        print("dw", key, out["dw"][key], flush=True)
    for part in ("dx", "dw"):
        print(f"== {part}")
        for key, r in out[part].items():
            print(f"   {key:<40} {r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
