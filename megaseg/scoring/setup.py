"""What fit-normalizer and eval-rm share: the config they score under, the pairs, the segmentation, the scores.

Config rule: the reward model's training config (its config.yaml) is the base, and every setting the command's
config sets to a non-default value overrides it. So `megaseg eval-rm --ckpt DIR --data FILE` scores with the
tokenizer, truncation lengths, segmentation (mode, c_ent, n) and aggregation the reward model was trained with,
while anything given explicitly (a cache directory, a micro-batch size, a moved tokenizer path, another c_ent)
wins. Overriding a setting that defines the reward model's scores (segmentation mode / c_ent / n, rm.aggregation)
draws a warning, because the normalizer and the accuracy then describe another segmentation than the one trained
on. The model architecture always comes from the checkpoint (the weights decide it).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaseg.config import MegasegConfig
from megaseg.data.encoding import EncodedPairs
from megaseg.data.invalid_records import SkippedRecords
from megaseg.segmentation.cache import SegmentedPairs
from megaseg.scoring.scores import PairScores, score_pairs

# Settings whose change alters what the reward model's scores mean.
SCORE_DEFINING = (("segmentation", "mode"), ("segmentation", "entropy_cutoff"), ("segmentation", "ngram_size"),
                  ("rm", "aggregation"))


def overlay_explicit(base: Any, command: Any, default: Any) -> Any:
    """``base`` with every field where ``command`` differs from ``default`` taken from ``command`` (recursively
    through nested dataclasses)."""
    changes = {}
    for field in dataclasses.fields(base):
        base_value, command_value, default_value = (getattr(x, field.name) for x in (base, command, default))
        if dataclasses.is_dataclass(base_value):
            merged = overlay_explicit(base_value, command_value, default_value)
            if merged is not base_value:
                changes[field.name] = merged
        elif command_value != default_value:
            changes[field.name] = command_value
    return dataclasses.replace(base, **changes) if changes else base


def scoring_config(command_config: MegasegConfig, rm_config: MegasegConfig) -> MegasegConfig:
    """The reward model's training config overlaid with the command's explicit settings (module docstring)."""
    defaults = MegasegConfig()
    if command_config.data.eval_path is not None and rm_config.data.eval_fraction > 0:
        # An explicit eval file replaces the training run's held-out fraction (the config refuses both at once).
        rm_config = dataclasses.replace(rm_config, data=dataclasses.replace(rm_config.data, eval_fraction=0.0))
    merged = overlay_explicit(rm_config, command_config, defaults)
    from megaseg.models.architecture import ARCHITECTURE_FIELDS  # imports megatron: only when scoring

    # The weights decide the architecture, whatever the command says; paths (tokenizer, SFT checkpoint) may move.
    architecture = {name: getattr(rm_config.model, name) for name in (*ARCHITECTURE_FIELDS, "name", "params_dtype")}
    merged = dataclasses.replace(merged, model=dataclasses.replace(merged.model, **architecture),
                                 parallel=command_config.parallel,
                                 rm=dataclasses.replace(merged.rm, checkpoint=rm_config.rm.checkpoint))
    for section, name in SCORE_DEFINING:
        trained = getattr(getattr(rm_config, section), name)
        used = getattr(getattr(merged, section), name)
        if trained != used:
            warnings.warn(f"scoring with {section}.{name}={used!r}, but the reward model was trained with "
                          f"{trained!r}; the results describe another setting than the one trained on", stacklevel=2)
    return merged


def reward_model_config(command_config: MegasegConfig) -> tuple[Path, MegasegConfig]:
    """(the reward-model directory, the config to score under); ValueError for a missing or wrong --ckpt."""
    from megaseg.checkpoint.reward_model_dir import read_reward_model_config, resolve_reward_model_dir

    if command_config.rm.checkpoint is None:
        raise ValueError("no reward model given: pass --ckpt DIR (rm.checkpoint), the directory `megaseg train-rm` "
                         "wrote (<logging.out_dir>/reward_model)")
    rm_dir = resolve_reward_model_dir(command_config.rm.checkpoint).absolute()
    rm_config = read_reward_model_config(rm_dir)
    _check_reward_model_architecture(rm_dir, rm_config)
    return rm_dir, scoring_config(command_config, rm_config)


def _check_reward_model_architecture(rm_dir: Path, rm_config: MegasegConfig) -> None:
    """Fail before any segmentation work when the saved weights do not match the saved config."""
    from megaseg.checkpoint.step_dirs import check_architecture, read_checkpoint_summary

    summary = read_checkpoint_summary(rm_dir)
    check_architecture(rm_dir, summary.get("model_architecture"), rm_config.model)


def chat_renderer(config: MegasegConfig) -> Any:
    """The chat-template renderer of the reward model's tokenizer (``model.tokenizer``, ``model.eos_token_ids``)."""
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.tokenizer import load_tokenizer

    if config.model.tokenizer is None:
        raise ValueError("the reward model's config has no model.tokenizer; set model.tokenizer to the local "
                         "tokenizer of its backbone")
    return ChatTemplateRenderer(load_tokenizer(config.model.tokenizer), config.model.eos_token_ids)


def encode_pairs_file(config: MegasegConfig, path: str, max_samples: int | None) -> EncodedPairs:
    """Load and tokenize a preference file under ``config`` (template, truncation, skip_invalid)."""
    from megaseg.data.encoding import encode_preference_pairs
    from megaseg.data.preference import load_preference_pairs

    data = config.data
    loaded = load_preference_pairs(path, format=data.format, skip_invalid=data.skip_invalid, max_samples=max_samples)
    encoded = encode_preference_pairs(loaded.pairs, chat_renderer(config), max_length=data.max_length,
                                      max_prompt_length=data.max_prompt_length, overlong_prompt=data.overlong_prompt,
                                      skip_invalid=data.skip_invalid)
    skipped = SkippedRecords()
    skipped.merge(loaded.skipped)
    skipped.merge(encoded.skipped)
    return dataclasses.replace(encoded, skipped=skipped)


@dataclass(frozen=True)
class ScoredData:
    config: MegasegConfig      # the config the scores were computed under
    rm_dir: Path
    encoded: EncodedPairs
    segmented: SegmentedPairs
    scores: PairScores


def score_encoded_pairs(config: MegasegConfig, rm_dir: Path, encoded: EncodedPairs, parallel_ctx: Any) -> ScoredData:
    """Segment (cache; the SFT model is loaded only for missing entropies, and freed before the reward model is
    loaded) and score every pair. Collective."""
    from megaseg.checkpoint.reward_model_dir import load_reward_model
    from megaseg.segmentation.pipeline import segment_ends_for

    segmented = segment_ends_for(config, encoded, parallel_ctx)
    model, _ = load_reward_model(rm_dir, parallel_ctx)
    scores = score_pairs(model, encoded.pairs, segmented, parallel_ctx, aggregation=config.rm.aggregation,
                         micro_batch_size=config.rm.scoring_micro_batch_size)
    return ScoredData(config=config, rm_dir=rm_dir, encoded=encoded, segmented=segmented, scores=scores)


def is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
