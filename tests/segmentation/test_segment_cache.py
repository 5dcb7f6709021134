"""The segmentation cache without a model: cutting equals a per-sequence loop, the store is atomic and checked,
modes that need no model go through segment_ends_for and are reused, and the c_ent picker equals brute force."""
import json

import numpy as np
import pytest

from megaseg.data.batch import collate_pairs
from megaseg.segmentation.cutoff import cutoff_sweep, cutoff_table, pick_cutoff
from megaseg.segmentation.cache import RaggedArray, ShardedStore
from megaseg.segmentation.cutting import cut_sequences, response_token_texts
from megaseg.segmentation import segment_ends_for
from scoring_test_helpers import build_tiny_tokenizer, random_pairs, reference_ends, tiny_config


def _sequences(num_pairs=12, seed=0):
    pairs = random_pairs(num_pairs, seed=seed)
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def _random_entropies(sequences, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 4, len(s.response_ids)).astype(np.float32) for s in sequences]


@pytest.mark.parametrize("mode, kwargs", [("bandit", {}), ("token", {}), ("ngram", {"n": 1}), ("ngram", {"n": 3}),
                                          ("ngram", {"n": 50}), ("entropy", {"cutoff": 0.0}),
                                          ("entropy", {"cutoff": 2.0}), ("entropy", {"cutoff": 9.0})])
def test_cutting_equals_the_per_sequence_loop(mode, kwargs):
    sequences = _sequences()
    entropies = _random_entropies(sequences)
    got = cut_sequences(sequences, mode, response_entropies=entropies, cutoff=kwargs.get("cutoff"),
                        ngram_size=kwargs.get("n"))
    for sequence, values, ends in zip(sequences, entropies, got):
        expected = reference_ends(sequence, mode, entropies=values, cutoff=kwargs.get("cutoff"), n=kwargs.get("n"))
        assert ends.tolist() == expected
        assert ends.dtype == np.int32


def test_sentence_cutting_with_real_token_texts(tmp_path):
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(build_tiny_tokenizer(tmp_path / "tok"))
    renderer = ChatTemplateRenderer(tokenizer)
    answers = ["Fine. Thanks！ and you; ok", "Yes,\nno。 maybe?", "plain words only"]
    rendered = [renderer.render([{"role": "user", "content": "Hi there"}], answer) for answer in answers]
    from megaseg.data.encoding import TokenizedSequence

    sequences = [TokenizedSequence(r.prompt_ids, r.response_ids, True) for r in rendered]
    texts = [response_token_texts(tokenizer, s.response_ids) for s in sequences]
    # The full-width marks are split over byte tokens; the token that completes one must end with it.
    assert any(text.endswith("！") for text in texts[0]) and any(text.endswith("。") for text in texts[1])
    got = cut_sequences(sequences, "sentence", response_texts=texts)
    for sequence, text, ends in zip(sequences, texts, got):
        assert ends.tolist() == reference_ends(sequence, "sentence", texts=text)
    decoded = tokenizer.decode(sequences[0].response_ids[: got[0][0] - len(sequences[0].prompt_ids) + 1])
    assert decoded == "Fine."


def test_ragged_array_round_trip():
    arrays = [np.array([1, 2]), np.array([], dtype=np.int64), np.array([5])]
    ragged = RaggedArray.from_arrays(arrays, np.int32)
    assert [ragged[i].tolist() for i in range(3)] == [[1, 2], [], [5]]
    both = RaggedArray.concatenate([ragged, RaggedArray.from_arrays([np.array([7, 8, 9])], np.int32)])
    assert [both[i].tolist() for i in range(4)] == [[1, 2], [], [5], [7, 8, 9]]
    assert both.lengths().tolist() == [2, 0, 1, 3]


def test_store_is_atomic_and_refuses_another_key(tmp_path):
    store = ShardedStore.prepare(tmp_path / "entry", "segments", {"a": 1}, num_pairs=5, shard_size=2)
    assert store.num_shards == 3 and store.missing_shards() == [0, 1, 2]
    assert list(store.pair_range(2)) == [4]
    (tmp_path / "entry" / ".tmp-shard-00001.npz.123").write_bytes(b"half a shard")  # a killed writer's leftover
    store.write_shard(0, {"x": np.arange(3)})
    assert store.missing_shards() == [1, 2]
    assert not [p for p in (tmp_path / "entry").iterdir() if p.name.startswith(".tmp-") and "00000" in p.name]
    store = ShardedStore.prepare(tmp_path / "entry", "segments", {"a": 1}, num_pairs=5, shard_size=2)
    assert not list((tmp_path / "entry").glob(".tmp-*"))  # leftovers removed on prepare
    assert store.read_shard(0)["x"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"manifest.json describes another cache entry \(fields \['key'\]"):
        ShardedStore.open(tmp_path / "entry", "segments", {"a": 2}, num_pairs=5, shard_size=2)
    store.shard_path(1).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"shard-00001.npz: has no size/checksum record .*`megaseg segment"):
        store.read_shard(1)
    with pytest.raises(ValueError, match="shard-00002.npz: is missing"):
        store.read_shard(2)


@pytest.mark.parametrize("mode, extra", [("bandit", {}), ("ngram", {"ngram_size": 4}), ("token", {})])
def test_modes_without_a_model_are_cached_and_reused(tmp_path, mode, extra):
    pairs = random_pairs(7)
    config = tiny_config(str(tmp_path / "cache"), mode=mode, shard_size=3, **extra)
    segmented = segment_ends_for(config, pairs, parallel_ctx=None)
    assert segmented.num_pairs == 7 and segmented.settings["mode"] == mode
    for index, pair in enumerate(pairs):
        chosen, rejected = segmented.ends_for_pair(index)
        assert chosen.tolist() == reference_ends(pair.chosen, mode, n=extra.get("ngram_size"))
        assert rejected.tolist() == reference_ends(pair.rejected, mode, n=extra.get("ngram_size"))
    shards = sorted(segmented.cache_entry.glob("shard-*.npz"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = segment_ends_for(config, pairs, parallel_ctx=None)
    assert again.cache_entry == segmented.cache_entry and [p.stat().st_mtime_ns for p in shards] == stamps
    summary = json.loads((segmented.cache_entry / "complete.json").read_text())
    assert summary["segments_per_response"] == pytest.approx(segmented.statistics().segments_per_response)
    # Another pair set (one more pair) or another shard size is another entry; nothing is read across.
    other = segment_ends_for(config, random_pairs(8), parallel_ctx=None)
    assert other.cache_entry != segmented.cache_entry and other.num_pairs == 8
    resharded = segment_ends_for(tiny_config(str(tmp_path / "cache"), mode=mode, shard_size=2, **extra), pairs,
                                 parallel_ctx=None)
    assert resharded.cache_entry != segmented.cache_entry
    assert all((resharded.ends_for_pair(i)[0] == segmented.ends_for_pair(i)[0]).all() for i in range(7))


def test_ends_mask_follows_collate_pairs_rows_and_statistics_count_by_hand(tmp_path):
    pairs = random_pairs(6)
    segmented = segment_ends_for(tiny_config(str(tmp_path), mode="ngram", ngram_size=2), pairs, parallel_ctx=None)
    indices = [4, 0, 3]
    batch = collate_pairs([pairs[i] for i in indices], pad_id=0)
    mask = segmented.ends_mask(indices, batch.sequences.seq_length)
    assert mask.shape == batch.sequences.input_ids.shape
    assert not bool((mask & ~batch.sequences.response_mask).any())
    for row, sequence in enumerate([pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]):
        assert mask[row].nonzero().flatten().tolist() == reference_ends(sequence, "ngram", n=2)
    with pytest.raises(ValueError, match="has only 3 columns"):
        segmented.ends_mask([0], 3)
    counts, covered = [], []
    for sequence in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
        ends = reference_ends(sequence, "ngram", n=2)
        counts.append(len(ends))
        covered.append(ends[-1] - len(sequence.prompt_ids) + 1)
    stats = segmented.statistics()
    assert stats.num_responses == 12 and stats.num_segments == sum(counts)
    assert stats.mean_segment_length == pytest.approx(sum(covered) / sum(counts))
    assert segmented.statistics([1, 2]).num_responses == 4


def test_cutoff_picker_equals_brute_force_cutting():
    sequences = _sequences(20, seed=3)
    entropies = _random_entropies(sequences, seed=4)
    table = cutoff_table(entropies, [s.ends_with_eos for s in sequences])

    def brute(cutoff):
        ends = cut_sequences(sequences, "entropy", response_entropies=entropies, cutoff=cutoff)
        covered = sum(e[-1] - len(s.prompt_ids) + 1 for s, e in zip(sequences, ends))
        return covered / sum(len(e) for e in ends)

    grid = [0.0, 0.5, 1.234, 2.0, 3.9, 5.0]
    for row in cutoff_sweep(table, grid):
        assert row["mean_segment_length"] == pytest.approx(brute(row["entropy_cutoff"]))
    for target in (1.5, 3.0, 6.0):
        choice = pick_cutoff(table, target)
        assert choice.mean_segment_length == pytest.approx(brute(choice.entropy_cutoff))
        candidates = np.round(np.arange(0, 4.01, 0.001), 3)
        best = min(abs(brute(c) - target) for c in candidates[::50])  # a coarser grid can only do worse
        assert abs(choice.mean_segment_length - target) <= best + 1e-9
    with pytest.raises(ValueError, match="must be >= 1 token"):
        pick_cutoff(table, 0.5)


def test_target_length_needs_entropy_mode():
    with pytest.raises(ValueError, match="picks an entropy cutoff, but segmentation.mode='bandit'"):
        tiny_config("x", mode="bandit", target_mean_segment_length=5.0)
