"""Filling and reading the segmentation cache: ``segment_ends_for`` (for trainers and tools) and ``megaseg segment``.

``segment_ends_for(config, encoded_pairs, parallel_ctx, model=None) -> SegmentedPairs`` is the stable entry point
(see ``megaseg.segmentation.cache`` for the layout and ``SegmentedPairs`` for what it returns). It is collective:
every rank calls it with the same pairs, and every rank gets the ends of all pairs.

Phases, each skipped when the cache already holds its result:
1. entropies (entropy mode only): the frozen SFT model (``model`` if given, else built from ``model.checkpoint``)
   runs over every chosen and rejected sequence once. Shards are shared out over data-parallel replicas; inside a
   replica the tensor/pipeline-parallel ranks run the shard together, entropies come from the vocabulary shards
   through ``vocab_parallel_entropy`` (never gathering the vocabulary), and the replica's last pipeline stage,
   tensor-parallel rank 0, writes the shard.
2. segment ends: the mode's rule (megaseg.algorithms) on the cached entropies, token texts (sentence) or masks alone
   (bandit, token, n-gram), shard by shard, shared out over all ranks.
3. read: every rank reads every shard.

``megaseg segment --config ...`` runs this for the train (and eval) split of ``data``, prints the segment statistics
and, with ``segmentation.target_mean_segment_length``, picks c_ent for that mean segment length (module
``megaseg.segmentation.cutoff``) and prints the override to put into the training config.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaseg.config import MegasegConfig, config_to_yaml
from megaseg.data.encoding import EncodedPairs, TokenizedPair, TokenizedSequence
from megaseg.segmentation.cutoff import PAPER_CUTOFFS, CutoffTable, cutoff_sweep, cutoff_table, pick_cutoff
from megaseg.segmentation.cache import (
    RaggedArray,
    SegmentedPairs,
    ShardedStore,
    data_fingerprint,
    key_digest,
)
from megaseg.segmentation.cutting import cut_sequences, response_token_texts
from megaseg.training.common.metrics import format_duration
from megaseg.segmentation.cache_keys import model_identity, path_fingerprint


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _print0(text: str) -> None:
    if _rank() == 0:
        print(text, flush=True)


def _pairs_of(encoded_pairs: EncodedPairs | Sequence[TokenizedPair]) -> list[TokenizedPair]:
    pairs = list(encoded_pairs.pairs if isinstance(encoded_pairs, EncodedPairs) else encoded_pairs)
    if not pairs:
        raise ValueError("no preference pairs to segment; check data.train_path / data.eval_path")
    return pairs


def _open_collectively(root: Path, kind: str, key: dict, num_pairs: int, shard_size: int) -> ShardedStore:
    """Rank 0 creates (or checks) the entry before any rank opens it; then every rank lists the missing shards
    before any rank writes one, so all ranks share out the same list."""
    if _rank() == 0:
        ShardedStore.prepare(root, kind, key, num_pairs, shard_size)
    _barrier()
    return ShardedStore.open(root, kind, key, num_pairs, shard_size)


class _ShardProgress:
    """`<what> shard i/N | elapsed | ETA` lines on rank 0, for the shards this rank's replica computes."""

    def __init__(self, what: str, num_mine: int, num_total_missing: int) -> None:
        self.what, self.num_mine, self.start, self.done = what, num_mine, time.perf_counter(), 0
        _print0(f"{what}: {num_total_missing} shard(s) to compute, {num_mine} on this data-parallel rank")

    def shard_done(self) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.num_mine - self.done)
        _print0(f"{self.what} shard {self.done}/{self.num_mine} | elapsed {format_duration(elapsed)} "
                f"| ETA {format_duration(eta)}")


# --- phase 1: entropies of the frozen SFT model ---------------------------------------------------------------


def entropy_cache_key(config: MegasegConfig, pairs: Sequence[TokenizedPair], identity: dict) -> dict[str, Any]:
    data = config.data
    tokenizer = config.model.tokenizer
    return {"model": identity,
            "tokenizer": None if tokenizer is None else {"path": str(Path(tokenizer).absolute()),
                                                         "files": path_fingerprint(tokenizer, "model.tokenizer")},
            "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
            "overlong_prompt": data.overlong_prompt, "data": data_fingerprint(pairs),
            "shard_size": config.segmentation.shard_size,
            "entropy": "fp32 nats, logits[j] predicts token j+1, one value per response token"}


def load_sft_model(config: MegasegConfig) -> torch.nn.Module:
    """This rank's stage of the frozen SFT language model from ``model.checkpoint``, in eval mode. Collective."""
    from megaseg.models.gpt import build_gpt_model

    checkpoint = config.model.checkpoint
    if checkpoint is None:
        raise ValueError("entropy segmentation needs the frozen SFT model, but model.checkpoint is not set; point it "
                         "at the megatron checkpoint of the SFT model (`megaseg convert hf-to-megatron`)")
    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"model.checkpoint={checkpoint!r} is not a directory; give the SFT model's megatron "
                         "checkpoint directory")
    if (path / "state").is_dir():  # a megaseg training checkpoint step directory (checks the architecture itself)
        from megaseg.checkpoint.step_dirs import load_checkpoint

        model = build_gpt_model(config.model, config.parallel)
        load_checkpoint(path, model=model, model_cfg=config.model, load_rng=False)
    else:  # a converted checkpoint (megaseg convert): the dist checkpoint itself, its model YAML beside it
        from megaseg.conversion.megatron_checkpoint import load_model_checkpoint

        _check_converted_architecture(path, config)
        model = build_gpt_model(config.model, config.parallel)
        load_model_checkpoint(model, path)
    model.eval()
    return model


def _check_converted_architecture(path: Path, config: MegasegConfig) -> None:
    """ValueError naming the fields where the checkpoint's megaseg_model.yaml and model.* disagree."""
    from megaseg.conversion.model_yaml import MODEL_YAML
    from megaseg.models.architecture import architecture_differences, model_architecture

    model_yaml = path / MODEL_YAML
    if not model_yaml.is_file():
        return  # written by hand or by a tool without the YAML: megatron still checks every tensor's shape
    from megaseg.config import load_config

    saved = model_architecture(load_config(model_yaml).model)
    differences = architecture_differences(saved, config.model)
    if differences:
        listed = "; ".join(f"model.{name}: checkpoint {old!r}, config {new!r}"
                           for name, (old, new) in differences.items())
        raise ValueError(f"model.checkpoint={str(path)!r} holds another architecture than the config ({listed}); "
                         f"use the model section of {model_yaml}")


def _entropy_rows_fn(parallel_ctx: Any, chunk_size: Optional[int]):
    from megaseg.parallel.vocab_parallel import vocab_parallel_entropy

    def rows(logits: torch.Tensor, micro_batch) -> list[np.ndarray]:
        entropy = vocab_parallel_entropy(logits, parallel_ctx.tp_group, chunk_size=chunk_size)  # [b, S]
        prompt_lengths = micro_batch.sequences.prompt_lengths().tolist()
        response_lengths = micro_batch.sequences.response_lengths().tolist()
        return [entropy[row, start:start + length].numpy().astype(np.float32)
                for row, (start, length) in enumerate(zip(prompt_lengths, response_lengths))]

    return rows


def compute_entropy_shard(model: torch.nn.Module, pairs: Sequence[TokenizedPair], parallel_ctx: Any,
                          config: MegasegConfig) -> Optional[dict[str, np.ndarray]]:
    """The arrays of one entropy shard on the last pipeline stage (None elsewhere). Collective over the
    model-parallel group."""
    from megaseg.models.inference import infer_sequences

    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    rows = infer_sequences(model, sequences, micro_batch_size=config.segmentation.micro_batch_size,
                           output_fn=_entropy_rows_fn(parallel_ctx, config.segmentation.entropy_chunk_size),
                           is_last_stage=parallel_ctx.is_last_pipeline_stage)
    if rows is None:
        return None
    chosen = RaggedArray.from_arrays(rows[:len(pairs)], np.float32)
    rejected = RaggedArray.from_arrays(rows[len(pairs):], np.float32)
    return {"chosen_entropy": chosen.values, "chosen_offsets": chosen.offsets,
            "rejected_entropy": rejected.values, "rejected_offsets": rejected.offsets,
            "prompt_lengths": np.array([len(p.chosen.prompt_ids) for p in pairs], dtype=np.int32),
            "chosen_eos": np.array([p.chosen.ends_with_eos for p in pairs], dtype=bool),
            "rejected_eos": np.array([p.rejected.ends_with_eos for p in pairs], dtype=bool)}


def ensure_entropy_cache(config: MegasegConfig, pairs: Sequence[TokenizedPair], parallel_ctx: Any,
                         model: Optional[torch.nn.Module] = None, *,
                         load_model: Optional[Callable[[], torch.nn.Module]] = None) -> ShardedStore:
    """The complete entropy entry for ``pairs``, computing the missing shards. Collective.

    ``model``: the SFT model, or None to call ``load_model`` (default: ``load_sft_model(config)``) only when a shard
    is missing, so a complete cache is read without loading any weights."""
    seg = config.segmentation
    key = entropy_cache_key(config, pairs, model_identity(config.model, model=model, parallel_ctx=parallel_ctx))
    store = _open_collectively(Path(seg.cache_dir) / f"entropy-{key_digest(key)}", "entropy", key, len(pairs),
                               seg.shard_size)
    if store.is_complete():
        _print0(f"entropies: reusing {store.root}")
        return store
    missing = store.missing_shards()
    _barrier()
    mine = missing[parallel_ctx.dp_rank::parallel_ctx.dp_size]
    if missing:
        if model is None:
            model = load_model() if load_model is not None else load_sft_model(config)
        progress = _ShardProgress(f"entropies -> {store.root}", len(mine), len(missing))
        writes = parallel_ctx.is_last_pipeline_stage and parallel_ctx.tp_rank == 0
        for shard in mine:
            arrays = compute_entropy_shard(model, [pairs[i] for i in store.pair_range(shard)], parallel_ctx, config)
            if writes:
                store.write_shard(shard, arrays)
            progress.shard_done()
    _barrier()
    if _rank() == 0:
        store.mark_complete({"num_pairs": len(pairs)})
    _barrier()
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


# --- phase 2: segment ends -----------------------------------------------------------------------------------


def segment_settings(config: MegasegConfig) -> dict[str, Any]:
    seg = config.segmentation
    settings: dict[str, Any] = {"mode": seg.mode}
    if seg.mode == "entropy":
        settings["entropy_cutoff"] = float(seg.entropy_cutoff)
    if seg.mode == "ngram":
        settings["ngram_size"] = int(seg.ngram_size)
    return settings


def _segment_cache_key(config: MegasegConfig, pairs: Sequence[TokenizedPair],
                       entropy_store: Optional[ShardedStore]) -> dict[str, Any]:
    key: dict[str, Any] = {**segment_settings(config), "shard_size": config.segmentation.shard_size}
    if entropy_store is not None:
        key["entropies"] = entropy_store.root.name
    else:
        key["data"] = data_fingerprint(pairs)
        key["max_length"], key["max_prompt_length"] = config.data.max_length, config.data.max_prompt_length
        tokenizer = config.model.tokenizer
        if config.segmentation.mode == "sentence":  # only sentence mode reads token texts
            if tokenizer is None:
                raise ValueError("sentence segmentation decodes tokens, but model.tokenizer is not set; give the "
                                 "model's local tokenizer directory or GGUF file")
            key["tokenizer"] = {"path": str(Path(tokenizer).absolute()),
                                "files": path_fingerprint(tokenizer, "model.tokenizer")}
    return key


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
    settings = segment_settings(config)
    key = _segment_cache_key(config, pairs, entropy_store)
    root = Path(config.segmentation.cache_dir) / f"segments-{config.segmentation.mode}-{key_digest(key)}"
    store = _open_collectively(root, "segments", key, len(pairs), config.segmentation.shard_size)
    if not store.is_complete():
        missing = store.missing_shards()
        _barrier()
        for shard in missing[_rank()::_world_size()]:
            shard_pairs = [pairs[i] for i in store.pair_range(shard)]
            entropies = _shard_entropies(entropy_store, shard, store, shard_pairs)
            store.write_shard(shard, _cut_shard(config, shard_pairs, entropies, tokenizer))
        _barrier()
        if _rank() == 0:
            stats = read_segmented_pairs(store, settings).statistics()
            store.mark_complete({**settings, **stats.to_dict()})
        _barrier()
    return read_segmented_pairs(store, settings)


def segment_ends_for(config: MegasegConfig, encoded_pairs: EncodedPairs | Sequence[TokenizedPair], parallel_ctx: Any,
                     model: Optional[torch.nn.Module] = None, *, tokenizer: Any = None,
                     load_model: Optional[Callable[[], torch.nn.Module]] = None) -> SegmentedPairs:
    """Segment ends of every pair under ``config.segmentation``, from the cache (filled first where needed).

    Args:
        encoded_pairs: the pairs as the trainer encoded them (their token ids are part of the cache key).
        parallel_ctx: from ``initialize_parallel``; entropies are computed at its layout.
        model: the frozen SFT language model (this rank's stage) for entropy mode; None builds it from
            ``model.checkpoint`` when entropies are missing. A model without ``model.checkpoint`` is identified
            in the cache key by a digest of its weights.
        tokenizer: for sentence mode (None loads ``model.tokenizer``).
        load_model: builds the SFT model when ``model`` is None and entropies are missing (default
            ``load_sft_model(config)``).

    Collective: every rank calls it; every rank gets all pairs.
    """
    pairs = _pairs_of(encoded_pairs)
    if config.segmentation.target_mean_segment_length is not None:
        warnings.warn("segmentation.target_mean_segment_length is read by `megaseg segment` only; segmenting with "
                      f"segmentation.entropy_cutoff={config.segmentation.entropy_cutoff}", stacklevel=2)
    entropy_store = None
    if config.segmentation.mode == "entropy":
        entropy_store = ensure_entropy_cache(config, pairs, parallel_ctx, model, load_model=load_model)
    return ensure_segment_cache(config, pairs, entropy_store, tokenizer)


# --- `megaseg segment` -----------------------------------------------------------------------------------------


def _with_cutoff(config: MegasegConfig, cutoff: float) -> MegasegConfig:
    return dataclasses.replace(config, segmentation=dataclasses.replace(
        config.segmentation, entropy_cutoff=cutoff, target_mean_segment_length=None))


def choose_cutoff(config: MegasegConfig, pairs: Sequence[TokenizedPair], entropy_store: ShardedStore) -> dict:
    """Print the mean segment length at the paper's cutoffs and pick c_ent for the configured target."""
    entropies, eos = read_entropies(entropy_store, pairs)
    table: CutoffTable = cutoff_table(entropies, eos)
    choice = pick_cutoff(table, config.segmentation.target_mean_segment_length)
    cutoffs = sorted({*PAPER_CUTOFFS, config.segmentation.entropy_cutoff, choice.entropy_cutoff})
    _print0("entropy cutoff sweep (c_ent -> mean segment length in tokens, segments per response):")
    for row in cutoff_sweep(table, cutoffs):
        _print0(f"  c_ent {row['entropy_cutoff']:.3f} -> {row['mean_segment_length']:.2f} tokens, "
                f"{row['segments_per_response']:.2f} segments/response")
    _print0(f"picked segmentation.entropy_cutoff={choice.entropy_cutoff} for a target mean segment length of "
            f"{choice.target_mean_segment_length} tokens (gives {choice.mean_segment_length:.2f}); put this "
            "override into the training config")
    return dataclasses.asdict(choice)


class _ModelOnDemand:
    """Loads the SFT model the first time a missing entropy shard needs it, then keeps it for the next split."""

    def __init__(self, config: MegasegConfig) -> None:
        self.config, self.model = config, None

    def __call__(self) -> torch.nn.Module:
        if self.model is None:
            self.model = load_sft_model(self.config)
        return self.model


def _segment_split(config: MegasegConfig, name: str, encoded: EncodedPairs, parallel_ctx: Any,
                   sft_model: _ModelOnDemand, tokenizer: Any) -> tuple[dict[str, Any], MegasegConfig]:
    summary: dict[str, Any] = {"num_pairs": len(encoded.pairs), "skipped": encoded.skipped.summary()}
    if config.segmentation.target_mean_segment_length is not None:
        entropy_store = ensure_entropy_cache(config, encoded.pairs, parallel_ctx, load_model=sft_model)
        summary["cutoff_choice"] = choose_cutoff(config, encoded.pairs, entropy_store)
        config = _with_cutoff(config, summary["cutoff_choice"]["entropy_cutoff"])
    segmented = segment_ends_for(config, encoded, parallel_ctx, tokenizer=tokenizer, load_model=sft_model)
    stats = segmented.statistics()
    summary.update(segment_settings(config), cache_entry=str(segmented.cache_entry), **stats.to_dict())
    _print0(f"{name}: {len(encoded.pairs)} pairs, {stats.segments_per_response:.2f} segments per response, mean "
            f"segment length {stats.mean_segment_length:.2f} tokens ({segmented.cache_entry})")
    if _rank() == 0:
        (segmented.cache_entry / "config.yaml").write_text(config_to_yaml(config))
    return summary, config


def run_segmentation(config: MegasegConfig) -> int:
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
        _print0(json.dumps(summary))
    return 0
