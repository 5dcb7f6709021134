"""Reward models / critics export as <Arch>ForTokenClassification (num_labels=1) whose per-token scores equal
megaseg's scalar-head values at every position -- from a plain dist checkpoint and from train-rm's directory."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conversion_models import positions_for, sample_input_ids
from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.conversion import convert_megatron_to_hf, save_model_checkpoint
from megaseg.conversion.hf_architectures import ARCHITECTURES
from megaseg.conversion.model_yaml import find_model_config, write_model_yaml

ATOL = 1e-4


def _randomized_reward_model(model_cfg: ModelConfig, seed: int):
    from megaseg.models.scalar_head import build_reward_model

    model = build_reward_model(model_cfg, ParallelConfig(), seed=7).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def _values_and_save(model_cfg: ModelConfig, input_ids: torch.Tensor, save) -> torch.Tensor:
    """Build a random reward model in this process, score `input_ids`, then `save(model)`."""
    from megaseg.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0)
    try:
        model = _randomized_reward_model(model_cfg, seed=5)
        with torch.no_grad():
            values = model(input_ids, positions_for(input_ids), None)
        save(model)
        return values
    finally:
        destroy_parallel()


def _hf_scores(hf_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits[..., 0]


@pytest.mark.parametrize("name", ["llama_tied", "mistral", "qwen2", "phi3"])
def test_token_classification_scores_equal_reward_model_values(converted_cases, tmp_path, name):
    model_cfg = find_model_config(converted_cases[name].megatron_dir)[0]
    input_ids = sample_input_ids(seed=21)
    rm_dir = tmp_path / "rm"

    def save(model):
        save_model_checkpoint(model, rm_dir)
        write_model_yaml(model_cfg, rm_dir)

    values = _values_and_save(model_cfg, input_ids, save)
    out = convert_megatron_to_hf(rm_dir, tmp_path / "rm_hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[config["model_type"]].token_classification_class]
    assert len(config["id2label"]) == 1
    scores = _hf_scores(out, input_ids)
    assert scores.shape == values.shape == input_ids.shape
    torch.testing.assert_close(scores, values, atol=ATOL, rtol=0)


def test_train_rm_directory_exports_with_its_tokenizer(converted_cases, tmp_path):
    """The layout `megaseg train-rm` writes (state/ + config.yaml + reward_model.json) exports as it stands."""
    from megaseg.config import MegasegConfig
    from megaseg.checkpoint.step_dirs import TrainingProgress
    from megaseg.checkpoint.reward_model_dir import save_reward_model

    model_cfg = find_model_config(converted_cases["qwen2"].megatron_dir)[0]
    config = dataclasses.replace(MegasegConfig(), model=model_cfg)
    input_ids = sample_input_ids(seed=22)
    run_dir = tmp_path / "run"
    values = _values_and_save(model_cfg, input_ids, lambda model: save_reward_model(
        run_dir / "reward_model", model=model, config=config, progress=TrainingProgress(step=1)))
    out = convert_megatron_to_hf(run_dir, tmp_path / "rm_hf")
    torch.testing.assert_close(_hf_scores(out, input_ids), values, atol=ATOL, rtol=0)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("w7") == 7
