"""DPO resume: a run killed (SIGKILL, no clean-up) right after its step-2 checkpoint and restarted repeats the
uninterrupted run bit for bit (losses, gradient norms, final policy); a restart with a changed DPO setting is refused
by the invariant check every trainer shares, naming the setting."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from material import smollm2_tokenizer_dir
from megaseg.parallel.spawn import DistributedRunError, run_distributed
from rm_test_setup import logged

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return smollm2_tokenizer_dir(tmp_path_factory)


def _config(tokenizer_dir, sft_dir, out_dir, **settings):
    from megaseg.config import load_config

    overrides = ["model.vocab_size=49152", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                 "model.num_attention_heads=4", "model.max_position_embeddings=128", f"model.tokenizer={tokenizer_dir}",
                 f"model.checkpoint={sft_dir}", "data.train_path=shipped:hh_rlhf_harmless/pairs.jsonl",
                 "data.max_samples=24", "data.eval_fraction=0", "data.max_length=64", "data.max_prompt_length=40",
                 "dpo.global_batch_size=4", "dpo.micro_batch_size=2", "dpo.optimizer.lr=1e-3",
                 "dpo.optimizer.warmup_ratio=0.25", "dpo.max_steps=4", f"logging.out_dir={out_dir}",
                 "logging.tensorboard=false", "checkpoint.save_every=100"]
    return load_config(None, overrides + [f"{key}={value}" for key, value in settings.items()])


def _save_sft(rank, world_size, config):
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    initialize_parallel(config.parallel, seed=5)
    save_model_checkpoint(build_gpt_model(config.model, config.parallel), config.model.checkpoint)


def _train(rank, world_size, config, kill_after_step=None):
    from fault_material import die_after_saving
    from megaseg.parallel import initialize_parallel
    from megaseg.training.dpo.trainer import DPOTrainer

    if kill_after_step is not None:
        die_after_saving(DPOTrainer, kill_after_step)
    trainer = DPOTrainer.from_config(config, initialize_parallel(config.parallel, config.seed))
    trainer.run()
    return {name: param.detach().clone() for name, param in trainer.policy.model.module.named_parameters()}


@pytest.fixture(scope="module")
def sft_dir(tokenizer_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo_sft") / "sft"
    run_distributed(_save_sft, 1, _config(tokenizer_dir, path, path.parent / "unused"))
    return path


def test_resume_after_kill_repeats_the_uninterrupted_run(tokenizer_dir, sft_dir, tmp_path):
    straight = _config(tokenizer_dir, sft_dir, tmp_path / "straight")
    (straight_params,) = run_distributed(_train, 1, straight)

    interrupted = _config(tokenizer_dir, sft_dir, tmp_path / "interrupted", **{"checkpoint.save_every": 2})
    with pytest.raises(DistributedRunError, match="died|exit"):
        run_distributed(_train, 1, interrupted, 2)
    assert logged(tmp_path / "interrupted").keys() == {1, 2}

    changed = dataclasses.replace(interrupted, dpo=dataclasses.replace(interrupted.dpo, beta=0.5))
    with pytest.raises(DistributedRunError, match=r"cannot resume from .*step_000002: dpo\.beta: checkpoint 0\.1, "
                                                  r"now 0\.5"):
        run_distributed(_train, 1, changed)

    (resumed_params,) = run_distributed(_train, 1, interrupted)
    for name in ("train/loss", "train/grad_norm", "train/lr"):
        assert logged(tmp_path / "interrupted", name) == logged(tmp_path / "straight", name), name
    assert logged(tmp_path / "straight").keys() == {1, 2, 3, 4}
    for name, value in resumed_params.items():
        assert torch.equal(value, straight_params[name]), name
