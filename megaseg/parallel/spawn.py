"""Run a function on N fresh gloo processes, torchrun-style, and collect what each rank returns (for tests/benchmarks).

Every rank is a fresh ``spawn``-ed interpreter, so megatron's parallel_state and the CUDA-compat patches never leak
between runs or into the parent (the pytest process). Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT on a free local port, exactly what torchrun would export, so ``initialize_parallel`` inside ``fn`` takes
its ordinary torchrun path.

Failure handling, so that a test can never hang:
- a rank that raises sends its traceback to the parent; the parent gives the other ranks a short grace period (they
  are usually stuck in a collective waiting for the dead one), terminates them and raises ``DistributedRunError``
  with every failed rank's traceback;
- a rank that dies without a word (segfault, OOM kill) is reported with its exit code;
- past ``timeout`` seconds every rank is terminated and ``DistributedRunError`` names the ranks that had not
  finished; shortly before that, each rank dumps its Python stacks to stderr (faulthandler) to show where it hung.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable, Optional

# How long ranks that all reported success get to exit by themselves before they are terminated.
CLEAN_EXIT_GRACE_SECONDS = 30.0
# After the first rank fails, how long the others get to report their own errors before they are terminated.
FAILURE_GRACE_SECONDS = 5.0
# The stacks of a hung rank are dumped this long before the parent's timeout kills it.
STACK_DUMP_LEAD_SECONDS = 3.0
# Binding the chosen port can race with another process picking the same free port; retry the run that many times.
PORT_RETRIES = 3


class DistributedRunError(RuntimeError):
    """One or more ranks failed, died or timed out. ``rank_errors`` maps rank -> formatted traceback or reason;
    ``exceptions`` maps rank -> the original exception where it could be pickled back."""

    def __init__(self, message: str, rank_errors: dict[int, str], exceptions: dict[int, BaseException]):
        super().__init__(message)
        self.rank_errors = rank_errors
        self.exceptions = exceptions


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _picklable_exception(exc: BaseException) -> Optional[bytes]:
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)
        return payload
    except Exception:
        return None


def _destroy_if_initialized() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from megaseg.parallel.initialize import destroy_parallel

    destroy_parallel()


def _worker(fn, rank, world_size, port, args, results, threads_per_rank, stack_dump_after) -> None:
    # Launcher variables must describe this rank only, even when the parent runs inside a Slurm job or under torchrun.
    # Lead a process group of our own, so the parent can stop every helper this rank starts (see _terminate).
    os.setpgid(0, 0)
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
            del os.environ[name]
    os.environ.update(_torchrun_env(rank, world_size, port))
    if stack_dump_after is not None:
        faulthandler.dump_traceback_later(stack_dump_after, exit=False)
    import torch

    # Ranks share the machine's cores; without this each one starts a thread per core and they thrash.
    torch.set_num_threads(threads_per_rank)
    try:
        value = fn(rank, world_size, *args)
        _destroy_if_initialized()
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as exc:  # report everything, KeyboardInterrupt included, then exit non-zero
        results.put((rank, "error", (traceback.format_exc(), _picklable_exception(exc))))
    finally:
        faulthandler.cancel_dump_traceback_later()


def _is_port_collision(rank_errors: dict[int, str]) -> bool:
    return any("EADDRINUSE" in text or "address already in use" in text.lower() for text in rank_errors.values())


def _signal_process_group(process, signal_number: int) -> None:
    try:
        os.killpg(process.pid, signal_number)
    except (ProcessLookupError, PermissionError, TypeError):
        pass  # the group is empty (everything already exited) or the rank never started


def _terminate(processes: list) -> None:
    """Stop the ranks and every helper process they started.

    Each rank leads its own process group (see ``_worker``). Helpers it started, dist_checkpointing's multiprocessing
    Manager for one, stay in that group even after the rank itself has exited and they were re-parented, so signalling
    the group reaches them; otherwise each would linger with ~280 MB.
    """
    for process in processes:
        _signal_process_group(process, signal.SIGTERM)
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
    for process in processes:
        _signal_process_group(process, signal.SIGKILL)


class _Run:
    """One attempt: start the ranks, collect their reports, always reap every process."""

    def __init__(self, fn, world_size, args, timeout, threads_per_rank):
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.world_size = world_size
        self.timeout = timeout
        port = find_free_port()
        dump_after = max(1.0, timeout - STACK_DUMP_LEAD_SECONDS)
        self.processes = [
            context.Process(
                target=_worker,
                args=(fn, rank, world_size, port, args, self.results, threads_per_rank, dump_after),
                name=f"megaseg-rank{rank}",
                # Not a daemon: ranks may start helper processes themselves (dist_checkpointing.save does).
                daemon=False,
            )
            for rank in range(world_size)
        ]
        self.values: dict[int, Any] = {}
        self.errors: dict[int, str] = {}
        self.exceptions: dict[int, BaseException] = {}
        self.seen_dead: set[int] = set()

    def _record(self, rank: int, status: str, payload: Any) -> None:
        if status == "ok":
            self.values[rank] = pickle.loads(payload)
            return
        text, exc_payload = payload
        self.errors[rank] = text
        if exc_payload is not None:
            self.exceptions[rank] = pickle.loads(exc_payload)

    def _note_silent_deaths(self) -> None:
        """A rank that exited without a report is dead. A rank flushes its report before it exits, but the parent
        can see the exit between an empty poll and this check, so only a rank seen dead on two consecutive empty
        polls counts."""
        for rank, process in enumerate(self.processes):
            if rank in self.values or rank in self.errors or process.exitcode is None:
                continue
            if rank in self.seen_dead:
                self.errors[rank] = f"rank {rank} died with exit code {process.exitcode} without reporting"
            self.seen_dead.add(rank)

    def execute(self) -> None:
        for process in self.processes:
            process.start()
        try:
            self._collect()
            if not self.errors:
                # Let ranks that reported success exit on their own, so their atexit handlers shut their helpers
                # down cleanly; whatever still runs after that is terminated below.
                for process in self.processes:
                    process.join(timeout=CLEAN_EXIT_GRACE_SECONDS)
        finally:
            _terminate(self.processes)
            self.results.close()

    def _collect(self) -> None:
        deadline = time.monotonic() + self.timeout
        first_failure: Optional[float] = None
        while len(self.values) + len(self.errors) < self.world_size:
            now = time.monotonic()
            if now > deadline or (first_failure is not None and now > first_failure + FAILURE_GRACE_SECONDS):
                break
            try:
                self._record(*self.results.get(timeout=0.2))
            except queue.Empty:
                # A dead process' last message may still be in the pipe: only count silent deaths after a drain.
                self._note_silent_deaths()
            if self.errors and first_failure is None:
                first_failure = time.monotonic()
        pending = [rank for rank in range(self.world_size) if rank not in self.values and rank not in self.errors]
        if pending and not self.errors:
            for rank in pending:
                self.errors[rank] = f"rank {rank} did not finish within {self.timeout:.0f} s (stacks dumped above)"
        elif pending:
            for rank in pending:
                self.errors[rank] = f"rank {rank} was terminated after another rank failed"


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    threads_per_rank: Optional[int] = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return the values ordered by rank.

    ``fn`` must be picklable (a module-level function) and its return value too. Inside ``fn``, call
    ``initialize_parallel(...)`` to set up torch.distributed (gloo on CPU) and megatron's parallel_state; whatever is
    still initialised when ``fn`` returns is torn down before the process exits.

    Args:
        timeout: seconds for the whole run, process start-up (importing torch and megatron) included.
        threads_per_rank: torch intra-op threads per rank; default: the cores divided among the ranks (at least 1).

    Raises:
        DistributedRunError: a rank raised, died or did not finish in time (the message holds each traceback).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    for attempt in range(PORT_RETRIES):
        run = _Run(fn, world_size, args, timeout, threads_per_rank)
        run.execute()
        if not run.errors:
            return [run.values[rank] for rank in range(world_size)]
        if not (_is_port_collision(run.errors) and attempt + 1 < PORT_RETRIES):
            break
    details = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(run.errors.items()))
    raise DistributedRunError(
        f"{len(run.errors)} of {world_size} ranks failed running {getattr(fn, '__qualname__', fn)}:\n{details}",
        run.errors,
        run.exceptions,
    )
