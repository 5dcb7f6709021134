"""`megaseg segment --config ...`: fill the segmentation cache for the train (and eval) split of ``data``, print the
segment statistics and, with ``segmentation.target_mean_segment_length``, pick c_ent for that mean segment length
(megaseg.segmentation.cutoff) and print the override to put into the training config. The last output line is a JSON
summary.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch

from megaseg.config import MegasegConfig, config_to_yaml
from megaseg.data.encoding import EncodedPairs, TokenizedPair
from megaseg.parallel.collectives import is_rank_zero, print_rank_zero
from megaseg.parallel.initialize import ParallelContext
from megaseg.segmentation import segment_ends_for
from megaseg.segmentation.cache import ShardedStore
from megaseg.segmentation.cache_keys import segment_settings
from megaseg.segmentation.cutoff import PAPER_CUTOFFS, CutoffTable, cutoff_sweep, cutoff_table, pick_cutoff
from megaseg.segmentation.entropy_pass import ensure_entropy_cache, load_entropy_model, read_entropies


def _with_cutoff(config: MegasegConfig, cutoff: float) -> MegasegConfig:
    return dataclasses.replace(config, segmentation=dataclasses.replace(
        config.segmentation, entropy_cutoff=cutoff, target_mean_segment_length=None))


def choose_cutoff(config: MegasegConfig, pairs: Sequence[TokenizedPair], entropy_store: ShardedStore) -> dict:
    """Print the mean segment length at the paper's cutoffs and pick c_ent for the configured target."""
    entropies, eos = read_entropies(entropy_store, pairs)
    table: CutoffTable = cutoff_table(entropies, eos)
    choice = pick_cutoff(table, config.segmentation.target_mean_segment_length)
    cutoffs = sorted({*PAPER_CUTOFFS, config.segmentation.entropy_cutoff, choice.entropy_cutoff})
    print_rank_zero("entropy cutoff sweep (c_ent -> mean segment length in tokens, segments per response):")
    for row in cutoff_sweep(table, cutoffs):
        print_rank_zero(f"  c_ent {row['entropy_cutoff']:.3f} -> {row['mean_segment_length']:.2f} tokens, "
                f"{row['segments_per_response']:.2f} segments/response")
    print_rank_zero(f"picked segmentation.entropy_cutoff={choice.entropy_cutoff} for a target mean segment length of "
            f"{choice.target_mean_segment_length} tokens (gives {choice.mean_segment_length:.2f}); put this "
            "override into the training config")
    return dataclasses.asdict(choice)


class _ModelOnDemand:
    """Loads the SFT model the first time a missing entropy shard needs it, then keeps it for the next split."""

    def __init__(self, config: MegasegConfig) -> None:
        self.config, self.model = config, None

    def __call__(self) -> torch.nn.Module:
        if self.model is None:
            self.model = load_entropy_model(self.config)
        return self.model


def _segment_split(config: MegasegConfig, name: str, encoded: EncodedPairs, parallel_ctx: ParallelContext,
                   sft_model: _ModelOnDemand, tokenizer: Any) -> tuple[dict[str, Any], MegasegConfig]:
    summary: dict[str, Any] = {"num_pairs": len(encoded.pairs), "skipped": encoded.skipped.summary()}
    if config.segmentation.target_mean_segment_length is not None:
        entropy_store = ensure_entropy_cache(config, encoded.pairs, parallel_ctx, load_model=sft_model)
        summary["cutoff_choice"] = choose_cutoff(config, encoded.pairs, entropy_store)
        config = _with_cutoff(config, summary["cutoff_choice"]["entropy_cutoff"])
    segmented = segment_ends_for(config, encoded, parallel_ctx, tokenizer=tokenizer, load_model=sft_model)
    stats = segmented.statistics()
    summary.update(segment_settings(config.segmentation), cache_entry=str(segmented.cache_entry), **stats.to_dict())
    print_rank_zero(f"{name}: {len(encoded.pairs)} pairs, {stats.segments_per_response:.2f} segments per response, mean "
            f"segment length {stats.mean_segment_length:.2f} tokens ({segmented.cache_entry})")
    if is_rank_zero():
        (segmented.cache_entry / "config.yaml").write_text(config_to_yaml(config))
    return summary, config


def run_segmentation(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset()) -> int:
    """`megaseg segment`: fill the cache for the train (and eval) split; the last output line is a JSON summary."""
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.splits import load_preference_splits
    from megaseg.data.tokenizer import load_tokenizer
    from megaseg.parallel import parallel_session

    if config.model.tokenizer is None:
        raise ValueError("model.tokenizer is not set; give the local tokenizer directory or GGUF file of the model")
    with parallel_session(config) as parallel_ctx:
        tokenizer = load_tokenizer(config.model.tokenizer)
        renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
        train, evaluation = load_preference_splits(config.data, renderer, config.seed)
        sft_model = _ModelOnDemand(config)
        summary: dict[str, Any] = {}
        summary["train"], config = _segment_split(config, "train", train, parallel_ctx, sft_model, tokenizer)
        if evaluation is not None:
            summary["eval"], _ = _segment_split(config, "eval", evaluation, parallel_ctx, sft_model, tokenizer)
        print_rank_zero(json.dumps(summary))
    return 0
