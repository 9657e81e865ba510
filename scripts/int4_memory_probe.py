"""Do the INT4 custom ops read memory they did not write, or write outside their tensors? (device script)

    PYTHONPATH=src python3 scripts/int4_memory_probe.py [--tokens 8192] [--shapes 2048x6144,...]

Every tensor the kernels allocate (torch.empty / zeros / ones / full / *_like / new_*) is placed inside a
larger buffer whose guard bytes (4 KiB before and after) and, for the empty ones, contents are 0xFF (NaN in
every float dtype, -1 in the integer ones); the inputs too. Then the forward and backward custom ops of one
layer (recipe hq, as a GPT layer calls them) run and are compared bit for bit with a run on plain
allocations; a changed guard byte names the allocation (shape, dtype, where).
"""

import argparse
import contextlib
import traceback

import torch

G = 4096  # guard bytes on each side
_FULL = torch.full


class Guarded:
    def __init__(self):
        self.allocs = []

    def make(self, shape, dtype, device, fill=None):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) \
            else tuple(shape)
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * dtype.itemsize
        buf = _FULL((nbytes + 2 * G,), 0xFF, dtype=torch.uint8, device=device)
        t = buf[G:G + nbytes].view(dtype).view(shape)
        if fill is not None:
            t.fill_(fill)
        where = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-3]
                 if "lowbit" in f.filename][-3:]
        self.allocs.append((buf, nbytes, shape, dtype, where))
        return t

    def check(self):
        bad = []
        for buf, nbytes, shape, dtype, where in self.allocs:
            head, tail = buf[:G], buf[G + nbytes:]
            if not (bool((head == 0xFF).all()) and bool((tail == 0xFF).all())):
                n = int((head != 0xFF).sum()) + int((tail != 0xFF).sum())
                bad.append(f"guard of {dtype} {shape} from {where}: {n} bytes changed")
        return bad


@contextlib.contextmanager
def guarded_allocations(g: Guarded):
    real = {name: getattr(torch, name) for name in ("empty", "zeros", "ones", "full", "empty_like",
                                                    "zeros_like", "ones_like")}
    real_new = {name: getattr(torch.Tensor, name) for name in ("new_empty", "new_zeros", "new_ones",
                                                               "new_full")}

    def factory(fill):
        def f(*shape, dtype=None, device=None, **kw):
            if "size" in kw:
                shape = (kw.pop("size"),)
            dev = torch.device(device) if device is not None else torch.device("cpu")
            return g.make(shape, dtype or torch.get_default_dtype(), dev, fill)
        return f

    def full(shape, value, dtype=None, device=None, **kw):
        return g.make((shape,), dtype or torch.get_default_dtype(), torch.device(device or "cpu"), value)

    def like(fill):
        def f(t, dtype=None, device=None, **kw):
            return g.make((t.shape,), dtype or t.dtype, torch.device(device) if device else t.device, fill)
        return f

    def new(fill):
        def f(self, *shape, dtype=None, device=None, **kw):
            return g.make(shape, dtype or self.dtype, torch.device(device) if device else self.device, fill)
        return f

    torch.empty, torch.zeros, torch.ones = factory(None), factory(0), factory(1)
    torch.full = full
    torch.empty_like, torch.zeros_like, torch.ones_like = like(None), like(0), like(1)
    torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones = new(None), new(0), new(1)
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(torch, name, fn)
        for name, fn in real_new.items():
            setattr(torch.Tensor, name, fn)


def run_layer(x, w, gy, seed):
    from lowbit.kernels.int4_linear import _bwd_op, _fwd_op

    outs = _fwd_op(x, w, None, seed, 32, "row", "bit_split", "token", 0.0, "auto", False, torch.bfloat16)
    gx, gw = _bwd_op(gy, *outs[1:], seed, 32, "bit_split", "token", 0.0, "auto", False, True, True,
                     torch.bfloat16, torch.float32)
    return [outs[0], gx, gw, *outs[1:]]


def probe(n, k, m, dev, w_std):
    torch.manual_seed(0)
    x = torch.randn(n, k, device=dev).to(torch.bfloat16)
    w = torch.randn(m, k, device=dev) * w_std
    gy = (torch.randn(n, m, device=dev) * 1e-4).to(torch.bfloat16)
    seed = torch.tensor([123], dtype=torch.int64, device=dev)
    ref = run_layer(x, w, gy, seed)
    g = Guarded()
    with guarded_allocations(g):
        args = [g.make((t.shape,), t.dtype, t.device) for t in (x, w, gy, seed)]
        for a, t in zip(args, (x, w, gy, seed)):
            a.copy_(t)
        got = run_layer(*args)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    names = ["y", "∇x", "∇w", "x_codes", "x_scale", "x_sumsq", "w_codes_t", "w_scale", "x_codes_t"]
    diffs = []
    for name, a, b in zip(names, got, ref):
        if not torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8)
                           if b.dtype.itemsize == 1 else b):
            bad = a.float() != b.float()
            fin = bool(torch.isfinite(a.float()).all())
            diffs.append(f"{name}: {int(bad.sum())}/{a.numel()} differ, finite {fin}")
    for name, a, t in zip(("x", "w", "∇y", "seed"), args, (x, w, gy, seed)):
        if not torch.equal(a, t):
            diffs.append(f"input {name} changed by the ops")
    guards = g.check()
    status = "ok" if not diffs and not guards else "PROBLEM"
    print(f"n={n} k={k} m={m} w_std={w_std}: {status}; {len(g.allocs)} guarded allocations", flush=True)
    for line in diffs + guards:
        print("    ", line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", default="2048x6144,2048x2048,2048x8192,8192x2048,1024x1024,4096x1024",
                    help="KxM,...")
    ap.add_argument("--w-std", default="0.02,0.0029")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape in args.shapes.split(","):
        k, m = (int(v) for v in shape.split("x"))
        for w_std in (float(v) for v in args.w_std.split(",")):
            probe(args.tokens, k, m, dev, w_std)


if __name__ == "__main__":
    main()
