"""A full PPO step (rollout, experience, critic and actor updates) is the same at TP=2 and PP=2 as at TP=1, and a run
resumed from a checkpoint continues exactly as the uninterrupted run.

The baseline (one rank, TP=1) saves its initial actor and critic, runs step 1, checkpoints, runs step 2. The other
runs start from the saved initial weights (loaded at their own layout) and compare: the sampled tokens exactly, the
rewards, advantages and step metrics closely, and the updated models through the log-probs and values they give on
a fixed probe batch. The resumed run (a fresh process, TP=1) must reproduce step 2 bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

from ppo_test_setup import EOS_ID, PAD_ID, build_tiny_models, build_tiny_run, run_ppo_steps, tiny_config

pytestmark = pytest.mark.distributed

COMPARED_METRICS = ("rm_score", "kl", "response_length", "segments_per_response", "entropy", "policy_loss",
                    "value_loss", "policy_clip_fraction", "approx_kl", "value_mean", "return_mean")


def _config(out_dir: str, tp: int = 1, pp: int = 1):
    return tiny_config(f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                       "ppo.reward_granularity=ngram", "segmentation.mode=ngram", "segmentation.ngram_size=2",
                       "ppo.ppo_epochs=2", f"logging.out_dir={out_dir}", "checkpoint.save_every=1",
                       # An adaptive coefficient that moves every step: resuming must bring its value back.
                       "ppo.adaptive_kl=true", "ppo.kl_target=0.001", "ppo.kl_horizon=20")


def _probe_batch():
    from megaseg.data.batch import collate_sequences
    from megaseg.data.encoding import TokenizedSequence

    return collate_sequences([TokenizedSequence((5, 9, 14, 33), (12, 40, 7, EOS_ID), True),
                              TokenizedSequence((77, 3), (15, 15, 90, 60, 2), False)], PAD_ID)


def _probe(run) -> dict:
    from megaseg.training.ppo.experience import critic_values, policy_log_probs_and_entropy

    probe = _probe_batch()
    return {"log_probs": policy_log_probs_and_entropy(run.actor.model, probe, run.ctx, micro_batch_size=2).log_probs,
            "values": critic_values(run.critic.model, probe, run.ctx, micro_batch_size=2)}


def _step(run, progress=None) -> tuple[dict, object]:
    """One step of ``run``: its record (metrics, KL coefficient after it, rollouts, rewards, the updated models on
    the probe batch) and the progress after it."""
    (metrics,), progress = run_ppo_steps(run, 1, progress)
    experience = run.last_experience
    return {"metrics": metrics, "kl_coef_after": run.kl_controller.value,
            "input_ids": experience.sequences.input_ids, "advantages": experience.advantages,
            "token_rewards": experience.token_rewards, "probe": _probe(run)}, progress


def _models_from(config, init_dir: str):
    from megaseg.checkpoint.step_dirs import load_model_state

    models = build_tiny_models(config)
    for model, name in ((models.actor, "actor"), (models.reference, "actor"), (models.critic, "critic")):
        load_model_state(Path(init_dir) / name, model=model, model_cfg=config.model)
    return models


def _baseline(rank, world_size, out_dir, init_dir):
    from megaseg.checkpoint.step_dirs import save_model_state
    from megaseg.parallel import initialize_parallel

    config = _config(out_dir)
    ctx = initialize_parallel(config.parallel, config.seed)
    models = build_tiny_models(config)
    save_model_state(Path(init_dir) / "actor", model=models.actor, model_cfg=config.model)
    save_model_state(Path(init_dir) / "critic", model=models.critic, model_cfg=config.model)
    run = build_tiny_run(config, ctx, models=models)
    first, progress = _step(run)
    run.save(progress)
    second, _ = _step(run, progress)
    return [first, second]


def _one_step(rank, world_size, out_dir, init_dir, tp, pp):
    from megaseg.parallel import initialize_parallel

    config = _config(out_dir, tp, pp)
    ctx = initialize_parallel(config.parallel, config.seed)
    record, _ = _step(build_tiny_run(config, ctx, models=_models_from(config, init_dir)))
    return record


def _resumed_step(rank, world_size, out_dir, init_dir):
    from megaseg.checkpoint.step_dirs import load_model_state
    from megaseg.parallel import initialize_parallel

    config = _config(out_dir)
    ctx = initialize_parallel(config.parallel, config.seed + 1)  # a different seed: the checkpoint's RNG must win
    # The frozen reference is the SFT model, which a real run reloads from model.checkpoint (it is not trained, so
    # PPO checkpoints do not hold it); actor and critic start elsewhere and must come back from the checkpoint.
    models = build_tiny_models(config)
    load_model_state(Path(init_dir) / "actor", model=models.reference, model_cfg=config.model)
    run = build_tiny_run(config, ctx, models=models)
    progress = run.resume()
    assert progress.step == 1
    record, _ = _step(run, progress)
    return dict(record, kl_coef_restored=record["metrics"]["kl_coef"])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_parity")
    out_dir, init_dir = str(root / "run"), str(root / "init")
    (steps,) = run_distributed(_baseline, 1, out_dir, init_dir, timeout=400)
    return out_dir, init_dir, steps


def _assert_step_close(got: dict, expected: dict, what: str) -> None:
    assert torch.equal(got["input_ids"], expected["input_ids"]), f"{what}: sampled tokens differ"
    for key in ("advantages", "token_rewards"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} {key}: {m}")
    for key in COMPARED_METRICS:
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], rel=1e-4, abs=1e-5), (what, key)
    for key in ("log_probs", "values"):
        torch.testing.assert_close(got["probe"][key], expected["probe"][key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{what} updated model {key}: {m}")


@pytest.mark.parametrize("tp,pp", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)], ids=["tp2", "pp2"])
def test_a_ppo_step_is_the_same_at_another_layout(baseline, tmp_path, tp, pp):
    _, init_dir, steps = baseline
    results = run_distributed(_one_step, tp * pp, str(tmp_path / "run"), init_dir, tp, pp, timeout=400)
    for rank, got in enumerate(results):
        _assert_step_close(got, steps[0], f"tp={tp} pp={pp} rank {rank}")
    # The update moved the models (otherwise equality would prove little).
    assert not torch.allclose(steps[0]["probe"]["log_probs"], steps[1]["probe"]["log_probs"])


def test_resume_continues_exactly(baseline):
    out_dir, init_dir, steps = baseline
    (got,) = run_distributed(_resumed_step, 1, out_dir, init_dir, timeout=400)
    expected = steps[1]
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["advantages"], expected["advantages"])
    assert got["metrics"]["policy_loss"] == expected["metrics"]["policy_loss"]
    assert got["metrics"]["value_loss"] == expected["metrics"]["value_loss"]
    for key in ("log_probs", "values"):
        assert torch.equal(got["probe"][key], expected["probe"][key]), key
    # The KL coefficient step 2 used is the one step 1 left behind (not the configured 0.01), and it moved on alike.
    assert got["kl_coef_restored"] == steps[0]["kl_coef_after"] != 0.01
    assert got["kl_coef_after"] == expected["kl_coef_after"]


def _data_parallel_step(rank, world_size, out_dir, init_dir):
    from megaseg.parallel import initialize_parallel

    config = _config(out_dir)
    ctx = initialize_parallel(config.parallel, config.seed)
    assert ctx.dp_size == 2
    run = build_tiny_run(config, ctx, models=_models_from(config, init_dir))
    record, _ = _step(run)
    return dict(record, prompt_ids=run.last_prompt_ids, actions=run.last_experience.action_mask)


@pytest.mark.slow
def test_data_parallel_ranks_share_statistics_and_weights(baseline, tmp_path):
    _, init_dir, _ = baseline
    ranks = run_distributed(_data_parallel_step, 2, str(tmp_path / "run"), init_dir, timeout=400)
    # Each rank rolls out its own half of the prompts ...
    assert not set(ranks[0]["prompt_ids"]) & set(ranks[1]["prompt_ids"])
    assert len(ranks[0]["prompt_ids"]) == len(ranks[1]["prompt_ids"]) == 2
    # ... whitens its advantages with the statistics of the whole rollout batch (both ranks) ...
    pooled = torch.cat([rank["advantages"][rank["actions"]] for rank in ranks]).double()
    assert float(pooled.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(pooled.var(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # ... reports metrics over both, and the averaged gradients keep the replicas identical.
    assert ranks[0]["metrics"]["rm_score"] == pytest.approx(ranks[1]["metrics"]["rm_score"])
    for key in ("log_probs", "values"):
        assert torch.equal(ranks[0]["probe"][key], ranks[1]["probe"][key]), key
