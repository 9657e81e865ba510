"""DDP communication hook: all-reduce gradients in fp32 when the parameters are fp16/bf16.

DDP's default hook all-reduces each gradient bucket in the parameters' dtype: with bf16 parameters every
partial sum of the reduction is rounded to 8 significant bits, and the division by the world size happens
in bf16 too. :func:`fp32_allreduce_hook` upcasts the bucket to fp32, sums it there, divides once, and
rounds once back into the bucket:

    grad = round_to_param_dtype( (Σ_ranks fp32(grad_r)) / world_size )

It costs twice the bytes on the wire of a bf16 all-reduce (the same as fp32 training). Buckets that are
already fp32 or fp64 are reduced as they are.
"""

import torch
import torch.distributed as dist

__all__ = ["fp32_allreduce_hook", "register_fp32_allreduce"]


# No ``from __future__ import annotations`` here: DDP checks that the hook's ``bucket`` annotation is
# ``dist.GradBucket`` itself, not a string.
def fp32_allreduce_hook(process_group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook (``ddp_model.register_comm_hook(process_group, fp32_allreduce_hook)``).

    Args:
        process_group: the group to reduce over; None means the default (WORLD) group.
        bucket: ``torch.distributed.GradBucket``; only ``bucket.buffer()`` (a flat gradient tensor of the
            bucket's dtype) is used.

    Returns:
        A future of the bucket's buffer holding the mean gradient over the group, computed in fp32 and
        written back in the buffer's dtype.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    wide = buffer if buffer.dtype in (torch.float32, torch.float64) else buffer.float()
    fut = dist.all_reduce(wide, group=group, async_op=True).get_future()

    def finish(f: torch.futures.Future) -> torch.Tensor:
        total = f.value()[0]
        mean = total / torch.full((), world_size, dtype=total.dtype, device=total.device)
        buffer.copy_(mean)  # rounds once to the bucket's dtype (a plain copy when it is fp32)
        return buffer

    return fut.then(finish)


def register_fp32_allreduce(ddp_model, process_group=None) -> None:
    """Register :func:`fp32_allreduce_hook` on ``ddp_model`` (before its first backward)."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    ddp_model.register_comm_hook(process_group, fp32_allreduce_hook)
