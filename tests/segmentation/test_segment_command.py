"""`megaseg segment --config ...` (a real CLI process): segments the train and held-out split of a preference file
with a saved SFT checkpoint, picks c_ent for a target mean segment length, and the cut it then makes has exactly the
mean length the picker predicted."""
import json

import pytest
import yaml

from scoring_test_helpers import command_fixture, last_json_line, run_cli

pytestmark = pytest.mark.distributed

TARGET = 4.0


def test_segment_command_picks_a_cutoff_and_fills_the_cache(tmp_path_factory, tmp_path):
    root, _ = command_fixture(tmp_path_factory.getbasetemp())
    # The reward model's saved config holds everything `segment` needs: model (tokenizer, SFT checkpoint) and data.
    result = run_cli("segment", "--config", str(root / "rm" / "config.yaml"),
                     f"segmentation.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.25",
                     f"segmentation.target_mean_segment_length={TARGET}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    train, held_out = summary["train"], summary["eval"]
    assert train["num_pairs"] + held_out["num_pairs"] == 14
    choice = train["cutoff_choice"]
    assert "entropy cutoff sweep" in result.stdout
    assert f"picked segmentation.entropy_cutoff={choice['entropy_cutoff']}" in result.stdout
    # The picker's prediction (from the cached entropies) is what the cut then gives.
    assert train["entropy_cutoff"] == choice["entropy_cutoff"] == held_out["entropy_cutoff"]
    assert train["mean_segment_length"] == pytest.approx(choice["mean_segment_length"])
    assert abs(train["mean_segment_length"] - TARGET) < 1.0
    saved = yaml.safe_load(open(f"{train['cache_entry']}/config.yaml"))
    assert saved["segmentation"]["entropy_cutoff"] == choice["entropy_cutoff"]
    assert saved["segmentation"]["target_mean_segment_length"] is None
    complete = json.loads(open(f"{train['cache_entry']}/complete.json").read())
    assert complete["segments_per_response"] == pytest.approx(train["segments_per_response"])
