"""Let megatron-core run on a CPU-only machine (gloo), with caller-side patches and no edits to Megatron.

megatron-core assumes CUDA in a handful of places that are not about computing on a GPU at all: it asks
``torch.cuda.current_device()`` where to allocate scratch buffers, synchronises, keeps its dropout RNG in a CUDA
generator, and waits on CUDA streams around gradient reduction. On a CPU build of torch every one of those raises
"Torch not compiled with CUDA enabled". The measured list, and the fix for each, is in
``docs/megatron-on-cpu.md``; each patch below names the call it unblocks.

The patches change process-wide state, so they live here and nowhere else, apply only when CUDA is unavailable,
and are idempotent. On a GPU machine ``apply_cpu_compat()`` does nothing and ``cuda_device_redirect()`` is a null
context.

Two places cannot be fixed by patching ``torch.cuda`` because they hard-code ``device="cuda"`` in a tensor factory
(the pipeline schedules' token counters, ``get_megatron_optimizer`` and ``optimizer.step()``); run those inside
``with cuda_device_redirect():``, a ``TorchFunctionMode`` that rewrites such device arguments to the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_apply_lock = threading.Lock()
_applied = False


def is_cpu_only() -> bool:
    """True when this process cannot use CUDA (a CPU build of torch, or no visible GPU)."""
    return not torch.cuda.is_available()


class _StandInStream:
    """Answers the stream methods Megatron calls around gradient reduction; on CPU every op is already ordered.

    Megatron DDP's ``start_grad_sync`` / ``finish_grad_sync`` call ``torch.cuda.current_stream()`` /
    ``default_stream()`` and then ``wait_stream`` / ``record_event`` / ``synchronize`` on the result.
    """

    device = _CPU

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_StandInStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


_STAND_IN_STREAM = _StandInStream()


def _current_device_on_cpu() -> torch.device:
    # Megatron passes the answer straight to tensor factories (``device=torch.cuda.current_device()``): attention's
    # GlobalMemoryBuffer scratch tensor, the tensor-parallel all-gather outputs, pipeline p2p receive buffers. An int
    # would mean "cuda:N", so answer the CPU device itself.
    return _CPU


def _synchronize_on_cpu(device: Any = None) -> None:
    # CPU ops complete before they return, so there is nothing to wait for (p2p communication, DDP buffer frees).
    return None


def _stand_in_stream(device: Any = None) -> _StandInStream:
    return _STAND_IN_STREAM


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = _current_device_on_cpu
    torch.cuda.synchronize = _synchronize_on_cpu
    # Megatron DDP start_grad_sync / finish_grad_sync waits on these streams.
    torch.cuda.current_stream = _stand_in_stream
    torch.cuda.default_stream = _stand_in_stream


# --- the model-parallel RNG tracker -------------------------------------------------------------------------------
# DotProductAttention.forward always enters ``get_cuda_rng_tracker().fork()`` (even with dropout 0), and the tracker
# saves/restores CUDA generator states. On CPU the "CUDA" generator is the CPU default generator: the tracker then
# keeps one CPU generator state per name, which is exactly what megatron does per GPU.


def _get_rng_state_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
    # Megatron's ``clone`` / ``graph_safe`` options concern CUDA graphs, which do not exist on CPU.
    return torch.get_rng_state()


def _set_rng_state_on_cpu(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _tracker_add_on_cpu(self: Any, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` with a CPU generator state seeded with ``seed``; same duplicate checks."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    # A fresh generator gives the state ``torch.manual_seed(seed)`` would, without disturbing the default generator.
    self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()


class _DropCpuRngChangedWarning(logging.Filter):
    """``fork()`` warns when the CPU RNG state changed inside it, to catch CPU randomness leaking into a GPU-RNG
    region. On CPU the forked generator IS the CPU generator, so any dropout inside fork trips it: drop that one
    message, which carries no information here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    # Checked against megatron-core 0.16.1 and the 0.17+ main branch; a release that renames these must fail loudly
    # here rather than leave the tracker on the missing CUDA generator.
    missing = [name for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker")
               if not hasattr(mcore_random, name)]
    if missing:
        raise RuntimeError(
            f"megatron.core.tensor_parallel.random has no {missing} in this megatron-core release; "
            "megaseg.parallel.cpu_compat must be updated to patch its RNG tracker for CPU"
        )
    # The tracker's fork(), activation checkpointing and get_all_rng_states go through these two module functions.
    mcore_random._get_cuda_rng_state = _get_rng_state_on_cpu
    mcore_random._set_cuda_rng_state = _set_rng_state_on_cpu
    # add() calls torch.cuda.get_rng_state() directly, which has no CPU answer.
    mcore_random.CudaRNGStatesTracker.add = _tracker_add_on_cpu
    logging.getLogger(mcore_random.__name__).addFilter(_DropCpuRngChangedWarning())


# Megatron functions that build tensors with a hard-coded ``device="cuda"`` on the ordinary forward path; each is
# replaced, in every module that holds a reference to it, by a wrapper running it under ``_CudaToCpuMode``.
_CUDA_FACTORY_FUNCTIONS = (
    # DotProductAttention's torch softmax builds its causal mask this way when no attention_mask is passed.
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    # ... and its sliding-window mask.
    ("megatron.core.transformer.utils", "get_sliding_window_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_sliding_window_causal_mask"),
    # Broadcasting a batch from tensor-parallel rank 0 (sizes tensor and ``.cuda()`` on the data).
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    ("megatron.core.tensor_parallel", "broadcast_data"),
)


def _run_on_cpu(function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CudaToCpuMode():
            return function(*args, **kwargs)

    wrapper.__megaseg_cpu_wrapped__ = True
    return wrapper


def _patch_megatron_cuda_factories() -> None:
    for module_name, attribute in _CUDA_FACTORY_FUNCTIONS:
        # Newer megatron releases may move or drop a function; a missing one needs no patch.
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        function = getattr(module, attribute, None)
        if function is not None and not getattr(function, "__megaseg_cpu_wrapped__", False):
            setattr(module, attribute, _run_on_cpu(function))


def apply_cpu_compat() -> bool:
    """Patch torch.cuda and megatron-core so megatron models, DDP and the RNG tracker run on CPU.

    Does nothing on a machine with CUDA. Safe to call many times (and from several threads).

    Returns:
        True when the patches are (now) in place, False on a CUDA machine.
    """
    global _applied
    if not is_cpu_only():
        return False
    with _apply_lock:
        if not _applied:
            _patch_torch_cuda()
            _patch_megatron_rng()
            _patch_megatron_cuda_factories()
            _applied = True
    return True


# --- device="cuda" in tensor factories ----------------------------------------------------------------------------


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


def _to_cpu_device(value: Any, is_device_argument: bool) -> Any:
    if _is_cuda_device(value):
        return _CPU
    # ``device=0`` means cuda:0 for a factory's device keyword (never rewrite plain ints elsewhere: they are sizes).
    if is_device_argument and isinstance(value, int) and not isinstance(value, bool):
        return _CPU
    return value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites every ``device="cuda"`` / ``"cuda:N"`` / ``torch.device("cuda")`` argument, ``Tensor.cuda()`` and
    ``Tensor.to("cuda")`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The distributed optimizer sorts parameters by their type *name* and refuses anything but
            # 'torch.cuda.{Float,Half,BFloat16}Tensor' (DistributedOptimizer._build_model_and_main_param_groups):
            # answer a CPU tensor's name as its CUDA twin's. Only the no-argument query; .type(dtype) converts.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.device:
            # torch.device("cuda"), torch.device("cuda", 1): the constructor itself goes through the mode.
            device_type = args[0] if args else kwargs.get("type")
            return _CPU if _is_cuda_device(device_type) else func(*args, **kwargs)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"], is_device_argument=True)
        # Tensor.to("cuda"), Tensor.new_zeros(..., "cuda") and friends pass the device positionally.
        args = tuple(_to_cpu_device(arg, is_device_argument=False) for arg in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_device_redirect() -> Iterator[None]:
    """Inside this context, tensors requested on CUDA are created on the CPU; a null context when CUDA exists.

    Needed around megatron's pipeline schedules (``forward_backward_func``), ``get_megatron_optimizer`` and
    ``optimizer.step()``, which hard-code ``device="cuda"``.
    """
    if not is_cpu_only():
        yield
        return
    with _CudaToCpuMode():
        yield
