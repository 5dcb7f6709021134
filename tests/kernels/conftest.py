"""Test setup for megaseg.kernels.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when
a kernel is defined (``triton.jit``), i.e. when a megaseg.kernels kernel module is first imported; megaseg imports
those only when a dispatch point runs a kernel, so setting it here, while the tests are collected, is in time. The
ranks that megaseg.parallel.spawn starts inherit it. On a CUDA machine the same tests run the compiled kernels.
"""

import os
import sys

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))

# The interpreter runs each program in Python: few, small examples keep the directory near a minute on 2 cores.
settings.register_profile("megaseg-kernels", max_examples=25, deadline=None, derandomize=False)
settings.load_profile("megaseg-kernels")
