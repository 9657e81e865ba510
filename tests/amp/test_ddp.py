"""fp32 all-reduce comm hook: real DDP over gloo with 3 CPU processes (the test module cannot be pickled for
torch.multiprocessing under pytest's importlib mode, so the workers are scripts run in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from lowbit.amp import register_fp32_allreduce

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist, torch.nn as nn
    from lowbit.amp import register_fp32_allreduce

    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.manual_seed(0)
        base = nn.Linear(64, 32, bias=False).to(dtype)
        ddp = nn.parallel.DistributedDataParallel(base)
        register_fp32_allreduce(ddp)
        local = nn.Linear(64, 32, bias=False).to(dtype)
        local.load_state_dict(base.state_dict())

        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        x = (torch.randn(16, 64, generator=g) * (1 + rank)).to(dtype)
        ddp(x).float().pow(2).sum().backward()
        local(x).float().pow(2).sum().backward()

        grads = [torch.empty_like(local.weight.grad) for _ in range(world)]
        dist.all_gather(grads, local.weight.grad)
        stacked = torch.stack(grads).double()
        mean64 = stacked.mean(0)
        got = base.weight.grad
        results[str(dtype)] = {
            "equal": torch.equal(got, mean64.to(dtype)),  # the float64 mean rounded once
            "max_abs_diff": (got.double() - mean64).abs().max().item(),
            "max_rel_err": ((got.double() - mean64).abs() / mean64.abs().clamp_min(1e-30)).max().item(),
            "abs_sum_max": stacked.abs().sum(0).max().item(),
            "dtype": str(got.dtype),
            "ranks_differ": not torch.equal(grads[0], grads[1]),
        }
    if rank == 0:
        json.dump(results, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One run of 3 gloo ranks covering every dtype (process start-up dominates the cost)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    world = 3
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.json"
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), str(store), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return json.loads(out.read_text())


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_low_precision_grads_reduced_in_fp32(ddp_results, dtype_name):
    r = ddp_results[f"torch.{dtype_name}"]
    assert r["dtype"] == f"torch.{dtype_name}" and r["ranks_differ"]
    # The fp32 sum of three values of 8 (bf16) or 11 (fp16) significant bits is exact while their exponents
    # differ by less than 16 (13), as for these gradients; S/3 in binary repeats "01", so its fp32 rounding
    # never lands on a tie of the coarser grid: the hook's result is the float64 mean rounded once.
    assert r["equal"], r
    unit = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype_name]
    assert r["max_rel_err"] <= unit  # one rounding to p significant bits: relative error <= 2^-p


def test_fp32_grads(ddp_results):
    r = ddp_results["torch.float32"]
    assert r["dtype"] == "torch.float32"
    # an fp32 sum of 3 terms (2 roundings) and a division (1): at most 3 u * sum_r |g_r| / 3, u = 2^-24,
    # plus rounding of the float64 reference is not involved (the difference is taken in float64)
    assert r["max_abs_diff"] <= 3 * 2.0**-24 * r["abs_sum_max"]


def test_register_needs_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_fp32_allreduce(nn.Linear(2, 2))
    assert torch.distributed.is_available()
