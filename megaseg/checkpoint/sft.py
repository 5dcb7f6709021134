"""The SFT model on disk, read into the models that start from it: the causal LM (actor, DPO policy), the frozen
reference (PPO's KL reference and segmentation's entropy model, DPO's reference) and the scalar-head models (reward
model, critic: the SFT backbone with a fresh, seeded head).

``model.checkpoint`` is a megatron dist checkpoint at any TP/PP: what ``megaseg convert hf-to-megatron`` writes
(with its ``megaseg_model.yaml`` beside it), or a model state of a megaseg run (a step directory's ``actor/`` or
``policy/``, which records its architecture). Either way the architecture is compared with ``model.*`` before any
tensor is read, and a missing or mismatched tensor is an error naming it. ``model.random_init=true`` builds the
models from random weights instead (tests, smoke runs); without it a missing ``model.checkpoint`` is an error.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megaseg.checkpoint.step_dirs import CHECKPOINT_METADATA, check_architecture, load_model_state
from megaseg.config import MegasegConfig
from megaseg.config.model import ModelConfig

# Parameters of the scalar head (megaseg.models.scalar_head), absent from an SFT language model checkpoint.
HEAD_PREFIX = "head."


def sft_checkpoint_dir(model_cfg: ModelConfig, purpose: str) -> Path | None:
    """The SFT checkpoint directory, checked; None under ``model.random_init``. ``purpose`` says who needs it."""
    if model_cfg.checkpoint is None:
        if model_cfg.random_init:
            return None
        raise ValueError(f"model.checkpoint is not set; {purpose} starts from the SFT model. Convert it with "
                         "`megaseg convert hf-to-megatron --hf DIR --out DIR` and set model.checkpoint=DIR (or set "
                         "model.random_init=true to start from random weights, for tests only)")
    path = Path(model_cfg.checkpoint)
    if not (path / CHECKPOINT_METADATA).is_file():
        raise ValueError(f"model.checkpoint={str(path)!r} is not a megatron dist checkpoint (no {CHECKPOINT_METADATA}); "
                         "convert the SFT model first: `megaseg convert hf-to-megatron --hf DIR --out DIR`")
    return path


def check_converted_architecture(path: Path, model_cfg: ModelConfig) -> None:
    """ValueError naming the fields where a converted checkpoint's megaseg_model.yaml and ``model.*`` disagree (a
    model state of a megaseg run records its architecture itself and is checked on load)."""
    from megaseg.config import load_config
    from megaseg.conversion.model_yaml import MODEL_YAML
    from megaseg.models.architecture import model_architecture

    model_yaml = path / MODEL_YAML
    if model_yaml.is_file():
        check_architecture(path, model_architecture(load_config(model_yaml).model), model_cfg)


def load_sft_weights(model: torch.nn.Module, model_cfg: ModelConfig, purpose: str) -> torch.nn.Module:
    """Load ``model.checkpoint`` into ``model`` (this rank's stage of a GPT or scalar-head model); a scalar head keeps
    its fresh initialisation and the SFT model's output layer is not read. Collective."""
    from megaseg.models.scalar_head import ScalarHeadModel

    path = sft_checkpoint_dir(model_cfg, purpose)
    if path is not None:
        check_converted_architecture(path, model_cfg)
        missing_ok = (HEAD_PREFIX,) if isinstance(model, ScalarHeadModel) else ()
        load_model_state(path, model=model, model_cfg=model_cfg, missing_ok=missing_ok)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: a model that is read, never trained."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_sft_language_model(config: MegasegConfig, purpose: str, *, frozen: bool = False) -> torch.nn.Module:
    """This rank's stage of the SFT causal LM (actor, DPO policy; ``frozen``: PPO/DPO reference, entropy model)."""
    from megaseg.models.gpt import build_gpt_model

    model = load_sft_weights(build_gpt_model(config.model, config.parallel), config.model, purpose)
    return freeze(model) if frozen else model


def load_sft_scalar_head_model(config: MegasegConfig, purpose: str) -> torch.nn.Module:
    """The SFT backbone with a fresh scalar head seeded by ``config.seed``: the reward model before training, and
    the PPO critic (paper App. D)."""
    from megaseg.models.scalar_head import build_scalar_head_model

    model = build_scalar_head_model(config.model, config.parallel, seed=config.seed)
    return load_sft_weights(model, config.model, purpose)
