"""Phase 1 of segmentation: the next-token entropies of the frozen SFT model over every chosen and rejected
response, computed once into the cache (megaseg.segmentation.cache) and read back for any cutoff.

Shards are shared out over data-parallel replicas; inside a replica the tensor/pipeline-parallel ranks run the shard
together through the one frozen-model runner (megaseg.models.inference), entropies come from the vocabulary shards
through ``vocab_parallel_entropy`` (never gathering the vocabulary), and the replica's last pipeline stage,
tensor-parallel rank 0, writes the shard.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch

from megaseg.checkpoint.sft import load_sft_language_model
from megaseg.config import MegasegConfig
from megaseg.data.encoding import TokenizedPair
from megaseg.models.inference import infer_sequences, tensor_parallel_group
from megaseg.parallel.collectives import barrier, is_rank_zero, print_rank_zero
from megaseg.parallel.initialize import ParallelContext
from megaseg.progress import Progress
from megaseg.segmentation.cache import RaggedArray, ShardedStore, cache_root, open_collectively
from megaseg.segmentation.cache_keys import entropy_cache_key, key_digest, model_identity


def load_entropy_model(config: MegasegConfig) -> torch.nn.Module:
    """This rank's stage of the frozen SFT language model from ``model.checkpoint``. Collective."""
    return load_sft_language_model(config, "entropy segmentation", frozen=True)


def _entropy_rows_fn(parallel_ctx: ParallelContext, chunk_size: Optional[int], capture: Any = None):
    from megaseg.parallel.vocab_parallel import vocab_parallel_entropy

    def rows(logits: torch.Tensor, micro_batch) -> list[np.ndarray]:
        if capture is not None:  # right after this micro-batch's forward: its hidden states are the ones captured
            capture.collect(micro_batch)
        entropy = vocab_parallel_entropy(logits, tensor_parallel_group(parallel_ctx), chunk_size=chunk_size)  # [b, S]
        prompt_lengths = micro_batch.sequences.prompt_lengths().tolist()
        response_lengths = micro_batch.sequences.response_lengths().tolist()
        return [entropy[row, start:start + length].numpy().astype(np.float32)
                for row, (start, length) in enumerate(zip(prompt_lengths, response_lengths))]

    return rows


def compute_entropy_shard(model: torch.nn.Module, pairs: Sequence[TokenizedPair], parallel_ctx: ParallelContext,
                          config: MegasegConfig, capture: Any = None) -> Optional[dict[str, np.ndarray]]:
    """The arrays of one entropy shard on the last pipeline stage (None elsewhere). Collective over the
    model-parallel group. ``capture``: see ``ensure_entropy_cache``."""
    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    rows = infer_sequences(model, sequences, micro_batch_size=config.segmentation.micro_batch_size,
                           output_fn=_entropy_rows_fn(parallel_ctx, config.segmentation.entropy_chunk_size, capture),
                           is_last_stage=parallel_ctx.is_last_pipeline_stage,
                           # The capture files hidden states by rows of a padded micro-batch.
                           packing=config.data.packing and capture is None)
    if rows is None:
        return None
    chosen = RaggedArray.from_arrays(rows[:len(pairs)], np.float32)
    rejected = RaggedArray.from_arrays(rows[len(pairs):], np.float32)
    return {"chosen_entropy": chosen.values, "chosen_offsets": chosen.offsets,
            "rejected_entropy": rejected.values, "rejected_offsets": rejected.offsets,
            "prompt_lengths": np.array([len(p.chosen.prompt_ids) for p in pairs], dtype=np.int32),
            "chosen_eos": np.array([p.chosen.ends_with_eos for p in pairs], dtype=bool),
            "rejected_eos": np.array([p.rejected.ends_with_eos for p in pairs], dtype=bool)}


def ensure_entropy_cache(config: MegasegConfig, pairs: Sequence[TokenizedPair], parallel_ctx: ParallelContext,
                         model: Optional[torch.nn.Module] = None, *,
                         load_model: Optional[Callable[[], torch.nn.Module]] = None,
                         capture: Any = None) -> ShardedStore:
    """The complete entropy entry for ``pairs``, computing the missing shards. Collective.

    ``model``: the SFT model, or None to call ``load_model`` (default: ``load_entropy_model(config)``) only when a shard
    is missing, so a complete cache is read without loading any weights.
    ``capture``: None, or what else to take out of the forwards that compute missing shards (one process, PP=1):
    ``capture.attached(model)`` (a context manager) around them and ``capture.collect(micro_batch)`` after each
    micro-batch's forward (megaseg.training.reward_model.frozen_prefix keeps the frozen layers' output)."""
    seg = config.segmentation
    key = entropy_cache_key(config, pairs, model_identity(config.model, model=model, parallel_ctx=parallel_ctx))
    store = open_collectively(cache_root(config) / f"entropy-{key_digest(key)}", "entropy", key, len(pairs),
                               seg.shard_size)
    missing = store.shards_to_compute()
    if not missing and store.is_complete():
        print_rank_zero(f"entropies: reusing {store.root}")
        return store
    mine = missing[parallel_ctx.dp_rank::parallel_ctx.dp_size]
    if missing:
        if model is None:
            model = load_model() if load_model is not None else load_entropy_model(config)
        print_rank_zero(f"entropies: {len(missing)} shard(s) to compute, {len(mine)} on this data-parallel rank")
        progress = Progress(f"entropies -> {store.root}", len(mine), unit="shards", interval=0.0)
        writes = parallel_ctx.is_last_pipeline_stage and parallel_ctx.tp_rank == 0
        with capture.attached(model) if capture is not None else contextlib.nullcontext():
            for shard in mine:
                arrays = compute_entropy_shard(model, [pairs[i] for i in store.pair_range(shard)], parallel_ctx,
                                               config, capture)
                if writes:
                    store.write_shard(shard, arrays)
                progress.update(progress.done + 1)
        progress.close()
    barrier()
    if is_rank_zero():
        store.mark_complete({"num_pairs": len(pairs)})
    barrier()
    return store


def read_entropies(store: ShardedStore, pairs: Sequence[TokenizedPair]) -> tuple[list[np.ndarray], list[bool]]:
    """Every response's cached entropies (chosen of all pairs, then rejected) and EOS flags, checked against pairs."""
    chosen, rejected, chosen_eos, rejected_eos = [], [], [], []
    for shard in range(store.num_shards):
        arrays = store.read_shard(shard)
        chosen_part = RaggedArray(arrays["chosen_entropy"], arrays["chosen_offsets"])
        rejected_part = RaggedArray(arrays["rejected_entropy"], arrays["rejected_offsets"])
        for i, pair_index in enumerate(store.pair_range(shard)):
            pair = pairs[pair_index]
            if (len(chosen_part[i]), len(rejected_part[i])) != (len(pair.chosen.response_ids),
                                                               len(pair.rejected.response_ids)):
                raise ValueError(f"{store.shard_path(shard)} does not match pair {pair.id} ({pair.source}); delete "
                                 f"{store.root} and run `megaseg segment` again")
            chosen.append(chosen_part[i])
            rejected.append(rejected_part[i])
        chosen_eos.extend(arrays["chosen_eos"].tolist())
        rejected_eos.extend(arrays["rejected_eos"].tolist())
    return chosen + rejected, chosen_eos + rejected_eos
