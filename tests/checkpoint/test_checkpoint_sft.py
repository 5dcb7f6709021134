"""The SFT model read into the models that start from it: a critic (backbone + fresh head) is the same model at PP=1
and PP=2, head included (its head is drawn from the run's seed, not from the per-stage generator); a missing SFT
checkpoint is an error unless random initialisation is asked for by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaseg.config import load_config
from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _config(sft_dir: str, pp: int = 1):
    return load_config(None, [f"model.checkpoint={sft_dir}", f"parallel.pipeline_model_parallel_size={pp}",
                              "seed=31"])


def _save_sft(rank, world_size, sft_dir):
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    config = load_config(None, [])
    initialize_parallel(config.parallel, seed=3)
    save_model_checkpoint(build_gpt_model(config.model, config.parallel), Path(sft_dir))


def _critic(rank, world_size, sft_dir, pp):
    from megaseg.checkpoint.sft import load_sft_scalar_head_model
    from megaseg.data.batch import collate_sequences
    from megaseg.data.encoding import TokenizedSequence
    from megaseg.parallel import initialize_parallel
    from megaseg.training.ppo.experience import critic_values

    config = _config(sft_dir, pp)
    ctx = initialize_parallel(config.parallel, config.seed)
    critic = load_sft_scalar_head_model(config, "train-ppo").eval()
    probe = collate_sequences([TokenizedSequence((5, 9, 14), (12, 40, 7, 1), True),
                               TokenizedSequence((77, 3), (15, 90), False)], 0)
    head = critic.head.weight.detach().clone() if ctx.is_last_pipeline_stage else None
    return head, critic_values(critic, probe, ctx, micro_batch_size=2)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft")
    run_distributed(_save_sft, 1, str(directory))
    return str(directory)


def test_critic_is_the_same_model_at_pp1_and_pp2(sft_dir):
    ((head, values),) = run_distributed(_critic, 1, sft_dir, 1)
    first, last = run_distributed(_critic, 2, sft_dir, 2)
    assert first[0] is None
    assert torch.equal(last[0], head)  # the fresh head: same draw whatever the layout
    for _, stage_values in (first, last):  # the last stage broadcasts the values to the first
        torch.testing.assert_close(stage_values, values, rtol=1e-5, atol=1e-6)
    assert head.abs().sum() > 0


def test_a_missing_sft_checkpoint_is_an_error_unless_random_weights_are_asked_for(tmp_path):
    from megaseg.checkpoint.sft import sft_checkpoint_dir

    with pytest.raises(ValueError, match=r"model.checkpoint is not set; train-rm starts from the SFT model.*"
                                         r"model.random_init=true"):
        sft_checkpoint_dir(load_config(None, []).model, "train-rm")
    assert sft_checkpoint_dir(load_config(None, ["model.random_init=true"]).model, "train-rm") is None
    with pytest.raises(ValueError, match="is not a megatron dist checkpoint"):
        sft_checkpoint_dir(load_config(None, [f"model.checkpoint={tmp_path}"]).model, "train-rm")
    with pytest.raises(ValueError, match="model.random_init=true and model.checkpoint=.* both choose"):
        load_config(None, ["model.random_init=true", f"model.checkpoint={tmp_path}"])


def _language_model_with(rank, world_size, sft_dir, num_layers):
    from megaseg.checkpoint.sft import load_sft_language_model
    from megaseg.parallel import initialize_parallel

    config = load_config(None, [f"model.checkpoint={sft_dir}", f"model.num_layers={num_layers}"])
    initialize_parallel(config.parallel, config.seed)
    try:
        load_sft_language_model(config, "train-dpo", frozen=True)
    except ValueError as error:
        return str(error)
    return None


def test_an_sft_checkpoint_of_another_depth_is_refused_naming_it(sft_dir):
    (message,) = run_distributed(_language_model_with, 1, sft_dir, 3)
    assert message is not None and sft_dir in message and "the checkpoint has 2 decoder layers, model.num_layers=3" in message
