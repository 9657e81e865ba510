"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

For optimizer step k = 0, 1, ..., total_steps - 1 (k is the number of optimizer steps already taken, the
``last_epoch`` of ``torch.optim.lr_scheduler.LambdaLR``), the learning rate is ``base_lr * m(k)`` with

    m(k) = (k + 1) / W                                    for k < W            (linear warmup)
    m(k) = r + (1 - r) * (1 + cos(pi * p)) / 2            for k >= W, p = (k - W) / max(1, S - 1 - W)

where W = warmup_steps, S = total_steps and r = min_ratio = min_lr / lr. The first step runs at base_lr / W,
step W - 1 and step W at the peak, and the last step S - 1 at the floor r * base_lr (when S - 1 > W); p is
clamped to [0, 1], so steps past S stay at the floor. With W = 0 the cosine starts at step 0.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_multiplier", "warmup_cosine_scheduler"]


def _check(warmup_steps: int, total_steps: int, min_ratio: float) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be an int > 0, got {total_steps!r}")
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, int)
        or not 0 <= warmup_steps <= total_steps
    ):
        raise ValueError(
            f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}"
        )
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio!r}")


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Factor m(step) in (0, 1] that multiplies the peak learning rate at optimizer step ``step`` (0-based).

    See the module docstring for the formula. ``step`` < 0 is an error; ``step`` >= ``total_steps`` gives the
    floor ``min_ratio``.
    """
    _check(warmup_steps, total_steps, min_ratio)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every parameter group's initial learning rate.

    Call ``scheduler.step()`` once after each optimizer step. The multiplier is a plain function of the
    arguments given here, so it is not stored in ``scheduler.state_dict()`` (only the step count and the base
    learning rates are): a resumed run follows the schedule of the configuration it is resumed with.
    """
    _check(warmup_steps, total_steps, min_ratio)

    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
