"""Scoring with a reward model equals a slow reference (one unpadded sequence per forward, segment rewards and
e(x, y) computed by hand from the per-sequence segmentation loop), for every aggregation; DP=2 and TP=2 equal one
process, and every rank gets every pair."""
import numpy as np
import pytest

from megaseg.parallel.spawn import run_distributed
from scoring_test_helpers import random_pairs, reference_ends, tiny_config

pytestmark = pytest.mark.distributed

NUM_PAIRS, NGRAM = 9, 3
AGGREGATIONS = ("mean", "sum", "last", "min")
BY_HAND = {"mean": np.mean, "sum": np.sum, "last": lambda r: r[-1], "min": np.min}


def _score_all(config, ctx, pairs):
    from megaseg.models.scalar_head import build_reward_model
    from megaseg.scoring.scores import score_pairs
    from megaseg.segmentation import segment_ends_for

    model = build_reward_model(config.model, config.parallel, seed=7)
    model.eval()
    segmented = segment_ends_for(config, pairs, ctx)
    results = {}
    for how in AGGREGATIONS:
        scores = score_pairs(model, pairs, segmented, ctx, aggregation=how, micro_batch_size=4)
        results[how] = scores
    return model, results


def _one_process(rank, world_size, cache_dir):
    import torch

    from megaseg.parallel import initialize_parallel

    config = tiny_config(cache_dir, mode="ngram", ngram_size=NGRAM)
    ctx = initialize_parallel(config.parallel, seed=3)
    pairs = random_pairs(NUM_PAIRS)
    model, results = _score_all(config, ctx, pairs)
    reference = []
    for sequence in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
        ids = torch.tensor([sequence.prompt_ids + sequence.response_ids])
        with torch.no_grad():
            values = model(ids, torch.arange(ids.shape[1])[None], None)[0].double().numpy()
        ends = reference_ends(sequence, "ngram", n=NGRAM)
        reference.append((values[ends], [(t + 1) / len(ends) for t in range(len(ends))]))
    return reference, results


def _two_processes(rank, world_size, cache_root):
    from megaseg.config.parallel import ParallelConfig
    from megaseg.parallel import destroy_parallel, initialize_parallel
    import dataclasses

    out = {}
    for tp in (1, 2):
        config = tiny_config(f"{cache_root}/tp{tp}", mode="ngram", ngram_size=NGRAM)
        config = dataclasses.replace(config, parallel=ParallelConfig(tensor_model_parallel_size=tp))
        ctx = initialize_parallel(config.parallel, seed=3)
        out[tp] = _score_all(config, ctx, random_pairs(NUM_PAIRS))[1]
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    (result,) = run_distributed(_one_process, 1, str(tmp_path_factory.mktemp("score")))
    return result


def _sides(scores):
    return [scores.chosen, scores.rejected]


def test_scores_equal_the_slow_reference(one_process):
    reference, results = one_process
    for how, scores in results.items():
        rows = [(side, i) for side in _sides(scores) for i in range(NUM_PAIRS)]
        for (side, i), (rewards, positions) in zip(rows, reference):
            np.testing.assert_allclose(side.segment_rewards[i], rewards, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(side.positions[i], positions, rtol=0, atol=1e-7)
            assert side.sequence_rewards[i] == pytest.approx(BY_HAND[how](rewards), rel=1e-5, abs=1e-6)
    mean = results["mean"]
    by_hand = [float(np.mean(r)) for r, _ in reference]
    margins = np.array(by_hand[:NUM_PAIRS]) - np.array(by_hand[NUM_PAIRS:])
    np.testing.assert_allclose(mean.margins(), margins, rtol=1e-5, atol=1e-6)
    assert mean.accuracy() == pytest.approx(np.mean(margins > 0))
    positions, rewards = mean.calibration_samples()
    np.testing.assert_allclose(rewards, np.concatenate([r for r, _ in reference]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(positions, np.concatenate([p for _, p in reference]), atol=1e-7)


def test_dp2_and_tp2_equal_one_process(one_process, tmp_path):
    _, single = one_process
    for rank_results in run_distributed(_two_processes, 2, str(tmp_path), timeout=300):
        for tp, results in rank_results.items():
            for how in AGGREGATIONS:
                for expected, got in zip(_sides(single[how]), _sides(results[how])):
                    np.testing.assert_allclose(got.sequence_rewards, expected.sequence_rewards, rtol=1e-5,
                                               atol=1e-6, err_msg=f"tp={tp} {how}")
                    np.testing.assert_allclose(got.segment_rewards.values, expected.segment_rewards.values,
                                               rtol=1e-5, atol=1e-6)
                    np.testing.assert_array_equal(got.segment_rewards.offsets, expected.segment_rewards.offsets)
