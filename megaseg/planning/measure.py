"""Measured activation memory of one forward/backward, to hold the planner's activation term against.

On this CPU machine the measure is the process's resident-set high-water mark (VmHWM, reset before the step) in a fresh process
(megaseg.parallel.spawn starts one per measurement): the resident set just before the measured step (weights and
gradients already allocated by a short warm-up step) subtracted from the high-water mark after it. That difference
is what the step's stored activations and backward transients needed at their peak. glibc's malloc is told to map
every large block on its own (see measure_activation_peak), or the heap would keep freed activations resident.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from megaseg.config.model import ModelConfig


_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass(frozen=True)
class MeasuredStep:
    resident_before_bytes: int
    peak_bytes: int

    @property
    def activation_peak_bytes(self) -> int:
        return self.peak_bytes - self.resident_before_bytes


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Restart the resident-set high-water mark from the current resident set (Linux >= 4.0: writing 5 to
    clear_refs). ``ru_maxrss`` cannot serve: a spawned child inherits its parent's maximum across exec, so a
    measurement started from a large process (a long test session) would read the parent's peak."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_bytes() -> int:
    """VmHWM of /proc/self/status: the resident-set high-water mark since the last ``_reset_peak``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line: this measurement needs Linux")


def _measure_in_process(rank: int, world_size: int, model_cfg: ModelConfig, seq: int, batch: int) -> MeasuredStep:
    from megaseg.config.parallel import ParallelConfig
    from megaseg.models import build_reward_model
    from megaseg.parallel import initialize_parallel

    parallel_cfg = ParallelConfig()
    initialize_parallel(parallel_cfg, seed=0)
    model = build_reward_model(model_cfg, parallel_cfg, seed=1)
    model.train()
    input_ids = torch.randint(0, model_cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(seq).expand(batch, seq)
    # Warm-up on 8 tokens: allocates every gradient and loads the lazy code paths, so the measured step adds only
    # its activations and transients.
    model(input_ids[:, :8], position_ids[:, :8], None).float().pow(2).mean().backward()
    gc.collect()
    _reset_peak()
    before, mark_before = _resident_bytes(), _peak_bytes()
    values = model(input_ids, position_ids, None)
    values.float().pow(2).mean().backward()
    peak = _peak_bytes()
    if peak <= mark_before:
        # Building the model peaked higher than the step: the mark says nothing about the step.
        raise RuntimeError(f"the measured step ({batch} x {seq} tokens) never rose above the high-water mark of "
                           f"building the model ({mark_before / 2 ** 20:.0f} MiB); measure a longer sequence")
    return MeasuredStep(resident_before_bytes=before, peak_bytes=peak)


def measure_activation_peak(model_cfg: ModelConfig, seq: int, batch: int) -> MeasuredStep:
    """Forward + backward of the scalar-head model (no logits: the transformer's activations alone) on `batch` x
    `seq` tokens in a fresh process. RuntimeError when the step never raised the high-water mark above what
    building the model left (the measure would then say nothing)."""
    from megaseg.parallel.spawn import run_distributed

    # glibc raises its mmap threshold after the first large free, after which freed tensors stay in the heap and
    # the resident set overstates what is live (measured: 1.4x for SmolLM2 at 512 tokens). Fixed thresholds make
    # every large tensor its own mapping, returned to the system when freed; the spawned process reads them at start.
    saved = {name: os.environ.get(name) for name in _MALLOC_ENV}
    os.environ.update(_MALLOC_ENV)
    try:
        return run_distributed(_measure_in_process, 1, model_cfg, seq, batch, timeout=600)[0]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
