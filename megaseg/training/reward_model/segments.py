"""Segment ends of every chosen and rejected answer for reward-model training, from the segmentation cache.

`megaseg.segmentation.pipeline.segment_ends_for` (the `megaseg segment` machinery) fills or reuses the cache entry for
(model, tokenizer, data, mode, c_ent / n): for entropy segmentation it runs the frozen SFT model once over the data,
so a second train-rm run on the same data (another lr, the bandit baseline after the segment RM, a resumed run)
reads the ends back instead of recomputing them.
"""
from __future__ import annotations

from collections.abc import Sequence

from megaseg.config import MegasegConfig
from megaseg.data.encoding import TokenizedPair
from megaseg.training.reward_model.batches import SegmentedPair


def segment_pairs(config: MegasegConfig, pairs: Sequence[TokenizedPair], parallel_ctx) -> list[SegmentedPair]:
    """SegmentedPairs for `pairs` under config.segmentation (collective: every rank calls it, all get all pairs)."""
    from megaseg.segmentation.pipeline import segment_ends_for

    segmented = segment_ends_for(config, list(pairs), parallel_ctx)
    if segmented.num_pairs != len(pairs):
        raise ValueError(f"the segmentation returned ends for {segmented.num_pairs} pairs, not {len(pairs)}; its "
                         f"cache entry {segmented.cache_entry} belongs to other data: delete it and segment again")
    result = []
    for index, pair in enumerate(pairs):
        chosen, rejected = segmented.ends_for_pair(index)
        result.append(SegmentedPair(pair, tuple(int(p) for p in chosen), tuple(int(p) for p in rejected)))
    return result
