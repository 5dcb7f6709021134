"""Run observability: metrics to TensorBoard, W&B (optional) and <out>/metrics.jsonl, plus a progress line with ETA.

Only the main process (global rank 0) writes; other ranks get a logger whose methods do nothing, so trainers
call it unconditionally.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from megaseg.config.training import LoggingConfig
from megaseg.progress import format_duration

METRICS_FILE_NAME = "metrics.jsonl"


class PhaseTimer:
    """Wall-clock seconds per named phase (rollout, score_segments, update_actor, ...), reset after each report."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        """The phases timed since the last ``pop``, without resetting."""
        return dict(self._seconds)

    def pop(self) -> dict[str, float]:
        seconds, self._seconds = self._seconds, {}
        return seconds


class RunLogger:
    """Logs scalar metrics per step and prints `step i/N | loss .. | tok/s .. | elapsed .. | ETA ..`; on a terminal
    a tqdm bar of the steps (rate, ETA) stays under those lines. ``bar``: force it on or off (None: a TTY decides)."""

    def __init__(self, logging_config: LoggingConfig, total_steps: int, *, is_main: bool = True,
                 run_config: object = None, start_step: int = 0, stream=None, bar: Optional[bool] = None) -> None:
        self.config = logging_config
        self.total_steps = total_steps
        self.is_main = is_main
        self.out_dir = Path(logging_config.out_dir)
        self._stream = stream or sys.stdout
        self._start_time = time.perf_counter()
        self._start_step = start_step
        self._tensorboard = None
        self._wandb_run = None
        self._metrics_file = None
        self._bar = None
        if not is_main:
            return
        if bar if bar is not None else bool(getattr(self._stream, "isatty", lambda: False)()):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=self._stream,
                             dynamic_ncols=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps one history across resumes; a resumed run re-logs nothing before start_step.
        self._metrics_file = (self.out_dir / METRICS_FILE_NAME).open("a", encoding="utf-8")
        if logging_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if logging_config.wandb:
            self._wandb_run = self._start_wandb(run_config)

    def _start_wandb(self, run_config: object):
        try:
            import wandb
        except ImportError:
            raise ValueError("logging.wandb=true but the wandb package is not installed: "
                             "pip install 'megaseg[wandb]' or set logging.wandb=false") from None
        config_dict = asdict(run_config) if is_dataclass(run_config) else None
        return wandb.init(project=self.config.wandb_project, dir=str(self.out_dir), config=config_dict,
                          name=self.out_dir.name, resume="allow")

    def log(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train") -> None:
        """Record metrics of `step` (1-based count of completed steps) and print the progress line."""
        if not self.is_main:
            return
        scalars = {f"{prefix}/{name}": float(value) for name, value in metrics.items()}
        self._metrics_file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)
        if prefix != "train":
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if step % self.config.log_every == 0 or step == self.total_steps:
            self._print(self.progress_line(step, metrics))

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)  # above the bar, which redraws under it
        else:
            print(text, file=self._stream, flush=True)

    def progress_line(self, step: int, metrics: Mapping[str, float]) -> str:
        elapsed = time.perf_counter() - self._start_time
        done = step - self._start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        shown = " | ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        return (f"step {step}/{self.total_steps} | {shown} | elapsed {format_duration(elapsed)} "
                f"| ETA {format_duration(eta)}")

    def message(self, text: str) -> None:
        if self.is_main:
            self._print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
