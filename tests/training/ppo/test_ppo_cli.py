"""`megaseg train-ppo --config FILE` end to end on a tiny model that reads real SmolLM2 token ids: real chat template,
real shipped prompts, a saved SFT checkpoint and reward-model directory, megaseg's own sampler.

It refuses to start without the reward model's normalizer (exit code 2, the fit-normalizer command in the message),
then runs, writes metrics (train/ ppo/ speed/ eval/), samples with per-segment rewards and checkpoints, and a second
invocation with more steps resumes from the checkpoint instead of starting over.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from material import smollm2_tokenizer_dir
from megaseg.parallel.spawn import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CUTOFF = 10.78  # the tiny random model's entropies over 49,152 tokens sit near log(49152) = 10.80


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return smollm2_tokenizer_dir(tmp_path_factory)


def _model_overrides(tokenizer_dir: str, sft_dir: str) -> list[str]:
    return ["model.vocab_size=49152", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.num_attention_heads=4", "model.max_position_embeddings=256", f"model.tokenizer={tokenizer_dir}",
            f"model.checkpoint={sft_dir}", "segmentation.mode=entropy", f"segmentation.entropy_cutoff={CUTOFF}"]


def _ppo_yaml(work: Path, tokenizer_dir: str) -> Path:
    lines = [*_model_overrides(tokenizer_dir, str(work / "sft")), f"rm.checkpoint={work / 'rm'}",
             "data.prompt_path=shipped:prompts/arena-hard-v0.1_question.jsonl", "data.max_samples=16",
             "data.eval_prompt_path=shipped:prompts/mt_bench_question.jsonl", "ppo.eval_every=1",
             "ppo.eval_max_prompts=2", "ppo.rollout_batch_size=4", "ppo.train_batch_size=2", "ppo.micro_batch_size=1",
             "ppo.micro_rollout_batch_size=2", "ppo.max_prompt_length=48", "ppo.max_new_tokens=8",
             "ppo.sample_every=1", "ppo.num_logged_samples=2", "ppo.actor_optimizer.lr=1e-4",
             "ppo.critic_optimizer.lr=1e-4", f"logging.out_dir={work / 'run'}", "logging.tensorboard=true",
             "checkpoint.save_every=1"]
    path = work / "ppo.yaml"
    from omegaconf import OmegaConf
    path.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(lines)))
    return path


def _prepare_models(work: Path, tokenizer_dir: str) -> None:
    """A random tiny SFT checkpoint and a reward model trained on nothing, saved the way the real tools save them."""
    from megaseg.config import load_config
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.scalar_head import build_reward_model
    from megaseg.parallel import destroy_parallel, initialize_parallel
    from megaseg.checkpoint.step_dirs import TrainingProgress
    from megaseg.checkpoint.reward_model_dir import save_reward_model

    config = load_config(None, [*_model_overrides(tokenizer_dir, str(work / "sft")),
                                "data.train_path=shipped:hh_rlhf_harmless/pairs.jsonl"])
    initialize_parallel(config.parallel, seed=9)
    save_model_checkpoint(build_gpt_model(config.model, config.parallel), work / "sft")
    save_reward_model(work / "rm", model=build_reward_model(config.model, config.parallel, seed=1), config=config,
                      progress=TrainingProgress(step=1))
    destroy_parallel()


def _write_normalizer(work: Path) -> None:
    import numpy as np

    from megaseg.algorithms.normalizer import LocationNormalizer

    rng = np.random.default_rng(0)
    p = np.concatenate([(np.arange(t) + 1) / t for t in rng.integers(1, 9, size=300)])
    LocationNormalizer.fit(p, 0.3 * np.log(p) + rng.normal(0, 0.05, p.size), model="tiny-llama", c_ent=CUTOFF,
                           aggregation="mean", segmentation="entropy").save(work / "rm" / "normalizer.json")


def _cli(args: list[str]) -> tuple[int, str]:
    from megaseg.cli import main

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main(args)
    return code, output.getvalue()


def _end_to_end(rank, world_size, work, tokenizer_dir):
    work = Path(work)
    _prepare_models(work, tokenizer_dir)
    config_path = str(_ppo_yaml(work, tokenizer_dir))
    refused = _cli(["train-ppo", "--config", config_path, "ppo.max_steps=1"])
    _write_normalizer(work)
    first = _cli(["train-ppo", "--config", config_path, "ppo.max_steps=1"])
    second = _cli(["train-ppo", "--config", config_path, "ppo.max_steps=2"])
    return refused, first, second


def test_train_ppo_end_to_end(tmp_path, tokenizer_dir):
    refused, first, second = run_distributed(_end_to_end, 1, str(tmp_path), str(tokenizer_dir), timeout=900)[0]
    code, text = refused
    assert code == 2
    assert f"megaseg fit-normalizer --ckpt {tmp_path / 'rm'} --data shipped:hh_rlhf_harmless/pairs.jsonl" in text
    assert first[0] == 0, first[1]
    assert second[0] == 0, second[1]
    assert "resumed at step 1" in second[1]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "train/rm_score" in row]
    assert [row["step"] for row in train] == [1, 2]
    assert any("ppo/policy_clip_fraction" in row and "ppo/segments_per_response" in row for row in rows)
    assert any("speed/tokens_per_second/rollout" in row for row in rows)
    assert sorted({row["step"] for row in rows if "eval/rm_score" in row}) == [0, 1, 2]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {sample["step"] for sample in samples} == {1, 2} and len(samples) == 4
    for sample in samples:
        assert sample["response"] and sample["segments"]
        rewarded = [piece for piece in sample["segments"] if piece["raw"] is not None]
        assert rewarded and rewarded[-1]["p"] == 1.0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_000002"
    assert {path.name for path in (checkpoints / "step_000002").iterdir()} >= {"actor", "critic", "rng"}
    assert (tmp_path / "run" / "tensorboard").is_dir()


def _dpo_end_to_end(rank, world_size, work, tokenizer_dir):
    work = Path(work)
    from megaseg.config import load_config
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import destroy_parallel, initialize_parallel

    config = load_config(None, _model_overrides(tokenizer_dir, str(work / "sft")))
    initialize_parallel(config.parallel, seed=9)
    save_model_checkpoint(build_gpt_model(config.model, config.parallel), work / "sft")
    destroy_parallel()
    args = ["train-dpo", *_model_overrides(tokenizer_dir, str(work / "sft")),
            "data.train_path=shipped:hh_rlhf_harmless/pairs.jsonl", "data.max_samples=20", "data.eval_fraction=0.2",
            "data.max_length=64", "data.max_prompt_length=40", "dpo.global_batch_size=4", "dpo.micro_batch_size=2",
            "dpo.optimizer.lr=1e-3", "dpo.optimizer.warmup_ratio=0", f"logging.out_dir={work / 'dpo'}",
            "logging.tensorboard=false", "checkpoint.save_every=2"]
    first = _cli([*args, "dpo.max_steps=2"])
    second = _cli([*args, "dpo.max_steps=3"])
    return first, second


def test_train_dpo_end_to_end(tmp_path, tokenizer_dir):
    first, second = run_distributed(_dpo_end_to_end, 1, str(tmp_path), str(tokenizer_dir), timeout=900)[0]
    assert first[0] == 0, first[1]
    assert second[0] == 0 and "resumed at step 2" in second[1], second[1]
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3]
    assert all(0.0 <= row["train/accuracy"] <= 1.0 for row in rows if "train/accuracy" in row)
    assert sorted(row["step"] for row in rows if "eval/loss" in row) == [2, 3]
    assert (tmp_path / "dpo" / "checkpoints" / "latest").read_text().strip() == "step_000003"
