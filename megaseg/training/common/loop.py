"""The one trainer shape: build (from config, or from objects for tests) -> resume -> loop -> step as named, timed
phases; the step planner and the epoch-tail rule every trainer shares.

A trainer subclasses ``Trainer`` and provides the step (its phases timed with ``self.timer.phase(name)``), the
models it trains (by role, for checkpoints) and optionally an evaluation and extra state to checkpoint. ``run``
does the rest, identically for train-rm, train-ppo and train-dpo:

    save the resolved config -> resume from the latest checkpoint (invariants checked) -> [evaluate at step 0]
    -> per step: the next global batch (epoch tail skipped) -> step -> log (train/, time/, ...) -> evaluate every
       `eval_every` -> checkpoint every `checkpoint.save_every`
    -> final evaluation and checkpoint -> the trainer's result

Preemption: while ``run`` is looping, SIGTERM and SIGUSR1 (what Slurm sends before it kills or preempts a job, e.g.
``sbatch --signal=USR1@120``) only set a flag. At the next step boundary the ranks agree on it (one tiny sum over
the world, so a signal that reached only some ranks stops all of them at the same step), save a complete checkpoint
unless that step already saved one, and raise ``Preempted``: a ``SystemExit`` with ``PREEMPTED_EXIT_CODE``, so the
process exits with that code and a job script can requeue itself (examples/paper/slurm). The rerun resumes from the
checkpoint exactly. Repeated signals change nothing (Slurm's SIGKILL after KillWait is the hard stop); a signal
before the loop starts (during the build or the resume) still has its default action.
"""
from __future__ import annotations

import abc
import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import torch

from megaseg.checkpoint.resume import checkpoint_root, resume_latest
from megaseg.checkpoint.step_dirs import TrainedModel, TrainingProgress, save_training_checkpoint
from megaseg.config import MegasegConfig, save_config
from megaseg.data.sampler import ResumableShardedSampler
from megaseg.parallel.collectives import sum_across_ranks
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.common.metrics import PhaseTimer, RunLogger

# The exit code of a run stopped by a preemption signal after its checkpoint: EX_TEMPFAIL of sysexits.h ("try again
# later"). examples/paper/slurm/srun_or_requeue.sh requeues the job on it.
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by ``Trainer.run`` after the checkpoint of a preempted run; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.checkpoint = step, checkpoint


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 while ``installed()`` is active; ``agreed()`` is the same answer on every rank."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator["PreemptionFlag"]:
        """Handle the preemption signals inside the block, restore the previous handlers after it (unless it raises
        ``Preempted``: then the signals are ignored until the process has exited). Signals can only
        be handled in the main thread; elsewhere (a trainer run from a worker thread) the block changes nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in PREEMPTION_SIGNALS}
        try:
            yield self
        except Preempted:
            # Ignore the signals on the way out: under `srun --kill-on-bad-exit` the first rank to exit with
            # PREEMPTED_EXIT_CODE makes srun SIGTERM the others, which must still exit with that code. SIG_IGN, not a
            # Python handler: the interpreter resets its own handlers to the default early in its finalization.
            previous = {signum: signal.SIG_IGN for signum in PREEMPTION_SIGNALS}
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def agreed(self, parallel_ctx: ParallelContext) -> bool:
        """Whether any rank got a preemption signal (collective: every rank calls it at the same step)."""
        local = torch.tensor([0.0 if self.signal_name is None else 1.0])
        return bool(sum_across_ranks(local, device=parallel_ctx.device).item() > 0)


@dataclass(frozen=True)
class StepPlan:
    """How many samples each step, rank and micro-batch takes, and how many steps the run has."""

    global_batch_size: int   # samples (pairs, prompts) per step, all data-parallel ranks together
    micro_batch_size: int    # samples per forward pass
    dp_size: int
    steps_per_epoch: int
    total_steps: int         # steps this run takes: the epochs', or fewer when max_steps stops it early
    schedule_steps: int      # steps the LR schedule spans: always the epochs' (so max_steps may change on resume)

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def num_micro_batches(self) -> int:
        return self.per_rank // self.micro_batch_size


def plan_steps(*, section: str, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_size: int,
               epochs: int, max_steps: Optional[int], batch_key: str = "global_batch_size",
               epochs_key: str = "epochs", unit: str = "pairs") -> StepPlan:
    """Check that the batch divides over ranks and micro-batches; schedule steps = epochs x whole global batches per
    epoch (the sampler drops the ``num_samples % dp_size`` remainder and the epoch tail); total steps = those, or
    max_steps when that is smaller (a stop point: it does not change the schedule of the steps that run).

    ``section``/``batch_key``/``epochs_key`` name the config fields in error messages (e.g. ppo.rollout_batch_size).
    """
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(
            f"{section}.{batch_key}={global_batch_size} must be a multiple of data-parallel size {dp_size} x "
            f"micro-batch size {micro_batch_size} = {dp_size * micro_batch_size}; change one of them")
    steps_per_epoch = (num_samples - num_samples % dp_size) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_samples} training {unit} are fewer than one global batch ({section}.{batch_key}="
                         f"{global_batch_size}); lower it or add data")
    schedule_steps = steps_per_epoch * epochs
    total_steps = schedule_steps if max_steps is None else min(schedule_steps, max_steps)
    return StepPlan(global_batch_size, micro_batch_size, dp_size, steps_per_epoch, total_steps, schedule_steps)


def rank_sampler(num_samples: int, config: MegasegConfig, parallel_ctx: ParallelContext) -> ResumableShardedSampler:
    """This rank's share of a seeded, resumable order over the training samples."""
    return ResumableShardedSampler(num_samples, seed=config.seed, dp_rank=parallel_ctx.dp_rank,
                                   dp_size=parallel_ctx.dp_size, shuffle=config.data.shuffle, drop_last=True)


@dataclass(frozen=True)
class StepReport:
    """What one step reports: ``train`` makes the progress line (and the train/ metrics); ``extra`` maps other
    prefixes (ppo/, speed/) to their metrics."""

    train: Mapping[str, float]
    extra: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    messages: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunResult:
    """What a finished run did: steps, the last step's and the last evaluation's metrics, and the trainer's own
    outputs (train-rm: the reward-model directory)."""

    steps: int
    last_metrics: Mapping[str, float]
    last_eval: Optional[Mapping[str, float]]
    outputs: Mapping[str, Any] = field(default_factory=dict)


class Trainer(abc.ABC):
    """See the module docstring. Subclasses set ``config_sections`` (the settings a resume must share) and build
    themselves, then ``run()``."""

    config_sections: ClassVar[tuple[str, ...]] = ()
    evaluates_at_start: ClassVar[bool] = False

    def __init__(self, config: MegasegConfig, parallel_ctx: ParallelContext, *, plan: StepPlan,
                 sampler: ResumableShardedSampler) -> None:
        self.config, self.ctx, self.plan, self.sampler = config, parallel_ctx, plan, sampler
        self.timer = PhaseTimer()
        # Silent until run() opens the real one (a step called directly, as tests do, logs nothing).
        self.logger = RunLogger(config.logging, plan.total_steps, is_main=False)

    # --- what a trainer provides -----------------------------------------------------------------------------

    @abc.abstractmethod
    def trained_models(self) -> Mapping[str, TrainedModel]:
        """role -> model with its optimizer and schedule, as saved in every checkpoint."""

    @abc.abstractmethod
    def step(self, indices: list[int], progress: TrainingProgress) -> StepReport:
        """One step on this rank's samples ``indices`` of the global batch (collective)."""

    def evaluate(self, step: int) -> Optional[dict[str, float]]:
        """Held-out metrics after ``step`` steps (collective), or None when the trainer has no evaluation."""
        return None

    @property
    def eval_every(self) -> int:
        return 0

    @property
    def evaluates_at_end(self) -> bool:
        return True

    def trainer_state(self) -> dict[str, Any]:
        """JSON-like state beyond the models and the sampler that a resumed run needs (PPO: the KL coefficient)."""
        return {}

    def load_trainer_state(self, state: Mapping[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return ""

    def finish(self, progress: TrainingProgress, result: RunResult) -> RunResult:
        """After the last step and checkpoint: the trainer's final outputs (train-rm writes the reward model)."""
        return result

    # --- the loop ---------------------------------------------------------------------------------------------

    def train_one_step(self, progress: TrainingProgress) -> tuple[StepReport, TrainingProgress]:
        """The next global batch (epoch tail skipped) -> ``step`` -> the progress after it (collective)."""
        indices = self.sampler.next_global_batch(self.plan.global_batch_size)
        report = self.step(indices, progress)
        self.sampler.advance(self.plan.global_batch_size)
        return report, TrainingProgress(
            step=progress.step + 1, consumed_samples=progress.consumed_samples + self.plan.global_batch_size,
            epoch=self.sampler.epoch, data_state={"sampler": self.sampler.state_dict(), **self.trainer_state()})

    def resume(self) -> TrainingProgress:
        loaded = resume_latest(self.config, sections=self.config_sections, models=self.trained_models())
        if loaded is None:
            return TrainingProgress()
        self.sampler.load_state_dict(loaded.progress.data_state["sampler"])
        self.load_trainer_state(loaded.progress.data_state)
        return loaded.progress

    def save(self, progress: TrainingProgress) -> Path:
        with self.timer.phase("checkpoint"):
            return save_training_checkpoint(checkpoint_root(self.config), models=self.trained_models(),
                                            config=self.config, progress=progress,
                                            keep_last=self.config.checkpoint.keep_last)

    def _evaluate_and_log(self, step: int) -> Optional[dict[str, float]]:
        with self.timer.phase("evaluate"):
            metrics = self.evaluate(step)
        if metrics is not None:
            self.logger.log(step, metrics, prefix="eval")
        return metrics

    def _log(self, step: int, report: StepReport) -> None:
        for text in report.messages:
            self.logger.message(text)
        for prefix, metrics in report.extra.items():
            self.logger.log(step, metrics, prefix=prefix)
        self.logger.log(step, self.timer.pop(), prefix="time")
        self.logger.log(step, report.train, prefix="train")

    def _stop_preempted(self, progress: TrainingProgress, checkpoint: Optional[Path],
                        signal_name: Optional[str]) -> None:
        """Save the step unless it just was, then raise ``Preempted`` (every rank)."""
        checkpoint = checkpoint or self.save(progress)
        self.logger.message(f"preempted ({signal_name or 'signal on another rank'}): saved {checkpoint}; exiting "
                            f"with code {PREEMPTED_EXIT_CODE}, a rerun resumes at step {progress.step}")
        raise Preempted(progress.step, checkpoint)

    def run(self) -> RunResult:
        """The whole run on initialised process groups (every rank calls it)."""
        config = self.config
        if self.ctx.is_rank_zero:  # the inputs are validated by now (the trainer is built): nothing is half-written
            save_config(config, Path(config.logging.out_dir))
        with self.timer.phase("resume"):
            progress = self.resume()
        self.logger = RunLogger(config.logging, self.plan.total_steps, is_main=self.ctx.is_rank_zero,
                                run_config=config, start_step=progress.step)
        metrics: Mapping[str, float] = {}
        last_eval = None
        preemption = PreemptionFlag()
        try:
            self.logger.message(self.describe() + (f"; resumed at step {progress.step} ({progress.consumed_samples} "
                                                   "samples consumed)" if progress.step else ""))
            self.logger.log(progress.step, self.timer.pop(), prefix="time")
            if self.evaluates_at_start and progress.step == 0:
                last_eval = self._evaluate_and_log(0)
            save_every, eval_every = config.checkpoint.save_every, self.eval_every
            if progress.step == self.plan.total_steps and self.evaluates_at_end:  # resumed after the last step
                last_eval = self._evaluate_and_log(progress.step)
            with preemption.installed():
                while progress.step < self.plan.total_steps:
                    report, progress = self.train_one_step(progress)
                    metrics = report.train
                    self._log(progress.step, report)
                    last_step = progress.step == self.plan.total_steps
                    if (eval_every and progress.step % eval_every == 0) or (last_step and self.evaluates_at_end):
                        last_eval = self._evaluate_and_log(progress.step)
                    checkpoint = None
                    if last_step or (save_every and progress.step % save_every == 0):
                        checkpoint = self.save(progress)
                    if not last_step and preemption.agreed(self.ctx):
                        self._stop_preempted(progress, checkpoint, preemption.signal_name)
            result = self.finish(progress, RunResult(steps=progress.step, last_metrics=dict(metrics),
                                                     last_eval=last_eval))
        finally:
            self.logger.close()
        return result

