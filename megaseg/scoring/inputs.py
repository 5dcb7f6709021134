"""What fit-normalizer and eval-rm share: the config they score under, the pairs, the segmentation, the scores.

Config rule: the reward model's training config (its config.yaml) is the base, and every setting the user gave the
command (in its YAML or as an override: ``explicit_keys``, whatever the value, a schema default included) replaces
it. So `megaseg eval-rm --ckpt DIR --data FILE` scores with the tokenizer, truncation lengths, segmentation (mode,
c_ent, n) and aggregation the reward model was trained with, while anything given explicitly (a cache directory, a
micro-batch size, a moved tokenizer path, another c_ent, ``rm.aggregation=mean`` for a model trained with sum) wins.
Overriding a setting that defines the reward model's scores (segmentation mode / c_ent / n, rm.aggregation) draws a
warning, because the normalizer and the accuracy then describe another setting than the one trained on. The model
architecture always comes from the checkpoint (the weights decide it), the parallel layout from the command.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaseg.checkpoint.reward_model_dir import (
    check_reward_model_architecture,
    load_reward_model,
    read_reward_model_config,
    resolve_reward_model_dir,
)
from megaseg.config import MegasegConfig
from megaseg.config.loader import flat_settings, with_settings
from megaseg.data.encoding import EncodedPairs
from megaseg.data.invalid_records import SkippedRecords
from megaseg.data.rendering import ChatTemplateRenderer
from megaseg.parallel.initialize import ParallelContext
from megaseg.scoring.scores import PairScores, score_pairs
from megaseg.segmentation.cache import SegmentedPairs

# Settings whose change alters what the reward model's scores mean.
SCORE_DEFINING = ("segmentation.mode", "segmentation.entropy_cutoff", "segmentation.ngram_size", "rm.aggregation")
# Always the reward model's (the weights decide them) or the command's (where it runs), whatever was given.
_FROM_CHECKPOINT_PREFIXES = ("rm.checkpoint",)


def scoring_config(command_config: MegasegConfig, rm_config: MegasegConfig,
                   explicit_keys: Iterable[str]) -> MegasegConfig:
    """The reward model's training config with the command's explicit settings applied (module docstring)."""
    from megaseg.models.architecture import ARCHITECTURE_FIELDS  # imports megatron: only when scoring

    fixed = {f"model.{name}" for name in (*ARCHITECTURE_FIELDS, "name", "params_dtype")} | set(_FROM_CHECKPOINT_PREFIXES)
    given = {key for key in explicit_keys if key not in fixed and not key.startswith("parallel.")}
    command = flat_settings(command_config)
    settings = {key: command[key] for key in given}
    if "data.eval_path" in given and "data.eval_fraction" not in given:
        # An explicit eval file replaces the training run's held-out fraction (the config refuses both at once).
        settings["data.eval_fraction"] = 0.0
    merged = dataclasses.replace(with_settings(rm_config, settings), parallel=command_config.parallel)
    trained, used = flat_settings(rm_config), flat_settings(merged)
    for key in SCORE_DEFINING:
        if trained[key] != used[key]:
            warnings.warn(f"scoring with {key}={used[key]!r}, but the reward model was trained with {trained[key]!r}; "
                          "the results describe another setting than the one trained on", stacklevel=2)
    return merged


def reward_model_config(command_config: MegasegConfig,
                        explicit_keys: Iterable[str]) -> tuple[Path, MegasegConfig]:
    """(the reward-model directory, the config to score under); ValueError for a missing or wrong --ckpt."""
    if command_config.rm.checkpoint is None:
        raise ValueError("no reward model given: pass --ckpt DIR (rm.checkpoint), the directory `megaseg train-rm` "
                         "wrote (<logging.out_dir>/reward_model)")
    rm_dir = resolve_reward_model_dir(command_config.rm.checkpoint).absolute()
    rm_config = read_reward_model_config(rm_dir)
    # Fail before any segmentation work when the saved weights do not match the saved config.
    check_reward_model_architecture(rm_dir, rm_config)
    return rm_dir, scoring_config(command_config, rm_config, explicit_keys)


def chat_renderer(config: MegasegConfig) -> ChatTemplateRenderer:
    """The chat-template renderer of the reward model's tokenizer (``model.tokenizer``, ``model.eos_token_ids``)."""
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


def score_encoded_pairs(config: MegasegConfig, rm_dir: Path, encoded: EncodedPairs,
                        parallel_ctx: ParallelContext, prefix_features: Any = None) -> ScoredData:
    """Segment (cache; the SFT model is loaded only for missing entropies, and freed before the reward model is
    loaded) and score every pair. Collective.

    ``prefix_features``: the frozen bottom layers' outputs the trainer kept (megaseg.training.reward_model.
    frozen_prefix.PrefixFeatures): when this reward model's bottom layers are the ones they came from, one process
    scores through its top layers only (the same scores); otherwise the whole model runs, and a warning says why."""
    from megaseg.segmentation import segment_ends_for

    segmented = segment_ends_for(config, encoded, parallel_ctx)
    model, rm_config = load_reward_model(rm_dir, parallel_ctx)
    if prefix_features is not None:
        why_not = prefix_features.usable_for(rm_config)
        if why_not is None and parallel_ctx.world_size != 1:
            why_not = f"{parallel_ctx.world_size} processes (the frozen-prefix path runs in one)"
        if why_not is not None:
            warnings.warn(f"scoring with the whole model, not the kept frozen-layer outputs: {why_not}", stacklevel=2)
            prefix_features = None
    scores = score_pairs(model, encoded.pairs, segmented, parallel_ctx, aggregation=config.rm.aggregation,
                         micro_batch_size=config.rm.scoring_micro_batch_size, packing=config.data.packing,
                         prefix_features=prefix_features)
    return ScoredData(config=config, rm_dir=rm_dir, encoded=encoded, segmented=segmented, scores=scores)
