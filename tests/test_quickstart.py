"""`megaseg quickstart` end to end on a smaller setting: the embedded config with overrides for a tiny random model
(saved as a converted checkpoint, so no SmolLM2 conversion), 16 pairs and 3 steps. The real run (SmolLM2, 800 pairs)
is the README's main job; this checks the pipeline's wiring and its promised last line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from material import smollm2_tokenizer_dir
from megaseg.parallel.spawn import run_distributed

TINY_ARCHITECTURE = {"model.num_layers": 2, "model.hidden_size": 64, "model.ffn_hidden_size": 128,
                     "model.num_attention_heads": 4, "model.num_query_groups": "null", "model.kv_channels": "null"}


def _save_tiny_sft_model(rank, world_size, ckpt_dir):
    from megaseg.config import load_config
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    config = load_config(None, [f"{key}={value}" for key, value in TINY_ARCHITECTURE.items()]
                         + ["model.vocab_size=49152"])
    initialize_parallel(config.parallel, seed=3)
    save_model_checkpoint(build_gpt_model(config.model, config.parallel), Path(ckpt_dir))


@pytest.mark.slow
def test_quickstart_on_a_tiny_model_prints_its_outputs(tmp_path, tmp_path_factory):
    tokenizer_dir = smollm2_tokenizer_dir(tmp_path_factory)
    run_distributed(_save_tiny_sft_model, 1, str(tmp_path / "sft"))
    out = tmp_path / "quickstart"
    overrides = {**TINY_ARCHITECTURE, "model.checkpoint": tmp_path / "sft", "model.tokenizer": tokenizer_dir,
                 "data.max_samples": 16, "data.eval_fraction": 0.25, "rm.epochs": 1,
                 "data.max_length": 64, "data.max_prompt_length": 32,
                 "rm.global_batch_size": 4, "rm.micro_batch_size": 2, "rm.train_top_layers": 1,
                 "normalizer.num_samples": 8, "checkpoint.save_every": 2}
    completed = subprocess.run(
        [sys.executable, "-m", "megaseg.cli", "quickstart", "--out", str(out),
         *[f"{key}={value}" for key, value in overrides.items()]],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    for key in ("reward_model", "normalizer", "plot", "metrics", "config"):
        assert Path(summary[key]).exists(), (key, summary[key])
    assert summary["held_out_pairs"] == 4  # data.eval_fraction 0.25 of 16 pairs
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0
    assert summary["train_steps"] == 3  # 12 training pairs / 4 per step
    # The embedded config lies under the overrides: its segmentation and its normalizer survive.
    normalizer = json.loads(Path(summary["normalizer"]).read_text())
    assert normalizer["kind"] == "location" and normalizer["c_ent"] == 4.0
    assert (out / "cache" / "segments").is_dir()  # segmentation.cache_dir follows --out
    assert Path(summary["plot"]).stat().st_size > 10_000  # a real PNG, not an empty file
