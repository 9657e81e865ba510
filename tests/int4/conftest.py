import pytest
import torch


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """The INT4 emulation runs many small CPU ops; with two intra-op threads on a busy 2-core machine the
    OpenMP barriers alone made these tests 5-15x slower. One thread, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
