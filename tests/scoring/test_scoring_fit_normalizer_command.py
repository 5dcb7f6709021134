"""`megaseg fit-normalizer` (a real CLI process) on a tiny reward model: the written coefficients equal an independent
scikit-learn / numpy fit on the slow reference's segment rewards (Huber and OLS, and the global ablation), the file
loads as a normalizer and carries its metadata, the plot is written; bad --method and empty data are clear errors."""
import json

import numpy as np
import pytest
from sklearn.linear_model import HuberRegressor

from megaseg.algorithms.normalizer import LocationNormalizer, load_normalizer
from megaseg.cli import main
from scoring_test_helpers import command_fixture, last_json_line, run_cli

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return command_fixture(tmp_path_factory.getbasetemp())


def _grouped(reference, num_pairs=None):
    """Per distinct p (rounded to 3 decimals): population mean and std of the segment rewards, by a dict loop."""
    n = reference["num_pairs"]
    rows = list(range(n)) if num_pairs is None else list(range(num_pairs))
    rows += [n + i for i in rows]  # chosen AND rejected
    groups = {}
    for row in rows:
        for p, r in zip(reference["positions"][row], reference["rewards"][row]):
            groups.setdefault(round(p, 3), []).append(r)
    ps = np.array(sorted(groups))
    return ps, np.array([np.mean(groups[p]) for p in ps]), np.array([np.std(groups[p]) for p in ps])


def _r2(y, fitted):
    return 1 - np.sum((y - fitted) ** 2) / np.sum((y - y.mean()) ** 2)


def test_huber_fit_equals_scikit_learn_on_the_reference_rewards(fixture):
    root, reference = fixture
    result = run_cli("fit-normalizer", "--ckpt", str(root / "rm"), "--data", str(root / "pairs.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    p, mean, std = _grouped(reference)
    x = np.log(p + 1e-10)[:, None]
    expected = {}
    for name, y in (("mu", mean), ("sigma", std)):
        huber = HuberRegressor(epsilon=1.35).fit(x, y)
        expected[f"w_{name}"], expected[f"b_{name}"] = huber.coef_[0], huber.intercept_
        expected[f"r2_{'mean' if name == 'mu' else 'std'}"] = _r2(y, huber.predict(x))
    document = json.loads((root / "rm" / "normalizer.json").read_text())
    for key, value in expected.items():
        assert document[key] == pytest.approx(value, rel=2e-3, abs=2e-4), key
        assert summary[key] == document[key]
    normalizer = load_normalizer(root / "rm" / "normalizer.json")
    assert isinstance(normalizer, LocationNormalizer) and normalizer.method == "huber"
    assert normalizer.model == "tiny-test-rm" and normalizer.segmentation == "entropy"
    assert normalizer.c_ent == pytest.approx(reference["cutoff"]) and normalizer.aggregation == "mean"
    assert normalizer.num_samples == sum(reference["segment_counts"])
    assert document["calibration"]["num_pairs"] == reference["num_pairs"]
    assert document["calibration"]["reward_model_step"] == 3
    np.testing.assert_allclose(document["table"]["p"], p)
    np.testing.assert_allclose(document["table"]["mean"], mean, rtol=1e-4, atol=1e-5)
    png = (root / "rm" / "normalizer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert summary["plot"] == str(root / "rm" / "normalizer.png")
    assert (root / "rm" / "normalizer_config.yaml").is_file()


@pytest.mark.slow
def test_ols_on_a_subset_and_the_global_ablation(fixture):
    root, reference = fixture
    result = run_cli("fit-normalizer", "--ckpt", str(root / "rm"), "--data", str(root / "pairs.jsonl"),
                     "--method", "ols", "--num-samples", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    p, mean, std = _grouped(reference, num_pairs=6)
    x = np.log(p + 1e-10)
    for name, y in (("mu", mean), ("sigma", std)):
        slope, intercept = np.polyfit(x, y, 1)
        assert summary[f"w_{name}"] == pytest.approx(slope, rel=1e-4, abs=1e-5)
        assert summary[f"b_{name}"] == pytest.approx(intercept, rel=1e-4, abs=1e-5)
    assert summary["num_pairs"] == 6 and summary["method"] == "ols"

    # A second normalizer of the same reward model goes where normalizer.path says (PPO reads it there), named after
    # it, and leaves <rm>/normalizer.json alone.
    second = root / "ablations" / "global.json"
    result = run_cli("fit-normalizer", "--ckpt", str(root / "rm"), "normalizer.kind=global",
                     f"normalizer.path={second}")
    assert result.returncode == 0, result.stderr[-3000:]  # no --data: the file the reward model was trained on
    summary = last_json_line(result.stdout)
    every_reward = np.concatenate([np.asarray(r) for r in reference["rewards"]])
    assert summary["kind"] == "global" and summary["normalizer"] == str(second)
    assert summary["mean"] == pytest.approx(every_reward.mean(), rel=1e-4, abs=1e-5)
    assert summary["std"] == pytest.approx(every_reward.std(), rel=1e-4, abs=1e-5)
    assert json.loads(second.read_text())["kind"] == "global"
    assert (root / "ablations" / "global.png").is_file() and (root / "ablations" / "global_config.yaml").is_file()
    assert json.loads((root / "rm" / "normalizer.json").read_text())["method"] == "ols"


def test_bad_method_and_empty_calibration_data(fixture, tmp_path, capsys):
    """Caught before any process group or model is created, so the CLI runs in this process."""
    root, _ = fixture
    assert main(["fit-normalizer", "--ckpt", str(root / "rm"), "--method", "lasso"]) == 2
    assert "normalizer.method='lasso' is not allowed; choose one of ['huber', 'ols']" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    written = root / "rm" / "normalizer.json"
    before = written.read_bytes() if written.exists() else None
    assert main(["fit-normalizer", "--ckpt", str(root / "rm"), "--data", str(empty)]) == 2
    assert f"{empty} holds no usable preference pairs" in capsys.readouterr().err
    assert (written.read_bytes() if written.exists() else None) == before  # nothing written on failure
    assert main(["fit-normalizer", "--ckpt", str(tmp_path), "--data", str(empty)]) == 2
    assert "is not a megaseg reward model" in capsys.readouterr().err
