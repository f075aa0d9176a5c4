import os

import torch

# Triton kernels are tested on CPU tensors through the interpreter when there is no GPU.
# Triton reads this when a kernel is launched, so it must be set before any test runs one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
