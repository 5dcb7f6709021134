"""Which implementation the hot segment/vocabulary paths run: the Triton kernels of this package or the torch code of
megaseg.algorithms / megaseg.parallel.vocab_parallel. One process-wide choice, made once from the config's
``kernels`` key (``select_kernels``, called by ``parallel_session``), read at each dispatch point
(``use_triton(tensor)``); the callers run the same function either way.

- ``auto``: Triton on CUDA tensors when Triton is importable, torch elsewhere (CPU tensors, no Triton);
- ``triton``: Triton everywhere. On CPU tensors a Triton kernel runs only in Triton's interpreter, which must be
  switched on (``TRITON_INTERPRET=1``) before the kernels are defined, i.e. before Python imports them: the check
  says so instead of failing inside Triton;
- ``torch``: the torch code, always.

A process-wide setting (like ``torch.backends.cuda.matmul.allow_tf32``) rather than an argument: the choice is a
property of the machine and run, not of the math, and threading it through every algorithm would change a dozen
signatures for one flag. ``kernels_mode`` sets it for a block (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Iterator

import torch

from megaseg.config.root import DEFAULT_KERNELS, KERNEL_CHOICES

# The kernel modules; each records at import whether its kernels were defined in the interpreter.
KERNEL_MODULES = ("megaseg.kernels.segment_reduce", "megaseg.kernels.vocab_partials", "megaseg.kernels.scan",
                  "megaseg.kernels.reward_shaping")

_mode = DEFAULT_KERNELS


def select_kernels(mode: str) -> None:
    """Set the process-wide choice (a value of ``KERNEL_CHOICES``; the config's ``kernels`` key)."""
    global _mode
    if mode not in KERNEL_CHOICES:
        raise ValueError(f"kernels={mode!r} is not allowed; choose one of {list(KERNEL_CHOICES)}")
    _mode = mode


def selected_kernels() -> str:
    return _mode


@contextlib.contextmanager
def kernels_mode(mode: str) -> Iterator[None]:
    """``select_kernels(mode)`` for the block, the previous choice restored after it."""
    previous = _mode
    select_kernels(mode)
    try:
        yield
    finally:
        select_kernels(previous)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether kernels defined now (or already defined) run in Triton's interpreter."""
    for name in KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            return module.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the dispatch point holding ``tensor`` runs its Triton kernel; raises ValueError when ``kernels:
    triton`` cannot run here (no Triton; a CPU tensor outside the interpreter)."""
    if _mode == "torch":
        return False
    if _mode == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise ValueError("kernels=triton needs the triton package (pip install triton); set kernels: auto or torch")
    if not tensor.is_cuda and not interpreter_enabled():
        raise ValueError(
            f"kernels=triton on a {tensor.device.type} tensor runs only in Triton's interpreter: start Python with "
            "TRITON_INTERPRET=1 in the environment (it must be set before the kernels are imported), or set "
            "kernels: auto (Triton on CUDA, torch elsewhere) or kernels: torch")
    return True
