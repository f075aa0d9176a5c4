import os

import pytest
import torch

# Triton kernels are tested on CPU tensors through the interpreter when there is no GPU.
# Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, i.e. when a test
# module first imports vcfast's kernels, so this is the one place it is set: a test module
# that set it itself would run the interpreter on CUDA tensors on a GPU machine instead of
# the compiled kernels (tests/test_triton_launch_device.py keeps it so).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a whole module, restored afterwards: tiny models and
    ~66k-element ops gain nothing from more, and on a shared CPU OpenMP threads spinning
    against other processes make every op many times slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
