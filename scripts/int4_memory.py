"""Where INT4 training's memory goes: GPT (default 350m) eager and compiled, bf16 vs INT4.

For each method: memory allocated with the model and AdamW state (after one step), the activations held
after a forward (allocated - that), and the peak over forward + backward + step, in GiB. Device only.
    PYTHONPATH=src python3 scripts/int4_memory.py [--model 350m] [--methods bf16,int4-hq] [--compile]
"""
from __future__ import annotations

import argparse
import json

import torch

from lowbit.bench.int4_train import _build, make_batches


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="350m")
    p.add_argument("--methods", default="bf16,int4-hq")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--vocab-size", type=int, default=50304)
    a = p.parse_args()
    a.seed, a.lr, a.backend = 0, 3e-4, "triton"
    dev = torch.device("cuda")
    for method in a.methods.split(","):
        row = _measure(method, a, dev)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def _measure(method: str, a, dev: torch.device) -> dict:
    gib = 2.0 ** 30
    cfg, model, opt, _ = _build(method, a, dev)
    fn = torch.compile(model) if a.compile else model
    batches = make_batches(4, a.batch_size, cfg.block_size, cfg.vocab_size, 0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)

    def step(idx, probe=False):
        x, y = idx[:, :-1].to(dev), idx[:, 1:].to(dev)
        with amp:
            _, loss = fn(x, y)
        held = torch.cuda.memory_allocated() if probe else None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return held

    for i in range(2):
        step(batches[i])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    held = step(batches[2], probe=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    params = sum(q.numel() * q.element_size() for q in model.parameters())
    return {"method": method, "compiled": a.compile, "params_GiB": params / gib,
            "model_and_state_GiB": base / gib, "activations_GiB": (held - base) / gib, "peak_GiB": peak / gib,
            "backward_transient_GiB": (peak - held) / gib}

if __name__ == "__main__":
    main()
