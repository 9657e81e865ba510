"""GPU: the fused 8-bit Adam kernel equals the torch reference (run on the same GPU) at large shapes, and
checkpoints move between devices."""

import io

import pytest
import torch

from lowbit.kernels.adam8bit import VARIANTS
from lowbit.optim import Adam8bit, AdamW8bit

pytestmark = pytest.mark.gpu

# A 4096 x 4096 matrix, a GPT-2 embedding (50257 rows: partial last block), odd sizes, fp32-state tensors.
SHAPES = [(4096, 4096), (50257, 768), (1000, 37), (3000,), (768,), (4096 * 4 + 1,)]


def _run(cls, backend, dtype, steps=4, **kw):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, device="cuda", generator=gen) * 0.02).to(dtype))
              for s in SHAPES]
    opt = cls([{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}],
              lr=1e-3, backend=backend, **kw)
    for _ in range(steps):
        for p in params:
            # rows of very different scales: many blocks, many magnitudes of the normalized moments
            scale = torch.rand(p.shape[0], *([1] * (p.ndim - 1)), device="cuda", generator=gen) ** 4
            p.grad = (torch.randn(p.shape, device="cuda", generator=gen) * scale * 1e-2).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [AdamW8bit, Adam8bit])
def test_kernel_equals_reference_large(cls, dtype):
    p_ref, o_ref = _run(cls, "torch", dtype)
    p_ker, o_ker = _run(cls, "triton", dtype)
    for a, b in zip(p_ref, p_ker):
        assert torch.equal(a, b), f"{tuple(a.shape)}: {int((a != b).sum())} params differ"
        for k, v in o_ref.state[a].items():
            if isinstance(v, torch.Tensor):
                n_bad = int((v != o_ker.state[b][k]).sum())
                assert torch.equal(v, o_ker.state[b][k]), f"{tuple(a.shape)} {k}: {n_bad} differ"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_equals_reference_large(variant):
    """Every tiling gives the reference's bits (exact: all fp32 operations are IEEE in both paths)."""
    p_ref, o_ref = _run(AdamW8bit, "torch", torch.float32, steps=3)
    p_ker, o_ker = _run(AdamW8bit, "triton", torch.float32, steps=3, kernel_variant=variant)
    for a, b in zip(p_ref, p_ker):
        assert torch.equal(a, b), f"{tuple(a.shape)}: {int((a != b).sum())} params differ"
        for k, v in o_ref.state[a].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, o_ker.state[b][k]), f"{tuple(a.shape)} {k}"


def test_step_does_not_synchronize():
    """A step issues its launches without waiting for the device (no host sync): with a long kernel queued
    first, the step returns before that kernel ends."""
    params, opt = _run(AdamW8bit, "triton", torch.float32, steps=2)  # plans built, kernels compiled
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of device time
    opt.step()
    assert not torch.cuda.current_stream().query()  # the sleep kernel still runs: step() did not wait
    torch.cuda.synchronize()


@pytest.mark.parametrize("block_size", [64, 1024])
def test_kernel_equals_reference_block_sizes(block_size):
    p_ref, o_ref = _run(AdamW8bit, "torch", torch.float32, steps=2, block_size=block_size)
    p_ker, o_ker = _run(AdamW8bit, "triton", torch.float32, steps=2, block_size=block_size)
    for a, b in zip(p_ref, p_ker):
        assert torch.equal(a, b)
        assert torch.equal(o_ref.state[a].get("exp_avg_codes", a), o_ker.state[b].get("exp_avg_codes", b))


def test_checkpoint_moves_between_devices():
    """Save on CUDA, load onto CPU params (and back): the states follow the params, the trajectory goes on."""
    params, opt = _run(AdamW8bit, "triton", torch.float32, steps=2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    cpu_params = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    opt_cpu = AdamW8bit([{"params": cpu_params[:3]}, {"params": cpu_params[3:]}], backend="torch")
    opt_cpu.load_state_dict(sd)
    for p, q in zip(params, cpu_params):
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert opt_cpu.state[q][k].device.type == "cpu" and torch.equal(v.cpu(), opt_cpu.state[q][k])
    # one more step on both devices from the same state and gradients gives the same bits
    for p, q in zip(params, cpu_params):
        p.grad = torch.randn_like(p) * 1e-3
        q.grad = p.grad.cpu()
    opt.step()
    opt_cpu.step()
    for p, q in zip(params, cpu_params):
        assert torch.equal(p.detach().cpu(), q.detach())
