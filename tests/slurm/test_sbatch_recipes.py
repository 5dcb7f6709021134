"""The shipped examples/paper/slurm/*.sbatch scripts, unchanged, under a real single-node Slurm (conftest.py):

- reward_model.sbatch trains a reward model at 2 tasks (data parallel over srun, rendezvous from Slurm's own
  variables) and fits its normalizer; its per-step losses equal the same train-rm under `torchrun --nproc-per-node 2`;
- preemption: `scancel --signal=USR1` mid-run makes every rank checkpoint at the next step and exit with code 75,
  the script requeues the job, the rerun resumes, and the losses of all steps equal the uninterrupted torchrun run;
- a rank that dies (SIGKILL to one task) ends the whole job, FAILED with srun's error, within a bounded time.

The model is a tiny random one in the Phi-3 recipe's shape (examples/paper/phi3-mini/common.yaml with size
overrides) reading real SmolLM2 token ids: a saved SFT checkpoint, the shipped HH-RLHF pairs. The jobs ask for no
GPUs (`--gpus-per-node=0`) and 2 tasks of 1 CPU; the overrides are the scripts' own arguments and environment.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_harness import FINISHED_STATES, REPO, SlurmCluster
from material import smollm2_tokenizer_dir
from megaseg.parallel.spawn import run_distributed

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

BACKBONE = "phi3-mini"
PREFERENCES = "shipped:hh_rlhf_harmless/pairs.jsonl"
CUTOFF = 10.78  # the tiny random model's entropies over 49,152 tokens sit near log(49152) = 10.80
SBATCH_RESOURCES = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
JOB_TIMEOUT = 300.0
# A dead rank must end the job within this many seconds: srun --kill-on-bad-exit, not the 30-minute collective
# timeout (parallel.distributed_timeout_minutes), is what bounds it.
RANK_DEATH_BOUND = 60.0


def _model_overrides(tokenizer_dir: Path, sft_dir: Path) -> list[str]:
    return ["model.vocab_size=49152", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.num_attention_heads=4", "model.num_query_groups=4", "model.max_position_embeddings=256",
            "model.eos_token_ids=[2]", "model.params_dtype=float32", f"model.tokenizer={tokenizer_dir}",
            f"model.checkpoint={sft_dir}"]


def _rm_overrides(tokenizer_dir: Path, sft_dir: Path) -> list[str]:
    """The tiny run's settings, after the recipe's own (the later override wins): data parallel over the 2 tasks,
    24 training pairs in steps of 4 (2 per rank), 4 epochs: 24 steps, entropy segments of the frozen SFT model."""
    return [*_model_overrides(tokenizer_dir, sft_dir), "parallel.tensor_model_parallel_size=1",
            "data.max_samples=32", "data.eval_fraction=0.25", "data.max_length=64", "data.max_prompt_length=32",
            "segmentation.mode=entropy", f"segmentation.entropy_cutoff={CUTOFF}", "rm.global_batch_size=4",
            "rm.micro_batch_size=1", "rm.epochs=4", "rm.optimizer.lr=1e-3", "rm.optimizer.warmup_ratio=0",
            "checkpoint.save_every=0", "logging.tensorboard=false"]


def _save_sft(rank, world_size, tokenizer_dir, sft_dir):
    from megaseg.config import load_config
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import destroy_parallel, initialize_parallel

    config = load_config(str(REPO / "examples" / "paper" / BACKBONE / "common.yaml"),
                         [*_model_overrides(Path(tokenizer_dir), Path(sft_dir)), "parallel.tensor_model_parallel_size=1"])
    initialize_parallel(config.parallel, seed=9)
    save_model_checkpoint(build_gpt_model(config.model, config.parallel), Path(sft_dir))
    destroy_parallel()


def _train_losses(out_dir: Path, name: str = "train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(row["step"], row[name]) for row in rows if name in row]
    steps = [step for step, _ in losses]
    assert len(steps) == len(set(steps)), f"a step was logged twice in {out_dir / 'metrics.jsonl'}: {steps}"
    return dict(losses)


def _launch_dir(root: Path) -> Path:
    """A directory to submit from, laid out like the repository root the scripts expect (examples/, model_configs/),
    whose work/ and job logs are the test's own."""
    launch = root / "launch"
    launch.mkdir()
    for name in ("examples", "model_configs"):
        (launch / name).symlink_to(REPO / name)
    return launch


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_rm")
    tokenizer_dir = smollm2_tokenizer_dir(tmp_path_factory)
    run_distributed(_save_sft, 1, str(tokenizer_dir), str(root / "sft"), timeout=300)
    return root, _rm_overrides(tokenizer_dir, root / "sft")


@pytest.fixture(scope="module")
def torchrun_losses(material) -> dict[int, float]:
    """The same train-rm as reward_model.sbatch runs (its config and arguments), under torchrun instead of srun."""
    root, overrides = material
    out_dir = root / "torchrun"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "megaseg.cli",
               "train-rm", "--config", str(REPO / "examples" / "paper" / BACKBONE / "common.yaml"),
               f"data.train_path={PREFERENCES}", "rm.epochs=1", f"logging.out_dir={out_dir}", *overrides]
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    result = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, cwd=root, capture_output=True, text=True,
                            timeout=JOB_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return _train_losses(out_dir)


def _submit_reward_model(cluster: SlurmCluster, launch: Path, overrides: list[str], rm_name: str) -> int:
    return cluster.sbatch(*SBATCH_RESOURCES, "examples/paper/slurm/reward_model.sbatch", BACKBONE, rm_name,
                          *overrides, cwd=launch, env={"PREFERENCES": PREFERENCES, "NORMALIZER_SAMPLES": "16"})


def _job_log(launch: Path, job_id: int) -> str:
    path = launch / f"megaseg-rm-{job_id}.out"
    return path.read_text() if path.exists() else f"(no job log {path})"


def _wait_for_step(out_dir: Path, step: int, cluster: SlurmCluster, job_id: int, timeout: float = JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (out_dir / "metrics.jsonl").exists() or max(_train_losses(out_dir), default=0) < step:
        assert cluster.state(job_id) in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"job {job_id} ended before step {step}: {cluster.job(job_id)}"
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {step} in {timeout:.0f} s"
        time.sleep(0.1)


def test_reward_model_sbatch_preempted_requeued_equals_torchrun(slurm_cluster, material, torchrun_losses):
    """One job covers both claims: its steps before the preemption are srun's (Slurm rendezvous) and after it the
    resumed run's, and all of them equal torchrun's; then the script fits the normalizer."""
    root, overrides = material
    (root / "preempt").mkdir()
    launch = _launch_dir(root / "preempt")
    out_dir = launch / "work" / BACKBONE / "rm-tiny"
    started = time.monotonic()
    job_id = _submit_reward_model(slurm_cluster, launch, overrides, "rm-tiny")
    _wait_for_step(out_dir, 2, slurm_cluster, job_id)
    slurm_cluster.command("scancel", "--signal=USR1", str(job_id))
    # The script requeues the job on megaseg's preemption exit code; Slurm holds a requeued job back for 2 minutes
    # (BeginTime), which the test waives instead of waiting.
    pending = slurm_cluster.wait(job_id, JOB_TIMEOUT, until=frozenset({"PENDING", *FINISHED_STATES}))
    assert pending["JobState"] == "PENDING" and pending["Restarts"] == "1", f"{pending}\n{_job_log(launch, job_id)}"
    preempted_at = max(_train_losses(out_dir))
    assert 2 <= preempted_at < len(torchrun_losses)
    checkpoint = (out_dir / "checkpoints" / "latest").read_text().strip()
    assert checkpoint == f"step_{preempted_at:06d}"
    slurm_cluster.wait_until_idle()
    # slurmd refuses a job whose credential is not newer (whole seconds) than the revocation of its killed instance
    # ("Killing non-startable batch JobId=1: Job credential revoked" in slurmctld.log, the job FAILED with exit
    # code 1 and no output): the 2-minute hold normally keeps that apart; waived, the restart waits past it.
    time.sleep(2.0)
    slurm_cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    info = slurm_cluster.wait(job_id, JOB_TIMEOUT)
    elapsed = time.monotonic() - started
    log = _job_log(launch, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert "preempted (SIGUSR1): saved" in log and "requeueing job" in log, log
    assert f"resumed at step {preempted_at}" in log, log
    assert len(torchrun_losses) == 24
    assert _train_losses(out_dir) == torchrun_losses, log
    normalizer = json.loads((out_dir / "reward_model" / "normalizer.json").read_text())
    assert normalizer["kind"] == "location" and normalizer["calibration"]["num_pairs"] == 16, normalizer
    assert log.count('{"normalizer": ') == 1, log  # one summary line: rank 0's
    print(f"preempted job {job_id}: stopped after step {preempted_at}, requeued, finished; {elapsed:.1f} s")


def _task_pid(job_id: int, procid: int) -> int:
    """The pid of the megaseg process that srun started as task ``procid`` of ``job_id`` (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            cmdline = (entry / "cmdline").read_text()
        except OSError:
            continue
        if (environ.get("SLURM_JOB_ID") == str(job_id) and environ.get("SLURM_PROCID") == str(procid)
                and "train-rm" in cmdline and "srun" not in cmdline.split("\0")[0]):
            return int(entry.name)
    raise AssertionError(f"no task {procid} of job {job_id} found in /proc")


def test_dead_rank_ends_the_job(slurm_cluster, material):
    root, overrides = material
    (root / "rank_death").mkdir()
    launch = _launch_dir(root / "rank_death")
    out_dir = launch / "work" / BACKBONE / "rm-tiny"
    job_id = _submit_reward_model(slurm_cluster, launch, overrides, "rm-tiny")
    _wait_for_step(out_dir, 1, slurm_cluster, job_id)
    os.kill(_task_pid(job_id, 1), signal.SIGKILL)
    killed = time.monotonic()
    info = slurm_cluster.wait(job_id, RANK_DEATH_BOUND)
    elapsed = time.monotonic() - killed
    log = _job_log(launch, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", f"{info}\n{log}"
    assert "task 1: Killed" in log, log
    assert not (out_dir / "reward_model").exists()
    print(f"job {job_id} ended {elapsed:.1f} s after task 1 was killed: {info['JobState']} {info['ExitCode']}")


DPO_OVERRIDES = ["parallel.tensor_model_parallel_size=1", f"data.train_path={PREFERENCES}", "data.max_samples=20",
                 "data.eval_fraction=0.2", "data.max_length=64", "data.max_prompt_length=40",
                 "dpo.global_batch_size=4", "dpo.micro_batch_size=1", "dpo.max_steps=2", "dpo.optimizer.lr=1e-3",
                 "dpo.optimizer.warmup_ratio=0", "checkpoint.save_every=0", "logging.tensorboard=false"]
PPO_OVERRIDES = ["parallel.tensor_model_parallel_size=1", "data.prompt_format=auto",
                 "data.prompt_path=shipped:prompts/arena-hard-v0.1_question.jsonl", "data.max_samples=16",
                 "ppo.eval_every=0", "ppo.eval_max_prompts=2", "ppo.rollout_batch_size=4", "ppo.train_batch_size=2",
                 "ppo.micro_batch_size=1", "ppo.micro_rollout_batch_size=2", "ppo.max_prompt_length=48",
                 "ppo.max_new_tokens=8", "ppo.max_steps=2", "ppo.actor_optimizer.lr=1e-4",
                 "ppo.critic_optimizer.lr=1e-4", "ppo.actor_optimizer.warmup_ratio=0",
                 "ppo.critic_optimizer.warmup_ratio=0", "checkpoint.save_every=0", "logging.tensorboard=false"]


def _sbatch_and_torchrun(cluster: SlurmCluster, root: Path, name: str, command: str, config: str,
                         overrides: list[str], loss_names: tuple[str, ...]) -> None:
    """`sbatch <name>.sbatch CONFIG overrides` and `torchrun ... megaseg <command> --config CONFIG overrides` side
    by side (different out_dirs); every step's ``loss_names`` equal."""
    (root / name).mkdir()
    launch = _launch_dir(root / name)
    started = time.monotonic()
    job_id = cluster.sbatch(*SBATCH_RESOURCES, f"examples/paper/slurm/{name}.sbatch", config, *overrides,
                            f"logging.out_dir={launch / 'slurm'}", cwd=launch)
    torchrun_dir = root / f"{name}_torchrun"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    result = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                             "-m", "megaseg.cli", command, "--config", str(REPO / config), *overrides,
                             f"logging.out_dir={torchrun_dir}"],
                            env={**env, "OMP_NUM_THREADS": "1"}, cwd=root, capture_output=True, text=True,
                            timeout=JOB_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = cluster.wait(job_id, JOB_TIMEOUT)
    elapsed = time.monotonic() - started
    log_path = launch / f"megaseg-{name}-{job_id}.out"
    log = log_path.read_text() if log_path.exists() else f"(no job log {log_path})"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    for loss_name in loss_names:
        expected = _train_losses(torchrun_dir, loss_name)
        assert sorted(expected) == [1, 2], (loss_name, expected)
        assert _train_losses(launch / "slurm", loss_name) == expected, (loss_name, log)
    print(f"{name}.sbatch job {job_id} and its torchrun twin: {elapsed:.1f} s")


def test_dpo_sbatch_equals_torchrun(slurm_cluster, material):
    root, overrides = material
    model = [item for item in overrides if item.startswith("model.")]
    _sbatch_and_torchrun(slurm_cluster, root, "dpo", "train-dpo", f"examples/paper/{BACKBONE}/table3-dpo.yaml",
                         [*model, *DPO_OVERRIDES], ("train/loss",))


def _write_normalizer(rm_dir: Path) -> None:
    """A location normalizer fitted on synthetic rewards (PPO only needs one with the right metadata)."""
    import numpy as np

    from megaseg.algorithms.normalizer import LocationNormalizer

    rng = np.random.default_rng(0)
    p = np.concatenate([(np.arange(t) + 1) / t for t in rng.integers(1, 9, size=300)])
    LocationNormalizer.fit(p, 0.3 * np.log(p) + rng.normal(0, 0.05, p.size), model="Phi-3-mini-4k-instruct",
                           c_ent=CUTOFF, aggregation="mean", segmentation="entropy").save(rm_dir / "normalizer.json")


def test_ppo_sbatch_equals_torchrun(slurm_cluster, material, torchrun_losses):
    """PPO against the reward model the torchrun fixture trained (same tiny backbone), 2 steps."""
    root, overrides = material
    rm_dir = root / "torchrun" / "reward_model"
    _write_normalizer(rm_dir)
    model = [item for item in overrides if item.startswith(("model.", "segmentation."))]
    _sbatch_and_torchrun(slurm_cluster, root, "ppo", "train-ppo", f"examples/paper/{BACKBONE}/table1-segment.yaml",
                         [*model, f"rm.checkpoint={rm_dir}", *PPO_OVERRIDES],
                         ("train/policy_loss", "train/value_loss", "train/rm_score"))
