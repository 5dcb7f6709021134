"""DPO: the loss of a batch equals a hand computation from the two models' dense logits, and a training step at TP=2
equals the step at TP=1 (same loss, statistics and updated policy)."""
from __future__ import annotations

import math

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

from ppo_test_setup import EOS_ID, PAD_ID, tiny_config

pytestmark = pytest.mark.distributed

BETA = 0.1


def _pairs():
    from megaseg.data.encoding import TokenizedPair, TokenizedSequence

    generator = torch.Generator().manual_seed(4)

    def ids(n):
        return tuple(torch.randint(2, 128, (n,), generator=generator).tolist())

    pairs = []
    for index, (prompt, chosen, rejected) in enumerate([(4, 5, 3), (6, 2, 7), (3, 6, 6), (5, 4, 1)]):
        shared = ids(prompt)
        pairs.append(TokenizedPair(f"p{index}", f"test:{index}", TokenizedSequence(shared, ids(chosen) + (EOS_ID,), True),
                                   TokenizedSequence(shared, ids(rejected) + (EOS_ID,), True)))
    return pairs


def _step(rank, world_size, tp):
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel
    from megaseg.checkpoint.step_dirs import TrainingProgress
    from megaseg.training.common.optimizer import setup_training
    from megaseg.training.dpo.step import add_reference_log_probs, collate_step, dpo_loss_fn
    from megaseg.training.dpo.trainer import DPOTrainer
    from megaseg.training.ppo.experience import policy_log_probs_and_entropy

    config = tiny_config(f"parallel.tensor_model_parallel_size={tp}", "dpo.optimizer.lr=1e-2",
                         "dpo.optimizer.warmup_ratio=0", "dpo.global_batch_size=4", "dpo.micro_batch_size=2")
    ctx = initialize_parallel(config.parallel, seed=17)
    policy, reference = build_gpt_model(config.model, config.parallel), build_gpt_model(config.model, config.parallel)
    reference.eval()
    pairs = _pairs()
    out = {}
    if tp == 1:
        # The loss function on one micro-batch of all 4 pairs, against the dense logits (returned for the hand check).
        batch = add_reference_log_probs(reference, collate_step(pairs, 4, PAD_ID, ctx.device), ctx)[0]
        with torch.no_grad():
            logits = policy(batch.input_ids, batch.position_ids, None)
            loss, stats = dpo_loss_fn(BETA, 0.0, None)(logits, batch)
            out.update(loss=float(loss), stats=stats["stats"], input_ids=batch.input_ids,
                       response_mask=batch.response_mask, policy_logits=logits,
                       reference_logits=reference(batch.input_ids, batch.position_ids, None))
    setup = setup_training(policy, config.dpo.optimizer, total_steps=1)
    trainer = DPOTrainer(config, ctx, policy=setup, reference=reference, train_pairs=pairs, eval_pairs=[],
                         pad_token_id=PAD_ID, plan=DPOTrainer.plan(config, len(pairs), ctx.dp_size))
    report, _ = trainer.train_one_step(TrainingProgress())
    out["metrics"] = dict(report.train)
    probe = collate_step(pairs[:2], 2, PAD_ID, ctx.device)[0]
    from megaseg.data.batch import SequenceBatch
    attention = probe.input_ids != PAD_ID
    sequences = SequenceBatch(probe.input_ids, attention, probe.response_mask, torch.zeros_like(attention),
                              probe.position_ids)
    out["probe"] = policy_log_probs_and_entropy(setup.model, sequences, ctx, micro_batch_size=4).log_probs
    return out


def _sequence_log_prob(logits: torch.Tensor, ids: list[int], response: list[bool]) -> float:
    total = 0.0
    for j, is_response in enumerate(response):
        if is_response:
            row = logits[j - 1].double().tolist()
            top = max(row)
            total += row[ids[j]] - top - math.log(sum(math.exp(x - top) for x in row))
    return total


@pytest.fixture(scope="module")
def tp1():
    (value,) = run_distributed(_step, 1, 1, timeout=400)
    return value


def test_dpo_loss_equals_a_hand_computation(tp1):
    m = 4
    logps = {}
    for name in ("policy", "reference"):
        logps[name] = [_sequence_log_prob(tp1[f"{name}_logits"][row], tp1["input_ids"][row].tolist(),
                                          tp1["response_mask"][row].tolist()) for row in range(2 * m)]
    losses, correct = [], 0
    for i in range(m):
        margin = BETA * ((logps["policy"][i] - logps["reference"][i])
                         - (logps["policy"][m + i] - logps["reference"][m + i]))
        losses.append(math.log1p(math.exp(-margin)))  # -log sigmoid(margin)
        correct += (logps["policy"][i] - logps["reference"][i]) > (logps["policy"][m + i] - logps["reference"][m + i])
    assert tp1["loss"] == pytest.approx(sum(losses) / m, rel=1e-5, abs=1e-7)
    assert float(tp1["stats"][0]) == pytest.approx(sum(losses), rel=1e-5)
    assert float(tp1["stats"][2]) == correct
    # Rows are chosen first, then rejected, and only response tokens count.
    assert tp1["response_mask"][:, 0].sum() == 0


def test_dpo_step_is_the_same_at_tp2(tp1):
    results = run_distributed(_step, 2, 2, timeout=400)
    for got in results:
        for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "grad_norm"):
            assert got["metrics"][key] == pytest.approx(tp1["metrics"][key], rel=1e-4, abs=1e-6), key
        torch.testing.assert_close(got["probe"], tp1["probe"], rtol=1e-4, atol=1e-5)
    assert tp1["metrics"]["loss"] == pytest.approx(math.log(2), abs=0.05)  # policy ~ reference at the start
