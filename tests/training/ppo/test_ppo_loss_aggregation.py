"""ppo.loss_aggregation reduces over the whole train batch: at DP=2 with 2 micro-batches per rank, the gradients of
the actor's and the critic's losses equal those of the same reduction over all 8 rows computed densely in one
process (plain autograd, no DDP, no pipeline schedule), for token-mean, seq-mean-token-mean and seq-mean-token-sum.

The rows have 1 to 8 actions, so the three reductions weigh them differently and a per-micro-batch mean (what a
naive implementation does) would give other gradients."""
from __future__ import annotations

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

from ppo_test_setup import tiny_config

pytestmark = pytest.mark.distributed

ROWS, WIDTH = 8, 14
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _global_batch():
    """Every row's tensors, the same on every rank: prompts of 3-5 tokens, then 1..8 actions."""
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(2, 128, (ROWS, WIDTH), generator=gen)
    actions = torch.zeros(ROWS, WIDTH, dtype=torch.bool)
    for row in range(ROWS):
        start = 3 + row % 3
        actions[row, start:start + row + 1] = True
    attention = actions.clone()
    attention[:, :3] = True
    attention |= torch.arange(WIDTH)[None] < actions.int().argmax(dim=1, keepdim=True)
    floats = {name: torch.randn(ROWS, WIDTH, generator=gen) for name in ("advantages", "values", "returns")}
    floats["log_probs"] = -3.0 + 0.3 * torch.randn(ROWS, WIDTH, generator=gen)
    return input_ids, attention, actions, floats


def _rank_experience(rows: slice):
    from megaseg.data.batch import SequenceBatch
    from megaseg.training.ppo.experience import Experience

    input_ids, attention, actions, floats = _global_batch()
    sequences = SequenceBatch(input_ids[rows], attention[rows], actions[rows], torch.zeros_like(actions[rows]),
                              torch.arange(WIDTH).expand(rows.stop - rows.start, WIDTH).contiguous())
    zeros = torch.zeros(rows.stop - rows.start, WIDTH)
    names = ("ref_log_probs", "action_entropy", "ref_entropy", "positions", "raw_rewards", "normalized_rewards",
             "token_rewards", "kl", "rewards")
    return Experience(sequences=sequences, action_mask=actions[rows], segment_ends=actions[rows],
                      reward_ends=actions[rows], log_probs=floats["log_probs"][rows],
                      advantages=floats["advantages"][rows], values=floats["values"][rows],
                      returns=floats["returns"][rows], **{name: zeros for name in names})


def _dense_gradients(model, loss_of_outputs) -> dict[str, torch.Tensor]:
    input_ids, _, _, _ = _global_batch()
    model.zero_grad()
    output = model(input_ids, torch.arange(WIDTH).expand(ROWS, WIDTH), None)
    loss_of_outputs(output).backward()
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


def _compare(rank, world_size):
    from megaseg.algorithms.ppo import policy_loss, value_loss
    from megaseg.config.training import OptimizerConfig
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.inference import next_token_log_probs, shift_right
    from megaseg.models.pipeline import forward_backward
    from megaseg.models.scalar_head import build_critic
    from megaseg.parallel import initialize_parallel
    from megaseg.training.common.optimizer import setup_training
    from megaseg.training.ppo.update import actor_loss_fn, critic_loss_fn, train_batches

    config = tiny_config()
    ctx = initialize_parallel(config.parallel, config.seed)
    assert ctx.dp_size == 2
    _, _, actions, floats = _global_batch()
    results = {}
    builders = {"actor": lambda: build_gpt_model(config.model, config.parallel),
                "critic": lambda: build_critic(config.model, config.parallel, seed=config.seed)}
    for role, build in builders.items():
        for how in AGGREGATIONS:
            torch.manual_seed(0)
            dense = build()
            torch.manual_seed(0)
            trained = build()
            trained.load_state_dict(dense.state_dict())
            if role == "actor":
                def dense_loss(logits, how=how):
                    input_ids = _global_batch()[0]
                    logp = next_token_log_probs(logits, input_ids, None)
                    return policy_loss(logp, floats["log_probs"], floats["advantages"], actions, 0.2,
                                       loss_aggregation=how)[0]
            else:
                def dense_loss(head, how=how):
                    return value_loss(shift_right(head.float()), floats["values"], floats["returns"], actions, 0.25,
                                      loss_aggregation=how)[0]
            expected = _dense_gradients(dense, dense_loss)
            setup = setup_training(trained, OptimizerConfig(lr=1e-3, warmup_ratio=0.0), 1)
            rows = slice(4 * ctx.dp_rank, 4 * ctx.dp_rank + 4)
            (batch,) = train_batches(_rank_experience(rows), rows_per_step=4, micro_batch_size=2, num_epochs=1,
                                     seed=1, step=0, parallel_ctx=ctx)
            loss_fn = (actor_loss_fn(None, 0.2, how, batch) if role == "actor"
                       else critic_loss_fn(0.25, how, batch))
            setup.zero_grads()
            outputs = forward_backward(setup.model, batch.micro_batches, loss_fn)
            got = {name: param.main_grad.detach().clone() for name, param in setup.model.module.named_parameters()
                   if name in expected}
            logged = sum(float(output["stats"][0]) for output in outputs)  # this rank's share of the loss
            results[(role, how)] = (got, expected, logged, float(dense_loss_value(dense, dense_loss)))
    return results


def dense_loss_value(model, loss_of_outputs) -> torch.Tensor:
    input_ids, _, _, _ = _global_batch()
    with torch.no_grad():
        return loss_of_outputs(model(input_ids, torch.arange(WIDTH).expand(ROWS, WIDTH), None))


@pytest.fixture(scope="module")
def compared():
    return run_distributed(_compare, 2, timeout=400)


@pytest.mark.parametrize("role", ["actor", "critic"])
@pytest.mark.parametrize("how", AGGREGATIONS)
def test_data_parallel_micro_batched_gradients_equal_the_dense_reduction(compared, role, how):
    for rank_results in compared:
        got, expected, _, _ = rank_results[(role, how)]
        assert got.keys() == expected.keys() and expected
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=f"{role} {how} {name}")
    # The logged loss: the two ranks' shares add up to the dense loss of the whole train batch.
    shares = sum(rank_results[(role, how)][2] for rank_results in compared)
    assert shares == pytest.approx(compared[0][(role, how)][3], rel=1e-5)


def test_the_reductions_differ_on_these_rows(compared):
    losses = {how: compared[0][("actor", how)][3] for how in AGGREGATIONS}
    assert len({round(value, 6) for value in losses.values()}) == 3, losses
