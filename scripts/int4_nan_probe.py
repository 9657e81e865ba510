"""Where an INT4 GPT's training first goes non-finite (device script; eager, no compile).

    PYTHONPATH=src python3 scripts/int4_nan_probe.py --model 1.3b --recipe hq --steps 4

Per step: the loss, every parameter whose gradient is not finite (first five, by name), the largest |grad|
of the INT4 layers, and the first Int4Linear (in call order) whose forward output or input gradient is not
finite. Built as ``lowbit bench int4-train`` builds its models (same seed, batches, AdamW).
"""

import argparse
import math

import torch

from lowbit.bench.int4_train import make_batches
from lowbit.int4 import Int4TrainingConfig, convert_to_int4_training
from lowbit.models import GPT, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.3b", help="a GPTConfig size name, or LAYERSxWIDTHxHEADS")
    ap.add_argument("--recipe", default="hq")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--compile-mode", default="none", choices=("none", "default", "reduce-overhead"),
                    help="torch.compile the model (then no per-layer hooks: gradients and weights only)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (aot_eager: the same graphs without inductor's code)")
    ap.add_argument("--inductor", default="", help="torch._inductor.config settings, e.g. "
                    "comprehensive_padding=False,custom_op_default_layout_constraint=needs_exact_strides")
    args = ap.parse_args()
    import torch._inductor.config as ic

    for item in filter(None, args.inductor.split(",")):
        key, value = item.split("=")
        setattr(ic, key, {"True": True, "False": False}.get(value, value))
    dev = torch.device("cuda")
    if "x" in args.model:  # layers x width x heads, e.g. 24x2048x16 (context 1024)
        n_layer, n_embd, n_head = (int(v) for v in args.model.split("x"))
        cfg = GPTConfig(vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024)
    else:
        cfg = GPTConfig.named(args.model, 50304)
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    convert_to_int4_training(model, Int4TrainingConfig.named(args.recipe, backend=args.backend))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    batches = make_batches(args.steps, args.batch_size, cfg.block_size, cfg.vocab_size, 0)
    events = []

    def fwd_hook(name):
        def hook(mod, inp, out):
            if not torch.isfinite(out).all():
                events.append(f"forward output of {name} not finite (input finite: "
                              f"{bool(torch.isfinite(inp[0]).all())})")
        return hook

    def bwd_hook(name):
        def hook(mod, grad_in, grad_out):
            gi, go = grad_in[0], grad_out[0]
            if gi is not None and not torch.isfinite(gi).all():
                ok = bool(torch.isfinite(go).all())
                gmax = float(go.float().abs().amax())
                events.append(f"∇input of {name} not finite (∇output finite: {ok}, max|∇out| {gmax:.3e})")
        return hook

    step_fn = model
    if args.compile_mode != "none":
        mode = None if args.compile_mode == "default" else args.compile_mode
        step_fn = torch.compile(model, mode=mode, backend=args.compile_backend)
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Int4Linear" and step_fn is model:
            mod.register_forward_hook(fwd_hook(name))
            mod.register_full_backward_hook(bwd_hook(name))
    for step, idx in enumerate(batches):
        events.clear()
        x, y = idx[:, :-1].to(dev), idx[:, 1:].to(dev)
        if args.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_fn(x, y)
        loss.backward()
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        bad = [n for n, g in grads if not torch.isfinite(g).all()]
        gmax = max(float(g.abs().amax()) for n, g in grads if "attn" in n or "mlp" in n)
        print(f"step {step}: loss {float(loss.detach()):.4f}; non-finite grads {len(bad)} {bad[:5]}; "
              f"max|grad| (blocks) {gmax:.3e}", flush=True)
        for e in events[:6]:
            print("   ", e, flush=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        wbad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if wbad:
            print(f"   non-finite weights after the step: {len(wbad)} {wbad[:5]}", flush=True)
        if not math.isfinite(float(loss.detach())):
            break


if __name__ == "__main__":
    main()
