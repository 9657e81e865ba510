"""Kernel tests: without CUDA every Triton kernel must run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton). A kernel decorated before that would run compiled code
paths that need a GPU, so the suite stops with a clear message instead of failing test by test."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _kernels_run_interpreted_without_cuda():
    if torch.cuda.is_available():
        return
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    import lowbit.kernels.hadamard_quant as hq

    if not isinstance(hq._hq_kernel, interpreter.InterpretedFunction):
        raise RuntimeError(
            "the Triton kernels were decorated before TRITON_INTERPRET=1 was set: without CUDA, set it "
            "before triton is first imported in the process (tests/conftest.py does)"
        )
