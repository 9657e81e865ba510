"""lowbit.int4 on CUDA: exact integer products on tensor cores, agreement with the CPU, a training step."""

from __future__ import annotations

import pytest
import torch

from lowbit.int4 import Int4Linear, Int4TrainingConfig, hq_quantize, int_matmul
from lowbit.int4.function import _EXACT_FP32_K

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("k", [64, 4096, _EXACT_FP32_K])
def test_int_matmul_exact_on_cuda(k):
    gen = torch.Generator().manual_seed(k)
    a = torch.randint(-7, 8, (32, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-7, 8, (k, 24), dtype=torch.int8, generator=gen)
    a[0], b[:, 0] = 7, 7  # the largest sum, 49·K, occurs
    out = int_matmul(a.cuda(), b.cuda())
    assert out.dtype == torch.float32
    assert torch.equal(out.cpu().long(), a.long() @ b.long())


def test_codes_match_the_cpu():
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    c_cpu, s_cpu = hq_quantize(x, 32)
    c_gpu, s_gpu = hq_quantize(x.cuda(), 32)
    # The rotation is an fp32 product on both; its last bits may differ, so a code may flip at a rounding tie.
    diff = (c_gpu.cpu().int() - c_cpu.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4
    assert torch.allclose(s_gpu.cpu(), s_cpu, rtol=1e-6, atol=0)


@pytest.mark.parametrize("recipe", ["hq-lss", "hq", "rtn"])
def test_training_step_on_cuda(recipe):
    torch.manual_seed(0)
    layer = Int4Linear(256, 128, config=Int4TrainingConfig.named(recipe)).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    target = torch.randn(4, 64, 128, device="cuda")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        loss = (y.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    # Least squares on 256 samples of 256 inputs: a fit clearly lowers the initial loss.
    assert y.dtype == torch.bfloat16 and losses[-1] < 0.8 * losses[0]
