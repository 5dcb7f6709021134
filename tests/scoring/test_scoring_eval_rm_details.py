"""`megaseg eval-rm` per subset (RewardBench's `subset` field, conversational and flat records) with Wilson
intervals, and `--details FILE`: every pair's segment rewards, locations p, token spans and texts equal the slow
reference (one sequence per forward, segment ends by a loop over the method's rule)."""
import json

import numpy as np
import pytest

from megaseg.scoring.evaluate import wilson_interval
from scoring_test_helpers import command_fixture, last_json_line, run_cli

pytestmark = pytest.mark.distributed
SUBSETS = ("chat", "safety", "reasoning")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return command_fixture(tmp_path_factory.getbasetemp())


def _with_subsets(source, target):
    """The fixture's pairs with a RewardBench-style subset per record (pair i -> SUBSETS[i % 3])."""
    lines = source.read_text().splitlines()
    records = [dict(json.loads(line), subset=SUBSETS[i % 3]) for i, line in enumerate(lines)]
    target.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_wilson_interval_solves_the_score_equation():
    # The Wilson bounds are the two roots p of (phat - p)^2 = z^2 p (1 - p) / n.
    z = 1.959963984540054
    for correct, total in ((7, 14), (0, 5), (5, 5), (3, 40)):
        low, high = wilson_interval(correct, total)
        phat = correct / total
        for p in (low, high):
            assert (phat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / total, abs=1e-12)
        assert low <= phat <= high
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_subsets_and_details_equal_the_slow_reference(fixture, tmp_path):
    root, reference = fixture
    data = tmp_path / "rewardbench_like.jsonl"
    _with_subsets(root / "pairs.jsonl", data)
    details = tmp_path / "details" / "pairs.jsonl"
    result = run_cli("eval-rm", "--ckpt", str(root / "rm"), "--data", str(data), "--details", str(details))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = last_json_line(result.stdout)
    n = reference["num_pairs"]
    chosen = np.array(reference["sequence_rewards"][:n])
    rejected = np.array(reference["sequence_rewards"][n:])
    correct = chosen > rejected
    assert metrics["accuracy_ci95"] == pytest.approx(list(wilson_interval(int(correct.sum()), n)))
    assert list(metrics["subsets"]) == list(SUBSETS)
    for k, name in enumerate(SUBSETS):
        mine = correct[k::3]
        got = metrics["subsets"][name]
        assert got["num_pairs"] == len(mine)
        assert got["accuracy"] == pytest.approx(mine.mean())
        assert got["accuracy_ci95"] == pytest.approx(list(wilson_interval(int(mine.sum()), len(mine))))
    assert metrics["details"] == str(details)

    records = [json.loads(line) for line in details.read_text().splitlines()]
    assert len(records) == n
    lines = (root / "pairs.jsonl").read_text().splitlines()
    for i, record in enumerate(records):
        assert record["subset"] == SUBSETS[i % 3]
        assert record["margin"] == pytest.approx(chosen[i] - rejected[i], rel=1e-4, abs=1e-6)
        assert record["correct"] == bool(correct[i])
        for side, offset in (("chosen", 0), ("rejected", n)):
            got = record[side]
            want_rewards, want_p = reference["rewards"][offset + i], reference["positions"][offset + i]
            scored = [s for s in got["segments"] if s["raw"] is not None]
            # abs 1e-5: rewards of this model reach ~6, whose fp32 rounding (~1e-6 after a few layers) differs between
            # one sequence per forward and the packed forward (other matmul shapes); a small reward beside them
            # carries that absolute error.
            assert [s["raw"] for s in scored] == pytest.approx(want_rewards, rel=1e-4, abs=1e-5)
            assert [s["p"] for s in scored] == pytest.approx(want_p)
            assert got["reward"] == pytest.approx(np.mean(want_rewards), rel=1e-4, abs=1e-6)
            # The spans tile the response: contiguous, in order, all of its tokens.
            starts = [s["start"] for s in got["segments"]]
            counts = [s["num_tokens"] for s in got["segments"]]
            assert starts == [sum(counts[:k]) for k in range(len(counts))]
            assert sum(counts) == got["num_tokens"]
            # The scored tokens end where the reference's last segment ends (the EOS, when present, follows alone).
            assert sum(s["num_tokens"] for s in scored) == reference["covered"][offset + i]
            assert "".join(s["text"] for s in got["segments"]) == got["text"]
            # ... and it is this pair's response (possibly cut at data.max_length).
            original = json.loads(lines[i])[side][-1]["content"]
            assert got["text"].replace("<|im_end|>", "").strip()[:30] in original


def test_flat_rewardbench_records(fixture, tmp_path):
    """RewardBench's own flat layout (prompt / chosen / rejected strings + subset): per-subset accuracies are the
    means of the per-pair outcomes --details reports."""
    root, _ = fixture
    data = tmp_path / "flat.jsonl"
    rows = []
    for i, line in enumerate((root / "pairs.jsonl").read_text().splitlines()[:9]):
        record = json.loads(line)
        rows.append({"prompt": record["chosen"][-2]["content"], "chosen": record["chosen"][-1]["content"],
                     "rejected": record["rejected"][-1]["content"], "subset": SUBSETS[i % 3], "id": i})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    details = tmp_path / "details.jsonl"
    result = run_cli("eval-rm", "--ckpt", str(root / "rm"), "--data", str(data), "--details", str(details))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = last_json_line(result.stdout)
    records = [json.loads(line) for line in details.read_text().splitlines()]
    assert [r["id"] for r in records] == [str(i) for i in range(9)]
    for name in SUBSETS:
        outcomes = [r["correct"] for r in records if r["subset"] == name]
        assert metrics["subsets"][name]["num_pairs"] == len(outcomes) == 3
        assert metrics["subsets"][name]["accuracy"] == pytest.approx(np.mean(outcomes))
