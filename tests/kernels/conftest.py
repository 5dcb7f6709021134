"""Test setup for megaseg.kernels.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before any test module imports triton (megatron does, once it is installed); the ranks that
megaseg.parallel.spawn starts inherit it. On a CUDA machine the same tests run the compiled kernels.
"""

import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# The interpreter runs each program in Python: few, small examples keep the directory near a minute on 2 cores.
settings.register_profile("megaseg-kernels", max_examples=25, deadline=None, derandomize=False)
settings.load_profile("megaseg-kernels")
