"""Entropy segmentation through the cache equals the dense single-process computation (the model's full logits,
plain-torch entropy, the per-sequence loop), and gives the same result data-parallel (DP=2), tensor-parallel (TP=2,
vocab-parallel entropies) and pipeline-parallel (PP=2) as on one process.

The SFT model is a tiny random model saved once as a megatron checkpoint (model.checkpoint), which every run loads
at its own layout (a random init differs per pipeline stage, a checkpoint does not)."""
import numpy as np
import pytest

from megaseg.parallel.spawn import run_distributed
from scoring_test_helpers import (
    dense_entropies,
    gap_cutoff,
    random_pairs,
    reference_ends,
    release_checkpoint_writer,
    sharpen,
    tiny_config,
)

pytestmark = pytest.mark.distributed

NUM_PAIRS = 10


def _build_model(config):
    from megaseg.models.gpt import build_gpt_model

    model = build_gpt_model(config.model, config.parallel)
    sharpen(model)
    model.eval()
    return model


def _segment(config, ctx, model, pairs):
    from megaseg.segmentation import segment_ends_for
    from megaseg.segmentation.entropy_pass import ensure_entropy_cache, read_entropies

    segmented = segment_ends_for(config, pairs, ctx, model)
    entropies, _ = read_entropies(ensure_entropy_cache(config, pairs, ctx, model), pairs)
    ends = [segmented.chosen_ends[i].tolist() for i in range(len(pairs))]
    ends += [segmented.rejected_ends[i].tolist() for i in range(len(pairs))]
    return ends, entropies


def _reference_and_cache(rank, world_size, cache_dir, checkpoint):
    from pathlib import Path

    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.parallel import initialize_parallel

    pairs = random_pairs(NUM_PAIRS)
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    config = tiny_config(cache_dir, shard_size=3, micro_batch_size=3)
    ctx = initialize_parallel(config.parallel, seed=11)
    model = _build_model(config)
    save_model_checkpoint(model, Path(checkpoint))
    release_checkpoint_writer()
    dense = [dense_entropies(model, s)[len(s.prompt_ids):].float().numpy() for s in sequences]
    content = np.concatenate([d[:len(d) - s.ends_with_eos] for d, s in zip(dense, sequences)])
    cutoff = gap_cutoff(content)
    reference = [reference_ends(s, "entropy", entropies=d, cutoff=cutoff) for s, d in zip(sequences, dense)]
    config = tiny_config(cache_dir, shard_size=3, micro_batch_size=3, entropy_cutoff=cutoff, checkpoint=checkpoint)
    ends, cached = _segment(config, ctx, None, pairs)  # the SFT model is loaded from model.checkpoint
    return cutoff, dense, reference, ends, cached


LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (tp, pp) on 2 processes: DP=2, TP=2, PP=2


def _all_layouts(rank, world_size, cache_root, cutoff, checkpoint):
    """Every 2-process layout in one spawn (re-initialising in between saves two interpreter start-ups)."""
    import dataclasses

    from megaseg.config.parallel import ParallelConfig
    from megaseg.parallel import destroy_parallel, initialize_parallel

    results = {}
    for tp, pp in LAYOUTS:
        config = tiny_config(f"{cache_root}/tp{tp}pp{pp}", shard_size=3, micro_batch_size=3, entropy_cutoff=cutoff,
                             checkpoint=checkpoint)
        config = dataclasses.replace(config, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                                     pipeline_model_parallel_size=pp))
        ctx = initialize_parallel(config.parallel, seed=11)
        results[(tp, pp)] = _segment(config, ctx, None, random_pairs(NUM_PAIRS))
        destroy_parallel()
    return results


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg1")
    (result,) = run_distributed(_reference_and_cache, 1, str(root / "cache"), str(root / "sft"))
    return (*result, str(root / "sft"))


def test_cache_equals_dense_single_process_computation(single_process):
    cutoff, dense, reference, ends, cached, _ = single_process
    for expected, got in zip(dense, cached):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert ends == reference
    segments = sum(len(e) for e in ends)
    assert 2 * NUM_PAIRS < segments < sum(len(d) for d in dense)  # the cutoff really cuts, and not everywhere


def test_dp2_tp2_pp2_equal_one_process(single_process, tmp_path):
    cutoff, _, _, ends, cached, checkpoint = single_process
    for rank_results in run_distributed(_all_layouts, 2, str(tmp_path), cutoff, checkpoint, timeout=400):
        for (tp, pp), (layout_ends, layout_entropies) in rank_results.items():
            assert layout_ends == ends, f"tp={tp} pp={pp}"  # every rank gets every pair
            for expected, got in zip(cached, layout_entropies):
                if (tp, pp) == (1, 1):
                    np.testing.assert_array_equal(got, expected)  # the same computation, only shared out
                else:
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"tp={tp} pp={pp}")
