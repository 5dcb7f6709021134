"""Fitting each normalizer kind from scored responses equals numpy / scikit-learn on the same numbers; a reward model
with one segment per response cannot get a location fit and is told which kind to use."""
import numpy as np
import pytest
from sklearn.linear_model import HuberRegressor

from megaseg.segmentation.cache import RaggedArray
from megaseg.scoring.fit_normalizer import fit_from_scores
from megaseg.scoring.scores import PairScores, ResponseScores

METADATA = {"model": "m", "c_ent": 2.0, "aggregation": "mean", "segmentation": "entropy"}


def _side(rng, num_responses, max_segments):
    counts = rng.integers(1, max_segments + 1, num_responses)
    rewards = [rng.normal(np.log((np.arange(n) + 1) / n) * 0.8 + 0.5, 1 + 0.3 * rng.random(n)) for n in counts]
    positions = [(np.arange(n) + 1) / n for n in counts]
    return ResponseScores(segment_rewards=RaggedArray.from_arrays(rewards, np.float64),
                          positions=RaggedArray.from_arrays(positions, np.float64),
                          sequence_rewards=np.array([r.mean() for r in rewards]))


def _scores(seed=0, max_segments=12, num_pairs=60):
    rng = np.random.default_rng(seed)
    return PairScores(chosen=_side(rng, num_pairs, max_segments), rejected=_side(rng, num_pairs, max_segments),
                      aggregation="mean")


def _flat(scores):
    sides = (scores.chosen, scores.rejected)
    return (np.concatenate([s.positions.values for s in sides]),
            np.concatenate([s.segment_rewards.values for s in sides]))


def test_location_fit_equals_scikit_learn_and_numpy():
    scores = _scores()
    p, r = _flat(scores)
    # The released code's grouping: string keys f"{p:.3f}".
    keys = np.array([f"{value:.3f}" for value in p])
    grid = sorted(set(keys.tolist()), key=float)
    mean = np.array([r[keys == k].mean() for k in grid])
    std = np.array([r[keys == k].std() for k in grid])
    x = np.log(np.array([float(k) for k in grid]) + 1e-10)
    huber = fit_from_scores(scores, kind="location", method="huber", metadata=METADATA)
    for (w, b), y in (((huber.w_mu, huber.b_mu), mean), ((huber.w_sigma, huber.b_sigma), std)):
        reference = HuberRegressor(epsilon=1.35).fit(x[:, None], y)
        assert (w, b) == pytest.approx((reference.coef_[0], reference.intercept_), rel=1e-6, abs=1e-9)
    ols = fit_from_scores(scores, kind="location", method="ols", metadata=METADATA)
    assert (ols.w_mu, ols.b_mu) == pytest.approx(tuple(np.polyfit(x, mean, 1)), rel=1e-9)
    assert (ols.w_sigma, ols.b_sigma) == pytest.approx(tuple(np.polyfit(x, std, 1)), rel=1e-9)
    assert ols.num_samples == r.size and ols.c_ent == 2.0 and ols.segmentation == "entropy"


def test_scalar_kinds_equal_numpy():
    scores = _scores(seed=1)
    p, r = _flat(scores)
    global_ = fit_from_scores(scores, kind="global", method="huber", metadata=METADATA)
    assert (global_.mean, global_.std) == pytest.approx((r.mean(), r.std()))
    last = fit_from_scores(scores, kind="last_segment", method="huber", metadata=METADATA)
    assert (last.mean, last.std) == pytest.approx((r[p == 1.0].mean(), r[p == 1.0].std()))
    assert last.num_samples == 2 * scores.num_pairs  # one last segment per response
    sequence = np.concatenate([scores.chosen.sequence_rewards, scores.rejected.sequence_rewards])
    bandit = fit_from_scores(scores, kind="bandit", method="huber", metadata=METADATA)
    assert (bandit.mean, bandit.std) == pytest.approx((sequence.mean(), sequence.std()))
    assert fit_from_scores(scores, kind="none", method="huber", metadata=METADATA).kind == "none"


def test_one_segment_per_response_needs_a_scalar_normalizer():
    scores = _scores(max_segments=1)
    with pytest.raises(ValueError, match="every calibration response has a single segment; use BanditNormalizer"):
        fit_from_scores(scores, kind="location", method="huber", metadata=METADATA)
    assert fit_from_scores(scores, kind="bandit", method="huber", metadata=METADATA).kind == "bandit"
