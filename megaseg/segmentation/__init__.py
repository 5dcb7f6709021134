"""Everything between preference pairs and segment ends: the entropy pass of the frozen SFT model, cutting, the
cache, choosing c_ent for a target segment length, the cache keys, and the `megaseg segment` command.

``segment_ends_for(config, encoded_pairs, parallel_ctx, model=None) -> SegmentedPairs`` is the entry point for
trainers and tools (see megaseg.segmentation.cache for the layout and ``SegmentedPairs`` for what it returns). It
is collective: every rank calls it with the same pairs, and every rank gets the ends of all pairs.

Phases, each skipped when the cache already holds its result:
1. entropies (entropy mode only, ``entropy_pass``): the frozen SFT model runs over every chosen and rejected
   sequence once;
2. segment ends (``cutting``): the mode's rule (megaseg.algorithms) on the cached entropies, token texts (sentence)
   or masks alone (bandit, token, n-gram), shard by shard, shared out over all ranks;
3. read: every rank reads every shard.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from megaseg.config import MegasegConfig
from megaseg.data.encoding import EncodedPairs, TokenizedPair
from megaseg.parallel.initialize import ParallelContext
from megaseg.segmentation.cache import SegmentedPairs
from megaseg.segmentation.cutting import ensure_segment_cache
from megaseg.segmentation.entropy_pass import ensure_entropy_cache


def _pairs_of(encoded_pairs: EncodedPairs | Sequence[TokenizedPair]) -> list[TokenizedPair]:
    pairs = list(encoded_pairs.pairs if isinstance(encoded_pairs, EncodedPairs) else encoded_pairs)
    if not pairs:
        raise ValueError("no preference pairs to segment; check data.train_path / data.eval_path")
    return pairs


def segment_ends_for(config: MegasegConfig, encoded_pairs: EncodedPairs | Sequence[TokenizedPair], parallel_ctx: ParallelContext,
                     model: Optional[torch.nn.Module] = None, *, tokenizer: Any = None,
                     load_model: Optional[Callable[[], torch.nn.Module]] = None,
                     capture: Any = None) -> SegmentedPairs:
    """Segment ends of every pair under ``config.segmentation``, from the cache (filled first where needed).

    Args:
        encoded_pairs: the pairs as the trainer encoded them (their token ids are part of the cache key).
        parallel_ctx: from ``initialize_parallel``; entropies are computed at its layout.
        model: the frozen SFT language model (this rank's stage) for entropy mode; None builds it from
            ``model.checkpoint`` when entropies are missing. A model without ``model.checkpoint`` is identified
            in the cache key by a digest of its weights.
        tokenizer: for sentence mode (None loads ``model.tokenizer``).
        load_model: builds the SFT model when ``model`` is None and entropies are missing (default
            ``load_entropy_model(config)``).
        capture: fed by the forwards of the entropy pass, when one runs (``entropy_pass.ensure_entropy_cache``).

    Collective: every rank calls it; every rank gets all pairs.
    """
    pairs = _pairs_of(encoded_pairs)
    if config.segmentation.target_mean_segment_length is not None:
        warnings.warn("segmentation.target_mean_segment_length is read by `megaseg segment` only; segmenting with "
                      f"segmentation.entropy_cutoff={config.segmentation.entropy_cutoff}", stacklevel=2)
    entropy_store = None
    if config.segmentation.mode == "entropy":
        entropy_store = ensure_entropy_cache(config, pairs, parallel_ctx, model, load_model=load_model,
                                             capture=capture)
    return ensure_segment_cache(config, pairs, entropy_store, tokenizer)
