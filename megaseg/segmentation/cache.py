"""The segmentation cache on disk: per-response entropies and segment ends, stored compactly, shard by shard.

Public API (stable; the reward-model trainer, fit-normalizer and eval-rm use it):

- ``megaseg.segmentation.segment_ends_for(config, encoded_pairs, parallel_ctx, model=None) -> SegmentedPairs``
  fills or reuses the cache and returns, for every pair, the segment end positions of its chosen and rejected
  sequence (collective: every rank calls it and gets all pairs).
- ``SegmentedPairs.ends_mask(pair_indices, seq_length)`` -> ``[2B, S]`` bool, chosen rows first: exactly the row
  order of ``megaseg.data.batch.collate_pairs``, so a trainer builds its batch and its ends mask from the same
  indices. ``SegmentedPairs.ends_for_pair(i)`` gives the two position arrays; ``statistics()`` the segment counts.

End positions index the prompt+response token ids of the encoded sequence (position 0 = first prompt token), the
columns of a right-padded ``SequenceBatch``; they are ascending and lie on response tokens.

Layout under ``segmentation.cache_dir`` (one directory per cache entry, named by a digest of its key):

    entropy-<digest>/        key: model identity, tokenizer, truncation lengths, data hash, shard size
        manifest.json        the key in clear text, number of pairs and shards
        shard-00000.npz      pairs [0, shard_size): float32 entropies at every response position (offsets per
                             response), prompt lengths, EOS flags
        shard-00000.json     the shard's size and sha256 (megaseg.integrity), written right after it
        complete.json        written once every shard exists
    segments-<mode>-<digest>/   key: the above (entropy mode) or tokenizer + data (other modes), mode, c_ent / n
        manifest.json, shard-00000.npz (int32 end positions + offsets), complete.json (segment statistics)

Why entropies are stored too: the model's forward pass is the only expensive step, and the entropy entry does not
depend on c_ent. Any other cutoff (the paper's Fig. 3 sweep, `segmentation.target_mean_segment_length`) re-cuts the
stored entropies in milliseconds instead of rerunning the model. They cost 4 bytes per response token (fp32, kept
exact so that a re-cut makes the same boundary decisions as the first cut).

Each shard is written to a temporary file and renamed into place, so a shard file is always complete; a killed run
resumes by computing only the missing shards. Every use of an entry first checks each shard against its record
(rank 0, ``shards_to_compute``): a missing, truncated, altered or unrecorded shard is deleted with a warning naming it
and recomputed, the good shards are kept. Two jobs must not fill the same entry at the same time.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


from megaseg.atomic_io import TMP_PREFIX, write_bytes_atomic, write_json_atomic
from megaseg.integrity import DamagedFileError, check_file, read_json_file
from megaseg.parallel.collectives import barrier, gather_objects, is_rank_zero

FORMAT_NAME = "megaseg-segment-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
COMPLETE_FILE = "complete.json"
SHARD_REPAIR = ("Run `megaseg segment --config <the run's config>` (or the command again): it recomputes the damaged "
                "shards and keeps the good ones")


@dataclass(frozen=True)
class RaggedArray:
    """Per-item 1-D arrays of different lengths, stored as one flat array and offsets (item i is
    ``values[offsets[i]:offsets[i + 1]]``)."""

    values: np.ndarray   # [total]
    offsets: np.ndarray  # [num_items + 1] int64, offsets[0] == 0

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dtype: Any) -> "RaggedArray":
        lengths = np.array([len(array) for array in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
        return cls(values.astype(dtype, copy=False), offsets)

    @classmethod
    def concatenate(cls, parts: Sequence["RaggedArray"]) -> "RaggedArray":
        values = np.concatenate([part.values for part in parts])
        starts = np.cumsum([0] + [part.offsets[-1] for part in parts[:-1]])
        offsets = np.concatenate([[0]] + [part.offsets[1:] + start for part, start in zip(parts, starts)])
        return cls(values, offsets.astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index]:self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def cache_root(config: Any) -> Path:
    """``segmentation.cache_dir``, or ``<logging.out_dir>/cache/segments`` when it is not set."""
    from megaseg.config.loader import DEFAULT_CACHE_SUBDIR

    seg = config.segmentation
    return Path(seg.cache_dir) if seg.cache_dir is not None else Path(config.logging.out_dir) / DEFAULT_CACHE_SUBDIR


def open_collectively(root: Path, kind: str, key: dict, num_pairs: int, shard_size: int) -> "ShardedStore":
    """Rank 0 creates (or checks) the entry before any rank opens it; then every rank lists the missing shards
    before any rank writes one, so all ranks share out the same list. Collective."""
    if is_rank_zero():
        ShardedStore.prepare(root, kind, key, num_pairs, shard_size)
    barrier()
    return ShardedStore.open(root, kind, key, num_pairs, shard_size)


class ShardedStore:
    """One cache entry: a manifest naming its key, and shard files written atomically one at a time.

    Create it with ``prepare`` (one process, before any other opens it), then ``open`` it anywhere. The manifest is
    compared on open: a directory whose manifest differs from the requested key (a digest collision, a hand-edited
    file) is an error, never silently reused.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @staticmethod
    def _manifest(kind: str, key: Mapping[str, Any], num_pairs: int, shard_size: int) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "key": dict(key),
                "num_pairs": num_pairs, "shard_size": shard_size,
                "num_shards": max(1, -(-num_pairs // shard_size))}

    @classmethod
    def prepare(cls, root: Path, kind: str, key: Mapping[str, Any], num_pairs: int, shard_size: int) -> "ShardedStore":
        """Create the entry (or check an existing one) and remove temporary files of killed writers."""
        manifest = json.loads(json.dumps(cls._manifest(kind, key, num_pairs, shard_size), default=str))
        root.mkdir(parents=True, exist_ok=True)
        if (root / MANIFEST_FILE).is_file():
            store = cls.open(root, kind, key, num_pairs, shard_size)
        else:
            write_json_atomic(root / MANIFEST_FILE, manifest, sort_keys=True)
            store = cls(root, manifest)
        for leftover in root.glob(f"{TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
        return store

    @classmethod
    def open(cls, root: Path, kind: str, key: Mapping[str, Any], num_pairs: int, shard_size: int) -> "ShardedStore":
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise ValueError(f"segmentation cache entry {root} has no {MANIFEST_FILE}; it was not prepared (or was "
                             "deleted while in use); run `megaseg segment` again")
        stored = read_json_file(path, "the cache entry's key", f"Delete {root} and run `megaseg segment` again")
        expected = json.loads(json.dumps(cls._manifest(kind, key, num_pairs, shard_size), default=str))
        if not isinstance(stored, dict):
            raise ValueError(f"{path} is not a cache-entry manifest; delete {root} and run `megaseg segment` again")
        if stored != expected:
            differing = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
            raise ValueError(f"{path} describes another cache entry (fields {differing} differ from this run's); "
                             f"delete {root} and run `megaseg segment` again")
        return cls(root, stored)

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    def pair_range(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, int(self.manifest["num_pairs"])))

    def shard_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}.npz"

    def record_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}.json"

    def check_shard(self, shard: int) -> None:
        """DamagedFileError unless the shard exists with the size and checksum recorded when it was written."""
        path = self.shard_path(shard)
        if not path.is_file():
            raise DamagedFileError(path, "is missing", SHARD_REPAIR)
        record = self.record_path(shard)
        if not record.is_file():
            raise DamagedFileError(path, f"has no size/checksum record ({record.name}): its write was interrupted or "
                                         "it was not written by this megaseg", SHARD_REPAIR)
        content = read_json_file(record, "the shard's size and checksum", SHARD_REPAIR)
        if not isinstance(content, dict) or not {"size", "sha256"} <= set(content):
            raise DamagedFileError(record, "is not a size/checksum record", SHARD_REPAIR)
        check_file(path, content, SHARD_REPAIR)

    def damaged_shards(self) -> dict[int, str]:
        """shard -> what is wrong with it, for every shard that is missing or fails its check (one process)."""
        damaged = {}
        for shard in range(self.num_shards):
            try:
                self.check_shard(shard)
            except DamagedFileError as error:
                damaged[shard] = str(error)
        return damaged

    def shards_to_compute(self) -> list[int]:
        """The shards to (re)compute, the same list on every rank. Rank 0 checks every shard; a damaged one (present
        but failing its check) is deleted with a warning naming it, and the entry is no longer complete. Collective:
        no rank writes a shard before every rank has the list."""
        damaged: dict[int, str] = {}
        if is_rank_zero():
            damaged = self.damaged_shards()
            for shard, problem in damaged.items():
                if self.shard_path(shard).exists() or self.record_path(shard).exists():
                    message = f"segmentation cache: {problem}; recomputing it"
                    warnings.warn(message)
                    print(f"warning: {message}", flush=True)
                self.shard_path(shard).unlink(missing_ok=True)
                self.record_path(shard).unlink(missing_ok=True)
            if damaged:
                (self.root / COMPLETE_FILE).unlink(missing_ok=True)
        shards = sorted(gather_objects(sorted(damaged))[0])
        barrier()
        return shards

    def missing_shards(self) -> list[int]:
        return [shard for shard in range(self.num_shards) if not self.shard_path(shard).is_file()]

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """The shard, then its size/checksum record (both atomic: a shard without a record is recomputed)."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # a file handle: np.savez would append ".npz" to a path
        data = buffer.getvalue()
        write_bytes_atomic(self.shard_path(shard), lambda handle: handle.write(data))
        write_json_atomic(self.record_path(shard), {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        self.check_shard(shard)
        path = self.shard_path(shard)
        try:
            with np.load(path, allow_pickle=False) as loaded:
                return {name: loaded[name] for name in loaded.files}
        except Exception as error:  # a recorded file that numpy cannot read (written by a broken writer)
            raise DamagedFileError(path, f"is unreadable ({type(error).__name__}: {error})", SHARD_REPAIR) from None

    def is_complete(self) -> bool:
        return (self.root / COMPLETE_FILE).is_file()

    def mark_complete(self, summary: Mapping[str, Any]) -> None:
        missing = self.missing_shards()
        assert not missing, f"marking {self.root} complete with shards {missing[:8]} missing"
        write_json_atomic(self.root / COMPLETE_FILE, summary, sort_keys=True)

    def read_summary(self) -> dict[str, Any]:
        return read_json_file(self.root / COMPLETE_FILE, "the cache entry's summary", SHARD_REPAIR)


@dataclass(frozen=True)
class SegmentStatistics:
    num_responses: int
    num_segments: int
    segments_per_response: float
    # Tokens inside segments / segments. EOS is in no segment (except in bandit mode and EOS-only responses).
    mean_segment_length: float

    def to_dict(self) -> dict[str, float]:
        return {"num_responses": self.num_responses, "num_segments": self.num_segments,
                "segments_per_response": self.segments_per_response,
                "mean_segment_length": self.mean_segment_length}


def segment_statistics(ends: Sequence[RaggedArray], prompt_lengths: np.ndarray) -> SegmentStatistics:
    """Statistics over the responses of ``ends`` (each a RaggedArray aligned with ``prompt_lengths``).

    Segments tile the response from its first token to the last end, so the tokens in segments of a response are
    ``last end - prompt length + 1``."""
    num_responses = sum(len(part) for part in ends)
    counts = np.concatenate([part.lengths() for part in ends])
    last_ends = np.concatenate([part.values[part.offsets[1:] - 1] for part in ends])
    covered = int(np.sum(last_ends - np.concatenate([prompt_lengths] * len(ends)) + 1))
    num_segments = int(counts.sum())
    return SegmentStatistics(num_responses=num_responses, num_segments=num_segments,
                             segments_per_response=num_segments / max(num_responses, 1),
                             mean_segment_length=covered / max(num_segments, 1))


@dataclass(frozen=True)
class SegmentedPairs:
    """Segment ends of every pair's chosen and rejected sequence (see the module docstring for the positions)."""

    chosen_ends: RaggedArray    # [P] ascending int32 end positions per pair
    rejected_ends: RaggedArray  # [P]
    prompt_lengths: np.ndarray  # [P] int32; chosen and rejected share the prompt
    settings: dict[str, Any]    # mode, entropy_cutoff or ngram_size, and the cache entry it came from
    cache_entry: Optional[Path] = None

    def __post_init__(self) -> None:
        assert len(self.chosen_ends) == len(self.rejected_ends) == len(self.prompt_lengths)

    @property
    def num_pairs(self) -> int:
        return len(self.prompt_lengths)

    def ends_for_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.chosen_ends[index], self.rejected_ends[index]

    def ends_mask(self, pair_indices: Sequence[int], seq_length: int) -> torch.Tensor:
        """``[2B, seq_length]`` bool, True at segment ends: the chosen rows of ``pair_indices``, then the rejected
        rows (the row order of ``collate_pairs``)."""
        rows = [self.chosen_ends[i] for i in pair_indices] + [self.rejected_ends[i] for i in pair_indices]
        return ends_mask_from_positions(rows, seq_length)

    def statistics(self, pair_indices: Optional[Sequence[int]] = None) -> SegmentStatistics:
        if pair_indices is None:
            return segment_statistics([self.chosen_ends, self.rejected_ends], self.prompt_lengths)
        indices = list(pair_indices)
        chosen = RaggedArray.from_arrays([self.chosen_ends[i] for i in indices], np.int32)
        rejected = RaggedArray.from_arrays([self.rejected_ends[i] for i in indices], np.int32)
        return segment_statistics([chosen, rejected], self.prompt_lengths[indices])


def ends_mask_from_positions(rows: Sequence[np.ndarray], seq_length: int) -> torch.Tensor:
    """``[len(rows), seq_length]`` bool with True at each row's positions."""
    mask = torch.zeros(len(rows), seq_length, dtype=torch.bool)
    for row, positions in enumerate(rows):
        if len(positions) and int(positions[-1]) >= seq_length:
            raise ValueError(f"row {row} has a segment end at position {int(positions[-1])} but the batch has only "
                             f"{seq_length} columns; collate the same sequences the segmentation was computed for")
        mask[row, torch.from_numpy(np.asarray(positions, dtype=np.int64))] = True
    return mask
