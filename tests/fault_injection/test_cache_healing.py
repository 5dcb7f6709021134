"""Segmentation and entropy cache shards, damaged four ways (truncated, emptied, random bytes, deleted) or stripped
of their checksum record: the next use (what `megaseg segment` and every command that fills the cache on demand
call, ``segment_ends_for``) warns naming the shard, recomputes it alone, and returns exactly the first result;
the good shards are not rewritten. A damaged entry manifest is an error naming it and the repair."""
from __future__ import annotations

import pytest

from fault_material import FAULTS, apply_fault
from megaseg.parallel.spawn import run_distributed
from megaseg.segmentation import segment_ends_for
from scoring_test_helpers import random_pairs, sharpen, tiny_config

pytestmark = pytest.mark.fault_injection
DAMAGED = 1  # the shard that is damaged


def _ends(segmented):
    return [(segmented.chosen_ends[i].tolist(), segmented.rejected_ends[i].tolist())
            for i in range(segmented.num_pairs)]


def _stamps(entry):
    return {p.name: p.stat().st_mtime_ns for p in entry.glob("shard-*.npz")}


@pytest.mark.parametrize("fault", FAULTS + ("no record",))
def test_a_damaged_segment_shard_is_recomputed_alone(tmp_path, fault):
    pairs = random_pairs(7)
    config = tiny_config(str(tmp_path / "cache"), mode="ngram", ngram_size=3, shard_size=2)
    first = segment_ends_for(config, pairs, parallel_ctx=None)
    entry = first.cache_entry
    before = _stamps(entry)
    if fault == "no record":
        (entry / f"shard-{DAMAGED:05d}.json").unlink()
    else:
        apply_fault(entry / f"shard-{DAMAGED:05d}.npz", fault)
    with pytest.warns(UserWarning, match=rf"shard-{DAMAGED:05d}.npz.*recomputing it") if fault != "delete" else \
            _no_warning():
        healed = segment_ends_for(config, pairs, parallel_ctx=None)
    assert _ends(healed) == _ends(first)
    after = _stamps(entry)
    assert {name for name in before if after[name] != before[name]} == {f"shard-{DAMAGED:05d}.npz"}
    assert (entry / "complete.json").is_file()
    from megaseg.segmentation.cache import ShardedStore

    store = ShardedStore(entry, {"num_shards": 4, "shard_size": 2, "num_pairs": 7})
    assert store.damaged_shards() == {}


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("fault", ("truncate", "random"))
def test_a_damaged_entry_manifest_is_named(tmp_path, fault):
    pairs = random_pairs(5)
    config = tiny_config(str(tmp_path / "cache"), mode="ngram", ngram_size=3, shard_size=2)
    entry = segment_ends_for(config, pairs, parallel_ctx=None).cache_entry
    apply_fault(entry / "manifest.json", fault)
    with pytest.raises(ValueError, match=rf"{entry / 'manifest.json'}.*Delete {entry} and run `megaseg segment"):
        segment_ends_for(config, pairs, parallel_ctx=None)


def _entropy_healing(rank, world_size, cache_dir: str):
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    config = tiny_config(cache_dir, shard_size=2, micro_batch_size=2, entropy_cutoff=2.95)
    ctx = initialize_parallel(config.parallel, seed=11)
    model = build_gpt_model(config.model, config.parallel)
    sharpen(model)
    model.eval()
    pairs = random_pairs(6)
    first = segment_ends_for(config, pairs, ctx, model)
    (entry,) = [p for p in first.cache_entry.parent.glob("entropy-*")]
    original = (entry / "shard-00001.npz").read_bytes()
    results = {}
    for fault in FAULTS:
        apply_fault(entry / "shard-00001.npz", fault, seed=5)
        healed = segment_ends_for(config, pairs, ctx, model)
        results[fault] = (_ends(healed) == _ends(first), (entry / "shard-00001.npz").read_bytes() == original)
    return results


@pytest.mark.distributed
def test_a_damaged_entropy_shard_is_recomputed(tmp_path):
    results = run_distributed(_entropy_healing, 1, str(tmp_path / "cache"))[0]
    # Same ends, and the recomputed shard holds the very bytes first written (the entropy pass is deterministic).
    assert results == {fault: (True, True) for fault in FAULTS}
