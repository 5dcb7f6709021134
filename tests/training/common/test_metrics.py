"""RunLogger writes what it is given to metrics.jsonl and TensorBoard, and its ETA follows the observed pace."""
import io
import json

from megaseg.config.training import LoggingConfig
from megaseg.training.common.metrics import PhaseTimer, RunLogger, format_duration


def test_metrics_reach_jsonl_and_tensorboard(tmp_path):
    stream = io.StringIO()
    logger = RunLogger(LoggingConfig(out_dir=str(tmp_path), log_every=2), total_steps=4, stream=stream)
    for step in range(1, 5):
        logger.log(step, {"loss": 1.0 / step, "acc": 0.5})
    logger.log(4, {"acc": 0.75}, prefix="eval")
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 4]
    assert rows[2]["train/loss"] == 1.0 / 3 and rows[4]["eval/acc"] == 0.75
    printed = stream.getvalue().splitlines()
    assert [line.split(" |")[0] for line in printed] == ["step 2/4", "step 4/4"]  # every log_every steps + last
    assert "ETA" in printed[0] and "loss 0.5" in printed[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.value for event in events.Scalars("train/acc")] == [0.5] * 4


def test_non_main_ranks_write_nothing(tmp_path):
    logger = RunLogger(LoggingConfig(out_dir=str(tmp_path / "r1")), total_steps=2, is_main=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "r1").exists()


def test_eta_extrapolates_the_pace(monkeypatch):
    clock = iter([100.0, 110.0])  # start, then 10 s later
    monkeypatch.setattr("megaseg.training.common.metrics.time.perf_counter", lambda: next(clock))
    logger = RunLogger(LoggingConfig(tensorboard=False), total_steps=10, is_main=False)
    # 2 steps in 10 s -> 8 remaining steps take 40 s.
    assert logger.progress_line(2, {"loss": 0.1}).endswith("elapsed 0m10s | ETA 0m40s")
    assert format_duration(3725) == "1h02m05s"


def test_phase_timer_accumulates_and_resets():
    timer = PhaseTimer()
    with timer.phase("rollout"):
        pass
    with timer.phase("rollout"):
        pass
    seconds = timer.pop()
    assert set(seconds) == {"rollout"} and seconds["rollout"] >= 0
    assert timer.pop() == {}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_step_bar_under_the_progress_lines(tmp_path):
    terminal = _Terminal()
    logger = RunLogger(LoggingConfig(out_dir=str(tmp_path), tensorboard=False, log_every=1), total_steps=3,
                       stream=terminal, start_step=1)
    logger.message("resumed at step 1")
    for step in (2, 3):
        logger.log(step, {"loss": 0.5})
    assert logger._bar.n == 3
    logger.close()
    shown = terminal.getvalue()
    # tqdm's redraws (carriage returns) carry the bar: steps done of the total, with the rate; the lines stay whole.
    assert "3/3" in shown and "step/s" in shown.replace("s/step", "step/s")
    assert "resumed at step 1\n" in shown and "step 2/3 | loss 0.5" in shown and "step 3/3 | loss 0.5" in shown
    plain = io.StringIO()  # not a terminal (a log file, a Slurm job's output): plain lines only
    logger = RunLogger(LoggingConfig(out_dir=str(tmp_path / "log"), tensorboard=False), total_steps=1, stream=plain)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert "\r" not in plain.getvalue() and plain.getvalue().startswith("step 1/1 | loss 0.5")
