"""Progress of long commands (segmentation, scoring, generation, training) on global rank 0.

On a terminal a tqdm bar with rate and ETA; otherwise (a log file, a Slurm job's output) plain lines
``<what> done/total | elapsed .. | ETA ..`` at most every ``interval`` seconds and at the end, so logs stay readable.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO

from megaseg.parallel.collectives import is_rank_zero


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """``update(done)`` with the absolute count done so far; ``close()`` at the end. A no-op on other ranks."""

    def __init__(self, what: str, total: int, *, unit: str = "it", interval: float = 10.0,
                 stream: Optional[TextIO] = None, bar: Optional[bool] = None) -> None:
        self.what, self.total, self.unit, self.interval = what, total, unit, interval
        self.stream = stream or sys.stdout
        self.show = is_rank_zero()
        self.start = self.last_print = time.perf_counter()
        self.done = 0
        self._bar = None
        use_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        if self.show and use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit, file=self.stream, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return (f"{self.what} {self.done}/{self.total} {self.unit} | elapsed {format_duration(elapsed)} | "
                f"ETA {format_duration(eta)}")

    def update(self, done: int) -> None:
        if not self.show:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
            self.done = done
            return
        self.done = done
        now = time.perf_counter()
        if now - self.last_print >= self.interval or done >= self.total:
            self.last_print = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
