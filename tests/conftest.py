"""Session-wide test setup.

On a machine without CUDA, Triton kernels run under the interpreter. The switch must be
set before anything imports triton (TorchRec/FBGEMM do, at import time), so it lives
here, ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
