"""The train / eval data sets a trainer asks for, assembled from `DataConfig`: load, hold out, tokenize.

The skip counts of a split cover both stages (reading the records and tokenizing them), so one log line says
everything that was dropped. With no `data.eval_path`, `data.eval_fraction` of the train file is held out: a
seeded random subset (the same for every rank and every restart), each part keeping the file's order.
`data.max_samples` limits the records read from the train file before the hold-out.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from megaseg.config.data import DataConfig
from megaseg.data.encoding import EncodedPairs, EncodedPrompts, encode_preference_pairs, encode_prompts
from megaseg.data.invalid_records import SkippedRecords
from megaseg.data.preference import PreferencePair, load_preference_pairs
from megaseg.data.prompts import load_prompts
from megaseg.data.rendering import ChatTemplateRenderer


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): round(fraction * len) items chosen at random by `seed`, both in their original order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"hold-out fraction={fraction} must lie in (0, 1)")
    num_held_out = round(fraction * len(items))
    if num_held_out == 0 or num_held_out == len(items):
        raise ValueError(f"holding out {fraction} of {len(items)} records leaves an empty split; change "
                         "data.eval_fraction or give data.eval_path")
    held_out = set(np.random.default_rng(seed).permutation(len(items))[:num_held_out].tolist())
    kept = [item for index, item in enumerate(items) if index not in held_out]
    return kept, [item for index, item in enumerate(items) if index in held_out]


def load_preference_splits(data: DataConfig, renderer: ChatTemplateRenderer,
                           seed: int) -> tuple[EncodedPairs, Optional[EncodedPairs]]:
    """(train, eval) tokenized pairs; eval is None when neither data.eval_path nor data.eval_fraction is set."""
    if data.train_path is None:
        raise ValueError("data.train_path is not set; give a preference file, e.g. "
                         "data.train_path=shipped:hh_rlhf_harmless/pairs.jsonl")
    train_loaded = load_preference_pairs(data.train_path, format=data.format, skip_invalid=data.skip_invalid,
                                         max_samples=data.max_samples)
    train_pairs, eval_pairs = train_loaded.pairs, None
    eval_skipped = SkippedRecords()
    if data.eval_path is not None:
        eval_loaded = load_preference_pairs(data.eval_path, format=data.format, skip_invalid=data.skip_invalid,
                                            max_samples=data.eval_max_samples)
        eval_pairs, eval_skipped = eval_loaded.pairs, eval_loaded.skipped
    elif data.eval_fraction > 0:
        train_pairs, eval_pairs = hold_out(train_pairs, data.eval_fraction, seed)
        eval_pairs = eval_pairs[:data.eval_max_samples] if data.eval_max_samples else eval_pairs
    train = _encode(train_pairs, train_loaded.skipped, data, renderer)
    return train, (_encode(eval_pairs, eval_skipped, data, renderer) if eval_pairs is not None else None)


def load_prompt_set(path: str, data: DataConfig, renderer: ChatTemplateRenderer, *, max_prompt_length: int,
                    max_samples: Optional[int] = None) -> EncodedPrompts:
    """Tokenized prompts of `path` (data.prompt_format, data.skip_invalid, data.overlong_prompt apply)."""
    loaded = load_prompts(path, format=data.prompt_format, skip_invalid=data.skip_invalid, max_samples=max_samples)
    encoded = encode_prompts(loaded.prompts, renderer, max_prompt_length=max_prompt_length,
                             overlong_prompt=data.overlong_prompt, skip_invalid=data.skip_invalid)
    return replace(encoded, skipped=_merged(loaded.skipped, encoded.skipped))


def _encode(pairs: list[PreferencePair], load_skipped: SkippedRecords, data: DataConfig,
            renderer: ChatTemplateRenderer) -> EncodedPairs:
    encoded = encode_preference_pairs(pairs, renderer, max_length=data.max_length,
                                      max_prompt_length=data.max_prompt_length,
                                      overlong_prompt=data.overlong_prompt, skip_invalid=data.skip_invalid)
    return replace(encoded, skipped=_merged(load_skipped, encoded.skipped))


def _merged(first: SkippedRecords, second: SkippedRecords) -> SkippedRecords:
    merged = SkippedRecords()
    merged.merge(first)
    merged.merge(second)
    return merged
