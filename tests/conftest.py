import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. Triton reads TRITON_INTERPRET when a kernel is
# defined and decorates its own builtins at first import, so it must be set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets one intra-op thread: with -n 2 on 2 cores, two workers of two
# threads each oversubscribe the cores and small-op tests slow down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
