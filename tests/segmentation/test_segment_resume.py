"""The segmentation cache survives a kill: a run killed with SIGKILL after some entropy shards leaves only complete
shards; the rerun reuses them untouched, computes the rest, and ends with exactly the result of an uninterrupted run.

The worker is this file run as a script (a fresh interpreter, like `megaseg segment`), so the kill is a real one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
HELPERS = HERE.parent / "helpers"
NUM_PAIRS, SHARD_SIZE, CUTOFF = 12, 2, 2.95


def _worker(cache_dir: str, delay: float, fresh_cache_dir: str) -> None:
    """Segment the pairs into cache_dir (sleeping `delay` s after each shard written), print the ends as JSON; then,
    if fresh_cache_dir is given, segment again from scratch there and print that too."""
    from megaseg.segmentation.cache import ShardedStore
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel
    from megaseg.segmentation import segment_ends_for
    from scoring_test_helpers import random_pairs, sharpen, tiny_config

    if delay > 0:
        write_shard = ShardedStore.write_shard

        def slow_write_shard(self, shard, arrays):
            write_shard(self, shard, arrays)
            time.sleep(delay)

        ShardedStore.write_shard = slow_write_shard
    config = tiny_config(cache_dir, shard_size=SHARD_SIZE, micro_batch_size=2, entropy_cutoff=CUTOFF)
    ctx = initialize_parallel(config.parallel, seed=11)
    model = build_gpt_model(config.model, config.parallel)
    sharpen(model)
    model.eval()
    pairs = random_pairs(NUM_PAIRS)
    for directory in [cache_dir] + ([fresh_cache_dir] if fresh_cache_dir else []):
        config = tiny_config(directory, shard_size=SHARD_SIZE, micro_batch_size=2, entropy_cutoff=CUTOFF)
        segmented = segment_ends_for(config, pairs, ctx, model)
        ends = [segmented.chosen_ends[i].tolist() + [-1] + segmented.rejected_ends[i].tolist()
                for i in range(NUM_PAIRS)]
        print("ENDS " + json.dumps(ends), flush=True)


def _start(cache_dir, delay, fresh=""):
    env = dict(os.environ, PYTHONPATH=f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, __file__, str(cache_dir), str(delay), str(fresh)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _entropy_shards(cache_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache_dir.glob("entropy-*/shard-*.npz")}


def test_killed_run_resumes_from_its_finished_shards(tmp_path):
    cache = tmp_path / "cache"
    victim = _start(cache, delay=1.5)
    deadline = time.monotonic() + 240
    while len(_entropy_shards(cache)) < 2:
        assert victim.poll() is None, f"the worker ended before it was killed:\n{victim.stdout.read()}"
        assert time.monotonic() < deadline, "the worker wrote no entropy shards in time"
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    survivors = _entropy_shards(cache)
    (entry,) = cache.glob("entropy-*")
    assert 2 <= len(survivors) < NUM_PAIRS // SHARD_SIZE and not (entry / "complete.json").exists()
    for name in survivors:  # every shard on disk is complete (written aside, renamed into place)
        with np.load(entry / name) as arrays:
            assert set(arrays.files) >= {"chosen_entropy", "rejected_entropy", "chosen_offsets"}

    rerun = _start(cache, delay=0, fresh=tmp_path / "fresh")
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    remaining = NUM_PAIRS // SHARD_SIZE - len(survivors)
    assert f"{remaining} shard(s) to compute" in output
    after = _entropy_shards(cache)
    assert all(after[name] == survivors[name] for name in survivors)  # reused, not rewritten
    assert len(after) == NUM_PAIRS // SHARD_SIZE and (entry / "complete.json").exists()
    resumed, uninterrupted = [json.loads(line[5:]) for line in output.splitlines() if line.startswith("ENDS ")]
    assert resumed == uninterrupted
    assert sum(len(row) - 1 for row in resumed) > 2 * NUM_PAIRS  # the cutoff really cuts


@pytest.mark.slow
@pytest.mark.fault_injection
def test_kills_at_seeded_random_moments_always_resume_to_the_uninterrupted_result(tmp_path):
    """Three SIGKILLs at moments drawn from a seeded schedule (anywhere: during start-up, the forward, a shard's
    write or its rename), each followed by a restart; the last restart finishes and equals an uninterrupted run."""
    cache = tmp_path / "cache"
    schedule = np.random.default_rng(20261203).uniform(1.0, 9.0, size=3)
    killed = 0
    for trial, kill_after in enumerate(schedule):
        victim = _start(cache, delay=0.5)
        time.sleep(kill_after)
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            killed += 1
        victim.wait(timeout=60)
        for path in cache.glob("entropy-*/shard-*.npz"):  # whatever is on disk under its final name is whole
            with np.load(path) as arrays:
                assert "chosen_entropy" in arrays.files, (trial, path)
    assert killed >= 2, f"only {killed} of the runs were still going when their kill came"
    rerun = _start(cache, delay=0, fresh=tmp_path / "fresh")
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    resumed, uninterrupted = [json.loads(line[5:]) for line in output.splitlines() if line.startswith("ENDS ")]
    assert resumed == uninterrupted


if __name__ == "__main__":
    _worker(sys.argv[1], float(sys.argv[2]), sys.argv[3])
