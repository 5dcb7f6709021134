"""The benchmark scripts in smoke mode (tiny random Llama over SmolLM2's tokenizer, a few tokens / pairs / steps):
each runs end to end, checks that its two sides compute the same thing and prints its figures as one JSON last line.
The figures themselves are only meaningful on SmolLM2 (the scripts' docstrings); here they only have to exist.
Marked slow: each is a subprocess that imports megatron twice (script and spawned rank) and loads both stacks
(15-45 s on 2 shared cores; the first also converts the tiny model once for all three)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tiny model (HF + megatron conversion) shared by the three scripts."""
    return tmp_path_factory.mktemp("bench_cache")


def _run(script: str, cache_dir: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--model", "tiny",
                                "--cache-dir", str(cache_dir), *args],
                               capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_generation_smoke(cache_dir):
    result = _run("generation.py", cache_dir, "--batch-size", "3", "--max-new-tokens", "6", "--repeats", "1")
    assert result["same_tokens"] and result["differing_rows"] == []
    assert result["megaseg"]["tokens"] == result["hf"]["tokens"] == 18
    assert result["megaseg_over_hf"] > 0 and result["megaseg"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_decode_step_smoke(cache_dir):
    result = _run("decode_step.py", cache_dir, "--batch-size", "3", "--extra-columns", "4", "--steps", "2",
                  "--rounds", "1")
    assert result["same_logits_megatron_layer"] and result["same_argmax_hf"]
    assert result["max_abs_logit_difference_hf"] < 1e-3
    assert result["inlined_layers"] == 2  # every layer of the tiny model takes the inlined step
    assert result["megatron_layer_over_inlined"] > 0 and result["hf_over_megaseg"] > 0


@pytest.mark.slow
def test_rm_training_smoke(cache_dir):
    result = _run("rm_training.py", cache_dir, "--pairs", "2", "--micro-batch", "1", "--top-layers", "1",
                  "--rounds", "1")
    losses = result["versus_hf"]["first_step_loss"]
    assert abs(losses["megaseg_packed"] - losses["hf"]) <= 1e-4 and abs(losses["megaseg_padded"] - losses["hf"]) <= 1e-4
    assert result["segment_over_bandit"] > 0 and result["megaseg_over_hf"] > 0 and result["tokens_per_s"] > 0
    assert result["packed_over_padded"] > 0 and result["megaseg_padded_over_hf"] > 0


@pytest.mark.slow
def test_ppo_step_smoke(cache_dir):
    result = _run("ppo_step.py", cache_dir, "--steps", "1", "--rollout-batch", "4", "--max-new-tokens", "4")
    phases = result["phase_seconds"]
    assert {"rollout", "actor_forward", "reference_forward", "critic_forward", "segmentation", "score_segments",
            "shape_rewards", "advantages", "update_critic", "update_actor"} <= set(phases)
    assert 0 < result["reward_machinery_share"] < 1


SHADOW_CHECK = r"""
import importlib.util, runpy, sys
from pathlib import Path
bench = Path(sys.argv[1])
for script in sorted(bench.glob("*.py")):
    if "__main__" not in script.read_text():
        continue  # a helper module (bench_models), not a script
    sys.path[0] = str(bench)  # what `python benchmarks/<script>.py` starts with
    runpy.run_path(str(script), run_name="imported")  # the module level only: imports and the sys.path fix
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin).parent != bench, f"{script.name} leaves {spec.origin} importable as kernels"
import transformers.activations  # probes `kernels` (the fake distribution below says it is installed)
print("ok")
"""


def test_benchmark_scripts_do_not_shadow_the_kernels_package(tmp_path):
    """CI failed once on this: a script's folder is sys.path[0], so benchmarks/kernels.py answered transformers'
    `import kernels` probe (made when a `kernels` distribution is installed) and every HF load died with an
    ImportError. A fake `kernels` distribution makes transformers probe here as it did there."""
    dist_info = tmp_path / "kernels-0.18.2.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.2\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-c", SHADOW_CHECK, str(REPO / "benchmarks")],
                               capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-4000:]
