"""train-rm's plain-python parts: batch arithmetic, micro-batch layout, and the errors users get for bad settings."""
import dataclasses

import pytest

from megaseg.integrity import write_manifest
import torch

from megaseg.config import MegasegConfig, load_config, save_config
from megaseg.data.encoding import TokenizedPair, TokenizedSequence
from megaseg.checkpoint.resume import CHECKPOINTS_DIR, resume_latest
from megaseg.training.common.loop import plan_steps
from megaseg.training.reward_model.batches import collate_step
from megaseg.training.reward_model.data import SegmentedPair, load_reward_model_data
from megaseg.training.reward_model.loss import STAT_NAMES, PairMetrics, batch_statistics
from megaseg.training.reward_model.trainer import RewardModelTrainer


def _pair(prompt_length: int, chosen_length: int, rejected_length: int, name: str = "p") -> TokenizedPair:
    prompt = tuple(range(10, 10 + prompt_length))
    return TokenizedPair(id=name, source=f"pairs.jsonl:{name}",
                         chosen=TokenizedSequence(prompt, tuple(range(50, 50 + chosen_length)), True),
                         rejected=TokenizedSequence(prompt, tuple(range(80, 80 + rejected_length)), False))


def _plan(**sizes):
    return plan_steps(section="rm", **sizes)


def test_batch_plan_counts_whole_global_batches():
    plan = _plan(num_samples=103, global_batch_size=8, micro_batch_size=2, dp_size=2, epochs=3, max_steps=None)
    # 103 -> 102 usable over 2 ranks (drop_last) -> 12 full global batches per epoch.
    assert (plan.steps_per_epoch, plan.total_steps, plan.per_rank, plan.num_micro_batches) == (12, 36, 4, 2)
    assert _plan(num_samples=103, global_batch_size=8, micro_batch_size=2, dp_size=2, epochs=3,
                 max_steps=5).total_steps == 5


def test_batch_plan_errors_name_the_settings():
    with pytest.raises(ValueError, match=r"rm.global_batch_size=12 must be a multiple of .* 2 x micro-batch size 4"):
        _plan(num_samples=100, global_batch_size=12, micro_batch_size=4, dp_size=2, epochs=1, max_steps=None)
    with pytest.raises(ValueError, match=r"7 training pairs are fewer than one global batch \(rm.global_batch_size=8\)"):
        _plan(num_samples=7, global_batch_size=8, micro_batch_size=2, dp_size=1, epochs=1, max_steps=None)


def test_micro_batches_put_chosen_then_rejected_rows_and_mark_the_ends():
    first = SegmentedPair(_pair(3, 4, 2, "a"), chosen_ends=(4, 5), rejected_ends=(4,))
    second = SegmentedPair(_pair(2, 5, 3, "b"), chosen_ends=(5,), rejected_ends=(2, 4))
    (batch,) = collate_step([first, second], micro_batch_size=2, pad_id=0)
    assert batch.input_ids.shape == (4, 8)  # longest row 7 tokens, rounded up to a multiple of 8
    assert batch.num_pairs == 2 and batch.num_tokens == 7 + 5 + 7 + 5
    expected_ends = {0: [4, 5], 1: [5], 2: [4], 3: [2, 4]}  # rows: chosen a, chosen b, rejected a, rejected b
    for row, positions in expected_ends.items():
        assert torch.nonzero(batch.segment_ends[row]).flatten().tolist() == positions
    assert batch.input_ids[2, 3:5].tolist() == [80, 81] and batch.input_ids[2, 5:].tolist() == [0, 0, 0]
    assert batch.response_mask[1].tolist() == [False, False, True, True, True, True, True, False]


def test_segment_ends_outside_the_response_name_the_record():
    with pytest.raises(ValueError, match=r"pairs.jsonl:x: chosen segment ends \[2\] must be .* \[3, 7\)"):
        SegmentedPair(_pair(3, 4, 2, "x"), chosen_ends=(2,), rejected_ends=(4,))


def test_statistics_are_sums_that_average_per_pair():
    (batch,) = collate_step([SegmentedPair(_pair(3, 4, 2), (4, 5), (4,)),
                             SegmentedPair(_pair(2, 5, 3), (5,), (2, 4))], micro_batch_size=2, pad_id=0)
    stats = batch_statistics(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.5]), batch)
    named = dict(zip(STAT_NAMES, stats.tolist()))
    assert named["num_segments"] == 6 and named["num_segment_tokens"] == 3 + 4 + 2 + 3
    metrics = PairMetrics.from_statistics(stats)
    assert metrics.accuracy == 0.5 and metrics.segments_per_response == 1.5 and metrics.mean_segment_length == 2.0
    assert metrics.loss == pytest.approx(float(-(torch.nn.functional.logsigmoid(torch.tensor([1.0, -1.5]))).mean()))


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    config = load_config(None, [f"logging.out_dir={tmp_path}", "rm.global_batch_size=16"])
    step_dir = tmp_path / CHECKPOINTS_DIR / "step_000002"
    step_dir.mkdir(parents=True)
    save_config(dataclasses.replace(config, rm=dataclasses.replace(config.rm, global_batch_size=32)), step_dir)
    write_manifest(step_dir)  # an intact step directory, as save_training_checkpoint leaves it
    with pytest.raises(ValueError, match=r"cannot resume from .*step_000002: rm.global_batch_size: checkpoint 32, "
                                         r"now 16.*checkpoint.resume=false"):
        resume_latest(config, sections=RewardModelTrainer.config_sections, models={})


def test_missing_tokenizer_is_named():
    with pytest.raises(ValueError, match="model.tokenizer is not set"):
        load_reward_model_data(MegasegConfig(), parallel_ctx=None)
