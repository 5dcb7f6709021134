"""Encoded sequences (+ cached entropies or token texts) -> segment end positions, through megaseg.algorithms;
and phase 2 of segmentation, which cuts every shard of a cache entry that way.

The boundary rules themselves live in ``megaseg.algorithms.segmentation`` (tested against per-sequence loops); this
module only lays a group of sequences out as the right-padded ``[rows, seq]`` masks those functions take and reads
the end positions back, so the cache and a trainer's batch can never disagree about a convention.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch


from megaseg.algorithms.segmentation import SEGMENTATION_MODES, segment_ends, sentence_end_mask
from megaseg.config import MegasegConfig
from megaseg.data.batch import SequenceBatch, collate_sequences
from megaseg.data.encoding import TokenizedPair, TokenizedSequence
from megaseg.parallel.collectives import barrier, is_rank_zero, rank, world_size
from megaseg.segmentation.cache import RaggedArray, SegmentedPairs, ShardedStore, cache_root, open_collectively
from megaseg.segmentation.cache_keys import key_digest, segment_cache_key, segment_settings

# Padding sits after every real token and is masked out of every rule, so any valid id does.
PAD_ID = 0
# How many preceding tokens are decoded with a token whose own text is an incomplete UTF-8 sequence (byte-level
# BPE splits a full-width mark such as "。" over up to 3 byte tokens; the last of them completes the character).
UTF8_WINDOW = 3
REPLACEMENT_CHARACTER = "\ufffd"


def response_token_texts(tokenizer: Any, response_ids: Sequence[int], cache: Optional[dict] = None) -> list[str]:
    """The text each response token ends with, for sentence segmentation.

    A token decoded alone gives its own text; when that is an incomplete UTF-8 sequence (the replacement character)
    the token is decoded together with up to ``UTF8_WINDOW`` tokens before it, so the text ends with the character it
    completes. ``cache`` (id -> text) may be shared across calls.
    """
    cache = {} if cache is None else cache
    texts = []
    for index, token_id in enumerate(response_ids):
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        text = cache[token_id]
        if REPLACEMENT_CHARACTER in text:
            text = tokenizer.decode(list(response_ids[max(0, index - UTF8_WINDOW):index + 1]))
        texts.append(text)
    return texts


def _entropy_rows(sequences: Sequence[TokenizedSequence], entropies: Sequence[np.ndarray],
                  seq_length: int) -> torch.Tensor:
    table = torch.zeros(len(sequences), seq_length, dtype=torch.float32)
    for row, (sequence, values) in enumerate(zip(sequences, entropies)):
        start = len(sequence.prompt_ids)
        if len(values) != len(sequence.response_ids):
            raise ValueError(f"row {row}: {len(values)} cached entropies for a response of "
                             f"{len(sequence.response_ids)} tokens; the cache does not belong to these sequences")
        table[row, start:start + len(values)] = torch.from_numpy(np.asarray(values, dtype=np.float32))
    return table


def _text_rows(sequences: Sequence[TokenizedSequence], response_texts: Sequence[Sequence[str]],
               seq_length: int) -> list[list[str]]:
    rows = []
    for sequence, texts in zip(sequences, response_texts):
        prompt_length = len(sequence.prompt_ids)
        row = [""] * seq_length
        row[prompt_length:prompt_length + len(texts)] = list(texts)
        rows.append(row)
    return rows


def cut_sequences(sequences: Sequence[TokenizedSequence], mode: str, *,
                  response_entropies: Optional[Sequence[np.ndarray]] = None, cutoff: Optional[float] = None,
                  ngram_size: Optional[int] = None,
                  response_texts: Optional[Sequence[Sequence[str]]] = None) -> list[np.ndarray]:
    """Ascending int32 segment end positions (in prompt+response ids) of each sequence.

    Args:
        mode: one of ``SEGMENTATION_MODES``; entropy needs ``response_entropies`` (one fp32 value per response token,
            the entropy of the distribution predicting the next token) and ``cutoff``; ngram needs ``ngram_size``;
            sentence needs ``response_texts`` (``response_token_texts`` per sequence).
    """
    if mode not in SEGMENTATION_MODES:
        raise ValueError(f"segmentation mode {mode!r} is not one of {list(SEGMENTATION_MODES)}")
    if not sequences:
        return []
    batch = collate_sequences(sequences, PAD_ID)
    entropy = token_texts = None
    if mode == "entropy":
        if response_entropies is None or cutoff is None:
            raise ValueError("entropy segmentation needs the response entropies and a cutoff")
        entropy = _entropy_rows(sequences, response_entropies, batch.seq_length)
    if mode == "sentence":
        if response_texts is None:
            raise ValueError("sentence segmentation needs the decoded response token texts")
        token_texts = _text_rows(sequences, response_texts, batch.seq_length)
    ends = segment_ends(mode, batch.response_mask, batch.eos_mask, entropy=entropy, cutoff=cutoff, n=ngram_size,
                        token_texts=token_texts)
    rows, columns = ends.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=len(sequences)).tolist()
    return [part.numpy().astype(np.int32) for part in torch.split(columns, counts)]


class TokenizerSentenceMarker:
    """Sentence ends of rollouts (PPO's sentence granularity) from the tokenizer's token texts, by the same rule the
    reward model was segmented with: ``[B, S]`` bool on the response tokens whose text ends a sentence."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, sequences: SequenceBatch) -> torch.Tensor:
        rows = []
        for row in range(sequences.batch_size):
            columns = torch.nonzero(sequences.response_mask[row]).flatten()
            texts = [""] * sequences.seq_length
            ids = sequences.input_ids[row, columns].tolist()
            for column, text in zip(columns.tolist(), response_token_texts(self.tokenizer, ids, self._texts)):
                texts[column] = text
            rows.append(texts)
        return sentence_end_mask(rows, (sequences.batch_size, sequences.seq_length),
                                 device=sequences.response_mask.device)


# --- phase 2 of segmentation: segment ends, cut shard by shard into the cache --------------------------------


def _sentence_texts(config: MegasegConfig, tokenizer: Any, sequences: Sequence[TokenizedSequence]) -> list:
    if tokenizer is None:
        if config.model.tokenizer is None:
            raise ValueError("sentence segmentation decodes tokens, but model.tokenizer is not set")
        from megaseg.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.model.tokenizer)
    cache: dict[int, str] = {}
    return [response_token_texts(tokenizer, s.response_ids, cache) for s in sequences]


def _cut_shard(config: MegasegConfig, pairs: Sequence[TokenizedPair], entropies: Optional[list[np.ndarray]],
               tokenizer: Any) -> dict[str, np.ndarray]:
    seg = config.segmentation
    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    texts = _sentence_texts(config, tokenizer, sequences) if seg.mode == "sentence" else None
    ends = cut_sequences(sequences, seg.mode, response_entropies=entropies, cutoff=seg.entropy_cutoff,
                         ngram_size=seg.ngram_size, response_texts=texts)
    chosen = RaggedArray.from_arrays(ends[:len(pairs)], np.int32)
    rejected = RaggedArray.from_arrays(ends[len(pairs):], np.int32)
    return {"chosen_ends": chosen.values, "chosen_offsets": chosen.offsets, "rejected_ends": rejected.values,
            "rejected_offsets": rejected.offsets,
            "prompt_lengths": np.array([len(p.chosen.prompt_ids) for p in pairs], dtype=np.int32)}


def _shard_entropies(entropy_store: Optional[ShardedStore], shard: int, store: ShardedStore,
                     pairs: Sequence[TokenizedPair]) -> Optional[list[np.ndarray]]:
    if entropy_store is None:
        return None
    assert entropy_store.shard_size == store.shard_size
    arrays = entropy_store.read_shard(shard)
    chosen = RaggedArray(arrays["chosen_entropy"], arrays["chosen_offsets"])
    rejected = RaggedArray(arrays["rejected_entropy"], arrays["rejected_offsets"])
    if len(chosen) != len(pairs):
        raise ValueError(f"{entropy_store.shard_path(shard)} holds {len(chosen)} pairs, expected {len(pairs)}; "
                         f"delete {entropy_store.root} and run `megaseg segment` again")
    return [chosen[i] for i in range(len(chosen))] + [rejected[i] for i in range(len(rejected))]


def read_segmented_pairs(store: ShardedStore, settings: dict[str, Any]) -> SegmentedPairs:
    chosen, rejected, prompt_lengths = [], [], []
    for shard in range(store.num_shards):
        arrays = store.read_shard(shard)
        chosen.append(RaggedArray(arrays["chosen_ends"], arrays["chosen_offsets"]))
        rejected.append(RaggedArray(arrays["rejected_ends"], arrays["rejected_offsets"]))
        prompt_lengths.append(arrays["prompt_lengths"])
        if len(chosen[-1]) != len(store.pair_range(shard)):
            raise ValueError(f"{store.shard_path(shard)} holds {len(chosen[-1])} pairs, expected "
                             f"{len(store.pair_range(shard))}; delete {store.root} and run `megaseg segment` again")
    return SegmentedPairs(chosen_ends=RaggedArray.concatenate(chosen), rejected_ends=RaggedArray.concatenate(rejected),
                          prompt_lengths=np.concatenate(prompt_lengths), settings=dict(settings),
                          cache_entry=store.root)


def ensure_segment_cache(config: MegasegConfig, pairs: Sequence[TokenizedPair],
                         entropy_store: Optional[ShardedStore], tokenizer: Any = None) -> SegmentedPairs:
    """The complete segment entry for ``pairs``, cutting the missing shards; read whole on every rank."""
    settings = segment_settings(config.segmentation)
    key = segment_cache_key(config, pairs, None if entropy_store is None else entropy_store.root)
    root = cache_root(config) / f"segments-{config.segmentation.mode}-{key_digest(key)}"
    store = open_collectively(root, "segments", key, len(pairs), config.segmentation.shard_size)
    missing = store.shards_to_compute()
    if missing or not store.is_complete():
        for shard in missing[rank()::world_size()]:
            shard_pairs = [pairs[i] for i in store.pair_range(shard)]
            entropies = _shard_entropies(entropy_store, shard, store, shard_pairs)
            store.write_shard(shard, _cut_shard(config, shard_pairs, entropies, tokenizer))
        barrier()
        if is_rank_zero():
            stats = read_segmented_pairs(store, settings).statistics()
            store.mark_complete({**settings, **stats.to_dict()})
        barrier()
    return read_segmented_pairs(store, settings)
