import math

import pytest
import torch

from lowbit.trainer.schedule import lr_multiplier, warmup_cosine_scheduler


@pytest.mark.parametrize("warmup, total, ratio", [(10, 100, 0.1), (0, 50, 0.0), (1, 2, 0.5), (5, 5, 0.2)])
def test_key_steps(warmup, total, ratio):
    m = lambda k: lr_multiplier(k, warmup_steps=warmup, total_steps=total, min_ratio=ratio)  # noqa: E731
    if warmup:
        assert m(0) == pytest.approx(1 / warmup, rel=1e-15)
        assert m(warmup - 1) == pytest.approx(1.0, rel=1e-15)
        # linear: equal increments of 1 / warmup
        for k in range(warmup - 1):
            assert m(k + 1) - m(k) == pytest.approx(1 / warmup, rel=1e-12)
    if warmup < total - 1:
        assert m(warmup) == pytest.approx(1.0, rel=1e-15)  # cosine starts at the peak
        assert m(total - 1) == pytest.approx(ratio, rel=1e-12)  # ... and ends at the floor on the last step
    assert m(total + 7) == pytest.approx(ratio, rel=1e-12)  # past the end: the floor


def test_cosine_midpoint_and_monotone():
    warmup, total, ratio = 10, 111, 0.1  # decay over 100 intervals: midpoint at step 60
    m = [lr_multiplier(k, warmup_steps=warmup, total_steps=total, min_ratio=ratio) for k in range(total)]
    assert m[60] == pytest.approx((1 + ratio) / 2, rel=1e-12)
    assert m[35] == pytest.approx(ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert all(a >= b for a, b in zip(m[warmup:], m[warmup + 1 :]))
    assert m[-1] == pytest.approx(ratio, rel=1e-12)


def test_scheduler_follows_multiplier():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = warmup_cosine_scheduler(opt, warmup_steps=3, total_steps=12, min_ratio=0.2)
    for k in range(12):
        expected = 0.5 * lr_multiplier(k, warmup_steps=3, total_steps=12, min_ratio=0.2)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_steps=0, total_steps=0, min_ratio=0.1), "total_steps"),
        (dict(warmup_steps=11, total_steps=10, min_ratio=0.1), "warmup_steps"),
        (dict(warmup_steps=-1, total_steps=10, min_ratio=0.1), "warmup_steps"),
        (dict(warmup_steps=1, total_steps=10, min_ratio=1.5), "min_ratio"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(0, **kwargs)


def test_negative_step():
    with pytest.raises(ValueError, match="step"):
        lr_multiplier(-1, warmup_steps=1, total_steps=10, min_ratio=0.1)
