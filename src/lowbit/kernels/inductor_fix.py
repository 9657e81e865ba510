"""A workaround for a torch.compile (inductor) race that silently corrupts results: a barrier before a
reduction loop that reads back what an earlier loop of the same kernel stored.

The bug (pytorch/pytorch#190517, triton-lang/triton#10924; in torch 2.11 and 2.13 at least): inductor fuses,
say, a residual sum and the LayerNorm after it into one Triton kernel of several loops over the row. The
first loop stores the sum, a later loop loads it back. Triton's coalescing pass may give the store and the
load different layouts, so a warp reads elements another warp wrote, and nothing orders the two: the load
can see stale memory. The results then change from call to call.

lowbit's INT4 layers make the race likely: their bf16 outputs enter the fp32 residual stream, and a kernel
that loads both dtypes is what ends up with two layouts. Measured on an H100 (docs/benchmarks.md, tenth
round): the compiled forward of a 6-layer GPT gave another loss on every call, the same with every INT4 op
replaced by plain torch, and GPT-1.3b's compiled gradients were off by up to 16x (some inf).

:func:`patch_inductor_read_back` wraps inductor's ``TritonKernel.codegen_body``: before a reduction loop that
loads a buffer stored by an earlier loop of the same kernel (inductor tracks both sets: the stores it
invalidated at the end of a loop, the buffers it then had to load again), it writes ``tl.debug_barrier()``.
One barrier per such loop and program; kernels without a read-back are unchanged. The fix proposed upstream
(pytorch/pytorch#190519) puts the same barrier before the load itself.

``convert_to_int4_training`` and ``convert_to_onebit`` install it; ``LOWBIT_INDUCTOR_READ_BACK_BARRIER=0``
leaves inductor alone. The patch also adds a tag to torch.compile's cache key, so a graph cached before it
(with the racy kernels) is not reused.
"""

from __future__ import annotations

import inspect
import os

__all__ = ["BARRIER_LINE", "CACHE_TAG", "codegen_body_with_barrier", "patch_inductor_read_back",
           "read_back_guarded", "reads_back"]

#: The line written before a read-back loop.
BARRIER_LINE = "tl.debug_barrier()"
#: Added to ``torch.compiler.config.cache_key_tag`` while the patch is installed.
CACHE_TAG = "lowbit-read-back-barrier-1"
_ENV = "LOWBIT_INDUCTOR_READ_BACK_BARRIER"
_MARK = "_lowbit_read_back_barrier"


def reads_back(kernel) -> bool:
    """Whether inductor's Triton ``kernel``, about to write a reduction loop, loads in it a buffer that an
    earlier loop of the kernel stored (the loop needs a barrier before it)."""
    stored = getattr(getattr(kernel, "cse", None), "invalidated_stores", None)
    if not stored or not getattr(kernel, "inside_reduction", False):
        return False
    if getattr(kernel, "mix_order_reduction", False):  # persistent: no loop of its own here
        return False
    if not any(getattr(tree, "is_loop", False) for tree in getattr(kernel, "range_trees", ())):
        return False
    if not (kernel.loads or kernel.compute or kernel.stores):
        return False
    reloaded = getattr(kernel, "must_keep_buffers", None)
    if reloaded is None:  # (an inductor without that record: every loop after a store)
        return True
    return any(name in stored for name in reloaded)


def _fixed_upstream(triton_kernel_cls) -> bool:
    """Whether this torch's inductor already guards the read-back (the upstream fix checks the invalidated
    stores in ``TritonKernel.load``)."""
    try:
        return "invalidated_stores" in inspect.getsource(triton_kernel_cls.load)
    except (OSError, TypeError):
        return False


def codegen_body_with_barrier(kernel, original):
    """``original(kernel)`` (inductor's ``TritonKernel.codegen_body``), after the barrier line where
    :func:`reads_back`."""
    if reads_back(kernel):
        kernel.body.writeline(BARRIER_LINE)
    return original(kernel)


def _triton_kernel_cls():
    """inductor's ``TritonKernel``, or None where this torch build cannot import its Triton backend."""
    try:
        from torch._inductor.codegen.triton import TritonKernel
    except Exception:
        return None
    return TritonKernel


def patch_inductor_read_back() -> bool:
    """Install the barrier (see the module docstring) once per process; returns whether it is installed.

    Not installed where the environment says ``LOWBIT_INDUCTOR_READ_BACK_BARRIER=0``, where inductor's Triton
    backend cannot be imported, or where this torch already carries the upstream fix.
    """
    TritonKernel = _triton_kernel_cls()
    if TritonKernel is None:
        return False
    original = TritonKernel.codegen_body
    if getattr(original, _MARK, False):
        return True
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _fixed_upstream(TritonKernel):
        return False

    def codegen_body(self):
        return codegen_body_with_barrier(self, original)

    setattr(codegen_body, _MARK, True)
    codegen_body.__wrapped__ = original
    codegen_body.__doc__ = original.__doc__
    TritonKernel.codegen_body = codegen_body
    _tag_cache_key()
    return True


def read_back_guarded() -> bool:
    """Whether inductor's read-back loops get their barrier in this process: the patch is installed, or this
    torch carries the upstream fix (False also where inductor's Triton backend cannot be imported)."""
    TritonKernel = _triton_kernel_cls()
    if TritonKernel is None:
        return False
    return bool(getattr(TritonKernel.codegen_body, _MARK, False)) or _fixed_upstream(TritonKernel)


def _tag_cache_key() -> None:
    try:
        import torch.compiler.config as cc
    except ImportError:  # (older torch: no such tag; clear its cache dir to drop graphs compiled before)
        return
    tag = getattr(cc, "cache_key_tag", None)
    if tag is None or CACHE_TAG in tag:
        return
    cc.cache_key_tag = f"{tag}+{CACHE_TAG}" if tag else CACHE_TAG
