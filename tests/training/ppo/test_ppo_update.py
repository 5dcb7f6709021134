"""The update's loss functions and batching: the policy and value losses of a micro-batch, computed from model
outputs the way the update computes them, equal the per-token reference; train batches cover every rollout once per
epoch, in an order fixed by (seed, step, epoch)."""
from __future__ import annotations

import pytest
import torch

import ppo_reference as ref
from megaseg.data.batch import SequenceBatch
from megaseg.training.ppo.update import PPOMicroBatch, TrainBatch, actor_loss_fn, critic_loss_fn, epoch_permutation


def _micro_batch(generator: torch.Generator, rows: int = 3, width: int = 9) -> PPOMicroBatch:
    input_ids = torch.randint(0, 50, (rows, width), generator=generator)
    action_mask = torch.zeros(rows, width, dtype=torch.bool)
    for row, (start, end) in enumerate([(3, 9), (2, 6), (5, 6)][:rows]):
        action_mask[row, start:end] = True
    noise = lambda: torch.randn(rows, width, generator=generator)  # noqa: E731
    return PPOMicroBatch(input_ids=input_ids, position_ids=torch.arange(width).expand(rows, width),
                         action_mask=action_mask, old_log_probs=-3 + 0.3 * noise(), advantages=noise(),
                         old_values=noise(), returns=noise())


def _alone(batch: PPOMicroBatch) -> TrainBatch:
    """The micro-batch as a whole train batch on one rank (its own counts: loss scale 1)."""
    return TrainBatch(micro_batches=[batch], num_tokens=float(batch.action_mask.sum()),
                      num_sequences=float(batch.input_ids.shape[0]), dp_size=1)


def test_policy_loss_from_logits_matches_reference():
    generator = torch.Generator().manual_seed(0)
    batch = _micro_batch(generator)
    logits = torch.randn(3, 9, 50, generator=generator, dtype=torch.float32)
    loss, metrics = actor_loss_fn(None, 0.2, "token-mean", _alone(batch))(logits, batch)
    expected = []
    for row in range(3):
        actions = torch.nonzero(batch.action_mask[row]).flatten().tolist()
        # Token j is chosen by the distribution at j - 1.
        log_probs = [0.0] * 9
        for j in actions:
            log_probs[j] = ref.log_softmax_at(logits[row, j - 1].double().tolist(), int(batch.input_ids[row, j]))
        expected.append((ref.policy_loss(log_probs, batch.old_log_probs[row].tolist(),
                                         batch.advantages[row].tolist(), actions, 0.2), len(actions)))
    # A token mean over the micro-batch: rows weigh by their number of actions.
    token_mean = sum(value * count for value, count in expected) / sum(count for _, count in expected)
    assert float(loss) == pytest.approx(token_mean, rel=1e-5, abs=1e-6)
    assert float(metrics["stats"][3]) == 1.0


def test_value_loss_from_head_matches_reference():
    generator = torch.Generator().manual_seed(1)
    batch = _micro_batch(generator)
    head = torch.randn(3, 9, generator=generator)
    loss, _ = critic_loss_fn(0.25, "token-mean", _alone(batch))(head, batch)
    total, count = 0.0, 0
    for row in range(3):
        actions = torch.nonzero(batch.action_mask[row]).flatten().tolist()
        values = [0.0] + head[row, :-1].tolist()  # V(state before token j) = head at j - 1
        total += ref.value_loss(values, batch.old_values[row].tolist(), batch.returns[row].tolist(), actions,
                                0.25) * len(actions)
        count += len(actions)
    assert float(loss) == pytest.approx(total / count, rel=1e-5, abs=1e-6)


def test_policy_gradient_flows_to_the_logits_that_chose_the_actions():
    generator = torch.Generator().manual_seed(2)
    batch = _micro_batch(generator)
    logits = torch.randn(3, 9, 50, generator=generator, requires_grad=True)
    loss, _ = actor_loss_fn(None, 0.2, "token-mean", _alone(batch))(logits, batch)
    loss.backward()
    used = torch.zeros(3, 9, dtype=torch.bool)
    used[:, :-1] = batch.action_mask[:, 1:]
    assert logits.grad[used].abs().sum() > 0
    assert not logits.grad[~used].any()


def test_train_batches_cover_every_row_once_per_epoch():
    from megaseg.training.ppo.experience import Experience
    from megaseg.training.ppo.update import train_batches

    rows, width = 8, 12
    attention = torch.zeros(rows, width, dtype=torch.bool)
    lengths = [5, 12, 7, 9, 3, 11, 6, 8]
    for row, length in enumerate(lengths):
        attention[row, :length] = True
    response = attention.clone()
    response[:, :2] = False
    ids = torch.arange(rows)[:, None].expand(rows, width).contiguous()  # row index as the token id
    zeros = torch.zeros(rows, width)
    sequences = SequenceBatch(ids, attention, response, torch.zeros_like(attention), ids * 0)
    floats = ("log_probs", "ref_log_probs", "action_entropy", "ref_entropy", "values", "positions", "raw_rewards",
              "normalized_rewards", "token_rewards", "kl", "rewards", "advantages", "returns")
    experience = Experience(sequences=sequences, action_mask=response, segment_ends=response, reward_ends=response,
                            **{name: zeros for name in floats})
    batches = train_batches(experience, rows_per_step=4, micro_batch_size=2, num_epochs=2, seed=5, step=3,
                            parallel_ctx=None)
    steps = [batch.micro_batches for batch in batches]
    assert len(steps) == 4 and all(len(step) == 2 for step in steps)
    for batch, step in zip(batches, steps):  # the token count of every train batch, for the loss reduction
        assert batch.num_tokens == sum(float(mb.action_mask.sum()) for mb in step) and batch.num_sequences == 4
    for epoch in range(2):
        seen = sorted(int(mb.input_ids[i, 0]) for step in steps[2 * epoch:2 * epoch + 2] for mb in step
                      for i in range(2))
        assert seen == list(range(rows))
    for step in steps:
        step_rows = [int(mb.input_ids[i, 0]) for mb in step for i in range(2)]
        assert all(mb.input_ids.shape[1] == max(lengths[r] for r in step_rows) for mb in step)
    assert torch.equal(epoch_permutation(8, 5, 3, 0), epoch_permutation(8, 5, 3, 0))
    assert not torch.equal(epoch_permutation(8, 5, 3, 0), epoch_permutation(8, 5, 3, 1))
    with pytest.raises(ValueError, match="train batches"):
        train_batches(experience, rows_per_step=3, micro_batch_size=1, num_epochs=1, seed=0, step=0,
                      parallel_ctx=None)
