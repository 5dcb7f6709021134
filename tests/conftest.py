"""Shared test helpers (tiny configs, reference implementations) live in tests/helpers/, importable by name from every
test folder and from the ranks that megaseg.parallel.spawn starts (they inherit sys.path).

Without CUDA, Triton kernels run in Triton's interpreter (tests/kernels): TRITON_INTERPRET is set here, before any
test module imports megatron (which imports triton once it is installed), since triton may read it on first use."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HELPERS = str(Path(__file__).resolve().parent / "helpers")
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)
