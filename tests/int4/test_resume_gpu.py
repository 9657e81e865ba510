"""Resuming an INT4 run from its checkpoint on CUDA continues the same trajectory (bf16 autocast).

The 5000-step proof run of recipe "rtn" went NaN right after it resumed from its step-4000 checkpoint on the
H100 (docs/int4.md), while resuming is exact on the CPU (tests/trainer). This pins the CUDA case for
every recipe.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.data import TokenBatcher
from lowbit.int4 import Int4TrainingConfig, convert_to_int4_training
from lowbit.models import GPT, GPTConfig
from lowbit.trainer import TrainConfig, train

pytestmark = pytest.mark.gpu


class _Stop(Exception):
    pass


def _run(recipe, out_dir, tokens, *, stop_at=None, resume=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=64, block_size=32))
    convert_to_int4_training(model, Int4TrainingConfig.named(recipe, seed=1))
    cfg = TrainConfig(
        steps=8,
        batch_size=8,
        block_size=32,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=1,
        eval_every=4,
        eval_batches=1,
        log_every=1,
        save_every=4,
        precision="bf16",
        seed=0,
        out_dir=str(out_dir),
        progress=False,
        device="cuda",
    )
    losses = []

    class _Record:
        def on_step_end(self, *, step, loss, **_):
            losses.append((step, loss))
            if step == stop_at:
                raise _Stop

    try:
        train(
            model,
            TokenBatcher(tokens, 8, 32, generator=0),
            TokenBatcher(tokens, 8, 32),
            cfg,
            callbacks=[_Record()],
            resume=resume,
        )
    except _Stop:
        pass
    return losses


@pytest.mark.parametrize("recipe", ["rtn", "hq", "hq-lss"])
def test_resume_on_cuda_continues_the_trajectory(recipe, tmp_path):
    tokens = torch.randint(0, 64, (20_000,), generator=torch.Generator().manual_seed(0))
    full = _run(recipe, tmp_path / "full", tokens)
    _run(recipe, tmp_path / "cut", tokens, stop_at=5)  # killed after the step-4 checkpoint
    resumed = _run(recipe, tmp_path / "cut", tokens, resume="auto")
    assert all(math.isfinite(v) for _, v in full + resumed), (full, resumed)
    assert [s for s, _ in resumed] == [5, 6, 7, 8]
    # Same kernels, same inputs and generator states: cuBLAS/atomics may still reorder sums, so compare to
    # bf16-autocast noise rather than bit for bit.
    for (s, a), (_, b) in zip(full[4:], resumed):
        assert abs(a - b) <= 2e-2 * abs(a), (s, a, b)
