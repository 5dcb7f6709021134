"""Tensor and pipeline parallelism: the tokens generated at TP=2 and at PP=2 (two spawned gloo ranks) equal the
single-process run's, and every rank of the model-parallel group holds the same tokens."""
import pytest
from gen_scenarios import tensor_then_pipeline_parallel

from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(dense_run):
    ranks = run_distributed(tensor_then_pipeline_parallel, 2, dense_run["state_dict"])
    return dense_run, ranks


def test_tp2_greedy_equals_tp1(runs):
    dense, ranks = runs
    for rank in ranks:
        assert rank["tp2_greedy"] == dense["reference"]
        assert rank["tp2_full_forward_greedy"] == dense["reference"]


def test_pp2_greedy_equals_pp1(runs):
    dense, ranks = runs
    for rank in ranks:
        assert rank["pp2_greedy"] == dense["reference"]
        assert rank["pp2_full_forward_greedy"] == dense["reference"]


def test_every_rank_holds_the_same_sampled_tokens(runs):
    dense, ranks = runs
    assert ranks[0]["tp2_sampled"] == ranks[1]["tp2_sampled"]
    assert ranks[0]["pp2_sampled"] == ranks[1]["pp2_sampled"]
    # Pipeline stages run the same layers on the same inputs as one process: the draws match too.
    assert ranks[0]["pp2_sampled"] == dense["sampled"]
