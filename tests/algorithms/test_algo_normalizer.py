import json
import math

import algo_reference as ref
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import r2_score

from megaseg.algorithms import normalizer as nz
from megaseg.algorithms.location_fit import location_table

META = {"model": "tiny", "c_ent": 1.75, "aggregation": "mean", "segmentation": "entropy"}
PHI3 = (0.7668, 0.2569, 0.4705, 2.8339)  # (w_mu, w_sigma, b_mu, b_sigma), paper's Phi-3-mini c = 1.75


def calibration(seed: int = 0, num_responses: int = 400, max_segments: int = 30, noise: float = 1.0):
    """Segment rewards drawn with Mean(p) = 0.8 log p + 0.5, Std(p) = 0.3 log p + 2.8 (Phi-3-like shapes)."""
    rng = np.random.default_rng(seed)
    positions, rewards = [], []
    for _ in range(num_responses):
        total = int(rng.integers(1, max_segments + 1))
        p = np.arange(1, total + 1) / total
        positions.append(p)
        rewards.append(0.8 * np.log(p) + 0.5 + noise * (0.3 * np.log(p) + 2.8) * rng.standard_normal(total))
    return np.concatenate(positions), np.concatenate(rewards)


def test_table_matches_reference_grouping():
    p, r = calibration(num_responses=60)
    table = location_table(p, r)
    expected = ref.location_table(p.tolist(), r.tolist())
    assert table.p.tolist() == pytest.approx(list(expected))
    assert table.mean.tolist() == pytest.approx([v[0] for v in expected.values()])
    assert table.std.tolist() == pytest.approx([v[1] for v in expected.values()])
    assert table.count.tolist() == [v[2] for v in expected.values()]
    assert table.p_min == p.min()


def test_locations_group_as_the_released_codes_string_keys():
    # Responses of 80 and 160 segments put p on halfway values such as 1/80 = 0.0125 (stored just above the half):
    # f"{p:.3f}" groups it as 0.013, numpy's round-half-even as 0.012, and the groups (hence the fit) differ.
    p = np.concatenate([np.arange(1, 81) / 80, np.arange(1, 161) / 160])
    r = np.random.default_rng(3).standard_normal(p.size)
    table = location_table(p, r)
    expected = ref.location_table(p.tolist(), r.tolist())
    assert table.p.tolist() == list(expected)
    assert table.count.tolist() == [v[2] for v in expected.values()]
    assert table.mean.tolist() == pytest.approx([v[0] for v in expected.values()], rel=1e-12)
    assert 0.013 in expected and 0.0125 not in expected  # the halfway case went up
    assert np.unique(np.round(p, 3)).size != len(expected) or not np.allclose(np.unique(np.round(p, 3)), list(expected))
    fitted = nz.LocationNormalizer.fit(p, r, method="ols")
    assert (fitted.w_mu, fitted.b_mu, fitted.w_sigma, fitted.b_sigma) == pytest.approx(
        ref.location_fit(p, r, "ols"), rel=1e-9, abs=1e-12)


def test_fit_needs_no_metadata():
    p, r = calibration(seed=5)
    fitted = nz.LocationNormalizer.fit(p, r, method="huber")
    assert fitted.method == "huber" and fitted.model is None and fitted.segmentation is None
    restored = nz.normalizer_from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert (restored.w_mu, restored.model) == (fitted.w_mu, None)
    assert nz.LocationNormalizer.fit(p, r, method="ols").method == "ols"


@pytest.mark.parametrize("method", ["huber", "ols"])
def test_fit_matches_sklearn_huber_and_numpy_polyfit(method):
    p, r = calibration(seed=1)
    fitted = nz.LocationNormalizer.fit(torch.tensor(p), torch.tensor(r), method=method, **META)
    w_mu, b_mu, w_sigma, b_sigma = ref.location_fit(p, r, method)
    tol = 1e-9 if method == "ols" else 1e-6
    assert (fitted.w_mu, fitted.b_mu, fitted.w_sigma, fitted.b_sigma) == pytest.approx(
        (w_mu, b_mu, w_sigma, b_sigma), rel=tol, abs=tol
    )
    # The simulated shapes are recovered, so the fit is on log p and not on p.
    assert fitted.w_mu == pytest.approx(0.8, abs=0.15) and fitted.b_sigma == pytest.approx(2.8, abs=0.3)
    table = ref.location_table(p.tolist(), r.tolist())
    x = np.log(np.array(list(table)) + 1e-10)
    means = np.array([v[0] for v in table.values()])
    assert fitted.r2_mean == pytest.approx(r2_score(means, fitted.w_mu * x + fitted.b_mu))
    assert 0.0 < fitted.r2_std <= 1.0
    assert fitted.num_samples == p.size and fitted.method == method


@given(st.integers(0, 10_000), st.sampled_from(["huber", "ols"]))
def test_apply_matches_formula_and_zeroes_non_segment_entries(seed, method):
    p, r = calibration(seed=seed % 7, num_responses=80)
    fitted = nz.LocationNormalizer.fit(p, r, method=method, **META)
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    positions = torch.rand(3, 9, generator=gen, dtype=torch.float64) * (1 - fitted.p_min) + fitted.p_min
    positions[:, ::3] = 0.0  # non-segment entries
    out = fitted(rewards, positions)
    for got, raw, loc in zip(out.flatten().tolist(), rewards.flatten().tolist(), positions.flatten().tolist()):
        if loc == 0:
            assert got == 0.0
        else:
            mean = fitted.w_mu * math.log(loc + 1e-10) + fitted.b_mu
            std = fitted.w_sigma * math.log(loc + 1e-10) + fitted.b_sigma
            assert got == pytest.approx((raw - mean) / std, rel=1e-9)


def test_positions_below_calibrated_range_are_clamped_not_extrapolated():
    w_mu, w_sigma, b_mu, b_sigma = PHI3
    phi3 = nz.LocationNormalizer(w_mu=w_mu, b_mu=b_mu, w_sigma=w_sigma, b_sigma=b_sigma, p_min=0.01, **META)
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out = phi3(rewards, torch.tensor([1e-9, 0.005, 0.01, 0.0]))
    assert torch.isfinite(out).all() and out[3] == 0.0
    assert out[0] == out[1] == out[2]
    # Published shape: later segments have higher mean and std.
    assert phi3.mean_at(1.0) > phi3.mean_at(0.1) and phi3.std_at(1.0) > phi3.std_at(0.1) > 0


def test_roundtrip_through_json_and_factory(tmp_path):
    p, r = calibration(seed=2, num_responses=50)
    fitted = nz.LocationNormalizer.fit(p, r, method="ols", **META)
    data = json.loads(json.dumps(fitted.to_dict()))
    assert data["kind"] == "location" and set(data["table"]) == {"p", "mean", "std", "count"}
    for key in ("model", "c_ent", "aggregation", "segmentation", "method", "num_samples", "r2_mean", "r2_std"):
        assert key in data
    again = nz.normalizer_from_dict(data)
    assert isinstance(again, nz.LocationNormalizer) and again.to_dict() == fitted.to_dict()
    fitted.save(tmp_path / "norm.json")
    loaded = nz.load_normalizer(tmp_path / "norm.json")
    rewards, positions = torch.randn(4), torch.tensor([0.1, 0.5, 1.0, 0.0])
    torch.testing.assert_close(loaded(rewards, positions), fitted(rewards, positions))


@pytest.mark.parametrize("kind", ["location", "global", "last_segment", "bandit", "none"])
def test_every_kind_roundtrips_and_reports_missing_keys(kind):
    p, r = calibration(seed=3, num_responses=40)
    cls = nz.NORMALIZERS[kind]
    fitted = cls.fit(p, r, **META)
    data = fitted.to_dict()
    assert nz.normalizer_from_dict(data).to_dict() == data
    for key in data:
        broken = {k: v for k, v in data.items() if k != key}
        with pytest.raises(ValueError, match=f"missing the key '{key}'"):
            nz.normalizer_from_dict(broken)


def test_scalar_normalizers_use_the_right_rewards():
    positions = np.array([0.5, 1.0, 1 / 3, 2 / 3, 1.0, 1.0])
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 10.0])
    glob = nz.GlobalNormalizer.fit(positions, rewards, **META)
    assert (glob.mean, glob.std) == pytest.approx((rewards.mean(), rewards.std()))
    last = nz.LastSegmentNormalizer.fit(positions, rewards, **META)
    assert (last.mean, last.std, last.num_samples) == pytest.approx((6.0, np.std([2.0, 6.0, 10.0]), 3))
    bandit = nz.BanditNormalizer.fit(None, torch.tensor([1.0, 3.0]), **{**META, "segmentation": "bandit"})
    assert (bandit.mean, bandit.std) == (2.0, 1.0)
    # Scalar normalizers work on [batch] sequence rewards without positions, and zero non-segment entries with them.
    assert bandit(torch.tensor([3.0, 1.0])).tolist() == [1.0, -1.0]
    assert bandit(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0])).tolist() == [1.0, 0.0]
    identity = nz.IdentityNormalizer.fit(**META)
    assert identity(torch.tensor([3.0, 5.0]), torch.tensor([0.0, 0.5])).tolist() == [0.0, 5.0]


def test_nonpositive_std_is_rejected_at_fit_and_load():
    positions = np.array([0.5, 1.0, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"Std\(p\) = .* is not positive on the calibrated range \[0.5, 1\]"):
        nz.LocationNormalizer.fit(positions, np.array([1.0, 2.0, 1.0, 2.0]), method="ols", **META)
    good = nz.LocationNormalizer(w_mu=0.0, b_mu=0.0, w_sigma=1.0, b_sigma=2.0, p_min=0.5, **META).to_dict()
    with pytest.raises(ValueError, match=r"Std\(p_min\) = -0.302585"):
        nz.normalizer_from_dict({**good, "p_min": 0.1})
    with pytest.raises(ValueError, match="a finite mean and a std > 0"):
        nz.GlobalNormalizer.fit(positions, np.ones(4), **META)


def test_fit_input_errors():
    with pytest.raises(ValueError, match=r"positions must lie in \(0, 1\]"):
        nz.LocationNormalizer.fit([0.0, 1.0], [1.0, 2.0], **META)
    with pytest.raises(ValueError, match="positions has 2 entries but rewards has 3"):
        nz.LocationNormalizer.fit([0.5, 1.0], [1.0, 2.0, 3.0], **META)
    with pytest.raises(ValueError, match="rewards contains 1 NaN or inf"):
        nz.LocationNormalizer.fit([0.5, 1.0], [1.0, float("nan")], **META)
    with pytest.raises(ValueError, match="at least 2 distinct locations"):
        nz.LocationNormalizer.fit([1.0, 1.0], [1.0, 2.0], **META)
    with pytest.raises(ValueError, match=r"fit method='lasso' is not supported; choose one of \['huber', 'ols'\]"):
        nz.LocationNormalizer.fit([0.5, 1.0], [1.0, 2.0], method="lasso", **META)
    with pytest.raises(ValueError, match="needs the segment locations"):
        nz.LocationNormalizer.fit(*calibration(num_responses=20), **META)(torch.zeros(2))
    with pytest.raises(ValueError, match=r"normalizer kind='zscore' is not supported"):
        nz.normalizer_from_dict({"kind": "zscore"})
    with pytest.raises(ValueError, match="must be a finite number"):
        nz.normalizer_from_dict({**nz.GlobalNormalizer(mean=0, std=1, num_samples=1, **META).to_dict(), "std": "1"})


def test_tiny_locations_are_dropped_with_a_warning():
    positions = np.array([0.0004, 0.5, 1.0, 0.5, 1.0])
    with pytest.warns(UserWarning, match="dropping 1 segment rewards"):
        fitted = nz.LocationNormalizer.fit(positions, np.array([9.0, 1.0, 2.0, 1.5, 3.0]), method="ols", **META)
    assert fitted.p_min == 0.5 and fitted.num_samples == 5


def test_check_compatible():
    norm = nz.GlobalNormalizer(mean=0.0, std=1.0, num_samples=3, **META)
    norm.check_compatible(model="tiny", c_ent=1.75, aggregation="mean", segmentation="entropy")
    with pytest.raises(ValueError, match=r"c_ent: normalizer has 1.75, run uses 2.0; aggregation: .*'sum'"):
        norm.check_compatible(c_ent=2.0, aggregation="sum")
