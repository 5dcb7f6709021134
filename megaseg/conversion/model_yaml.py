"""`megaseg_model.yaml`: the `model:` section written beside a converted checkpoint, and finding it again.

The file is an ordinary megaseg config holding only the model section, with absolute `checkpoint` and `tokenizer`
paths, so `megaseg <command> --config <ckpt>/megaseg_model.yaml` (or a YAML with `base: <that file>`) needs nothing
else to load the model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from megaseg.config.loader import RESOLVED_CONFIG_NAME, load_config
from megaseg.config.model import ModelConfig

logger = logging.getLogger(__name__)

MODEL_YAML = "megaseg_model.yaml"
# How many directories above a checkpoint to look for its config (run_dir/checkpoints/step_N -> run_dir).
SEARCH_PARENTS = 3


def write_model_yaml(model_cfg: ModelConfig, directory: Path) -> Path:
    path = Path(directory) / MODEL_YAML
    path.write_text("# The model of this checkpoint: pass it as `--config` (or `base:`) to any megaseg command.\n"
                    + OmegaConf.to_yaml({"model": OmegaConf.structured(model_cfg)}))
    return path


def find_model_config(ckpt_dir: Path) -> Optional[tuple[ModelConfig, Path]]:
    """The ModelConfig saved with a checkpoint: `megaseg_model.yaml` or a run's `config.yaml`, in the checkpoint
    directory or up to SEARCH_PARENTS directories above it; None when there is none."""
    directory = Path(ckpt_dir).absolute()
    for candidate_dir in [directory, *directory.parents][: SEARCH_PARENTS + 1]:
        for name in (MODEL_YAML, RESOLVED_CONFIG_NAME):
            path = candidate_dir / name
            if path.is_file():
                return load_config(path).model, path
    return None
