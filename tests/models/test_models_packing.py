"""Sequence packing (megaseg.models.packing) against the unpacked path computed independently.

Unit checks: position ids restart per sequence, cu_seqlens bound every sequence (tail padding its own sequence),
unpacking returns each row's tokens; the reward-model and DPO collation keep chosen/rejected pairing and segment
ends when packed.

Model checks at TP=1 (one process), TP=2 and PP=2 (two gloo processes each), on the tiny model (grouped-query
attention) with ragged
rows: per-position reward-model values, the LM's entropies and token log-probs (through the frozen runner,
``infer_sequences`` / ``infer_batch``), and the segment Bradley-Terry loss, the DPO loss and the PPO actor/critic
losses with their gradients, packed against the same rows run one sequence at a time ([1, L], no padding) or
right-padded (the path packing replaces).
"""
from __future__ import annotations

import pytest
import torch

from megaseg.data.encoding import TokenizedPair, TokenizedSequence
from megaseg.parallel.spawn import run_distributed

VOCAB = 128
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _sequences(seed: int = 0) -> list[TokenizedSequence]:
    """Ragged prompt+response rows (3 .. 40 tokens) of the tiny model's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [(3, 9), (7, 1), (12, 21), (2, 30), (5, 14), (9, 4), (4, 36), (11, 2)]
    return [TokenizedSequence(prompt_ids=tuple(torch.randint(1, VOCAB, (p,), generator=generator).tolist()),
                              response_ids=tuple(torch.randint(1, VOCAB, (r,), generator=generator).tolist()),
                              ends_with_eos=bool(k % 2)) for k, (p, r) in enumerate(lengths)]


def _pairs() -> list[TokenizedPair]:
    """4 pairs: chosen and rejected share their prompt, answers of other lengths."""
    sequences = _sequences(1)
    pairs = []
    for k in range(4):
        chosen = sequences[2 * k]
        other = sequences[2 * k + 1]
        rejected = TokenizedSequence(chosen.prompt_ids, other.response_ids, other.ends_with_eos)
        pairs.append(TokenizedPair(id=f"p{k}", source=f"test:{k}", chosen=chosen, rejected=rejected))
    return pairs


def _segmented_pairs():
    from megaseg.training.reward_model.data import SegmentedPair

    def ends(sequence: TokenizedSequence) -> tuple[int, ...]:
        prompt, content = len(sequence.prompt_ids), len(sequence.response_ids) - int(sequence.ends_with_eos)
        content = max(content, 1)
        return tuple(sorted({prompt + k for k in range(2, content, 3)} | {prompt + content - 1}))

    return [SegmentedPair(pair, ends(pair.chosen), ends(pair.rejected)) for pair in _pairs()]


# --- unit checks (no model) ------------------------------------------------------------------------------------------


def test_pack_rows_restarts_positions_and_bounds_every_sequence():
    from megaseg.models.packing import pack_rows, packed_lengths

    input_ids = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 7, 8, 9, 10]])
    lengths = [3, 2, 5]
    assert packed_lengths([lengths, [1, 1]], multiple=4) == [12, 4]  # no pipeline stages: each its own
    packed = pack_rows(input_ids, lengths, packed_length=12, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1]]
    params = packed.packed_seq_params
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 10, 12]  # the tail padding is a sequence of its own
    assert params.max_seqlen_q == params.max_seqlen_kv == 5
    # Unpacking a per-token output returns each row's tokens at its own columns.
    rows = packed.unpack(packed.input_ids[..., None].float())[..., 0]
    real = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    assert torch.equal(rows[real], input_ids[real].float())
    with pytest.raises(ValueError, match="shorter than"):
        pack_rows(input_ids, lengths, packed_length=9)


def test_row_lengths_refuses_left_padding():
    from megaseg.models.packing import row_lengths

    assert row_lengths(torch.tensor([[True, True, False], [True, True, True]])) == [2, 3]
    with pytest.raises(ValueError, match="right-padded"):
        row_lengths(torch.tensor([[False, True, True]]))


def test_reward_collation_keeps_pairing_and_segment_ends_when_packed():
    from megaseg.training.reward_model.batches import collate_step

    pairs = _segmented_pairs()
    padded = collate_step(pairs, 2, pad_id=0)
    packed = collate_step(pairs, 2, pad_id=0, packing=True)
    # No pipeline stages here: each micro-batch packed to its own total, rounded up to 16.
    assert [batch.packing.packed_length for batch in packed] == [-(-sum(batch.packing.lengths) // 16) * 16
                                                                 for batch in packed]
    for batch, reference, group in zip(packed, padded, (pairs[:2], pairs[2:])):
        rows = [item.pair.chosen for item in group] + [item.pair.rejected for item in group]
        ends = [item.chosen_ends for item in group] + [item.rejected_ends for item in group]
        assert batch.num_pairs == 2 and batch.num_tokens == reference.num_tokens
        flat = batch.packing.input_ids[0]
        start = 0
        for row, (sequence, row_ends) in enumerate(zip(rows, ends)):
            tokens = list(sequence.prompt_ids + sequence.response_ids)
            # Row r of the pack is row r of the batch: chosen answers first, then the rejected ones of the same pairs.
            assert flat[start:start + len(tokens)].tolist() == tokens
            assert batch.packing.position_ids[0, start:start + len(tokens)].tolist() == list(range(len(tokens)))
            # The segment ends, read back through the packing, fall on the same tokens as in the padded rows.
            marked = batch.segment_ends[row].nonzero().flatten().tolist()
            assert marked == list(row_ends)
            assert flat[batch.packing.gather_index[row, marked]].tolist() == [tokens[e] for e in row_ends]
            assert torch.equal(batch.segment_ends[row, :len(tokens)], reference.segment_ends[row, :len(tokens)])
            start += len(tokens)


def test_dpo_collation_packs_chosen_then_rejected():
    from megaseg.training.dpo.step import collate_step

    pairs = _pairs()
    batches = collate_step(pairs, 2, pad_token_id=0, device=torch.device("cpu"), packing=True)
    for batch, group in zip(batches, (pairs[:2], pairs[2:])):
        rows = [pair.chosen for pair in group] + [pair.rejected for pair in group]
        expected = [token for sequence in rows for token in sequence.prompt_ids + sequence.response_ids]
        assert batch.packing.input_ids[0, :len(expected)].tolist() == expected
        assert batch.packing.lengths == tuple(len(s.prompt_ids) + len(s.response_ids) for s in rows)


# --- model checks (TP=1, TP=2, PP=2) ------------------------------------------------------------------------------


def _alone(model, sequence: TokenizedSequence, output_fn):
    """The model on one sequence by itself: [1, L], no padding, no packing (the independent reference)."""
    from megaseg.models.pipeline import MicroBatch, forward_only

    tokens = torch.tensor([list(sequence.prompt_ids + sequence.response_ids)])
    outputs = forward_only(model, [MicroBatch(tokens, torch.arange(tokens.shape[1])[None])],
                           lambda output, batch: output_fn(output, batch))
    return outputs[0] if outputs else None


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _zero(model) -> None:
    for p in model.parameters():
        p.grad = None


def _run_layout(rank, world_size, tp, pp):
    from megaseg.algorithms.aggregation import aggregate_segment_rewards
    from megaseg.config.model import ModelConfig
    from megaseg.config.parallel import ParallelConfig
    from megaseg.data.batch import collate_sequences
    from megaseg.models import build_gpt_model, build_reward_model
    from megaseg.models.inference import infer_batch, infer_sequences, log_probs_and_entropy, tensor_parallel_group
    from megaseg.models.pipeline import forward_backward
    from megaseg.parallel import initialize_parallel
    from megaseg.training.dpo.step import add_reference_log_probs, collate_step as dpo_collate, dpo_loss_fn
    from megaseg.training.reward_model.batches import collate_step as rm_collate
    from megaseg.training.reward_model.loss import segment_preference_loss

    parallel_cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = initialize_parallel(parallel_cfg, seed=11)
    # Grouped-query attention (4 heads, 2 key/value groups), as SmolLM2 and Llama have: also at TP=2 (2 heads per rank
    # sharing 1 group).
    model_cfg = ModelConfig(num_query_groups=2)
    rm = build_reward_model(model_cfg, parallel_cfg, seed=7)
    lm = build_gpt_model(model_cfg, parallel_cfg)
    tp_group = tensor_parallel_group(ctx)
    last = ctx.is_last_pipeline_stage
    sequences = _sequences()
    result: dict = {"last_stage": last, "rank": rank}

    # Values and LM outputs through the frozen runner, packed, against each sequence alone.
    lm_fn = lambda logits, batch: [(log_probs.float(), entropy.float()) for log_probs, entropy in zip(  # noqa: E731
        *log_probs_and_entropy(logits, batch.input_ids, tp_group))]
    rm_fn = lambda values, batch: [row.float() for row in values]  # noqa: E731
    for name, model, fn in (("rm", rm, rm_fn), ("lm", lm, lm_fn)):
        packed = infer_sequences(model, sequences, micro_batch_size=3, output_fn=fn, is_last_stage=last,
                                 packing=True)
        alone = [_alone(model, sequence, fn) for sequence in sequences]
        if last:
            result[name] = [(p, a[0]) for p, a in zip(packed, alone)]

    # infer_batch (the PPO experience forwards) over one right-padded batch, packed against padded.
    batch = collate_sequences(sequences, 0)
    outputs = {packing: infer_batch(lm, batch, ctx, micro_batch_size=3, num_outputs=2, packing=packing,
                                    output_fn=lambda logits, b: log_probs_and_entropy(logits, b.input_ids, tp_group))
               for packing in (False, True)}
    result["infer_batch"] = (outputs[True], outputs[False], batch.attention_mask)

    # The segment BT loss and its gradients: packed micro-batches against the padded ones of the same step.
    pairs = _segmented_pairs()
    for packing in (False, True):
        _zero(rm)
        metrics = forward_backward(rm, rm_collate(pairs, 2, pad_id=0, packing=packing),
                                   lambda values, b: segment_preference_loss(values, b, "mean"))
        result[f"rm_loss_{packing}"] = [float(m["stats"][0]) for m in metrics]
        result[f"rm_grads_{packing}"] = _grads(rm)
    # The BT loss summed over micro-batch 0's pairs (0 and 1), each answer run alone (independent of both
    # collations).
    alone_loss = 0.0
    for item in pairs[:2]:
        scores = [_alone(rm, s, lambda v, b: v.float()) for s in (item.pair.chosen, item.pair.rejected)]
        if last:
            chosen, rejected = (aggregate_segment_rewards(score, _ends(ends, s), "mean") for score, ends, s in
                                zip(scores, (item.chosen_ends, item.rejected_ends), (item.pair.chosen,
                                                                                     item.pair.rejected)))
            alone_loss += float(-torch.nn.functional.logsigmoid(chosen - rejected).sum())
    result["rm_micro_batch0_alone"] = alone_loss

    # DPO: reference log-probs through run_frozen and the policy loss with its gradients, packed against padded.
    for packing in (False, True):
        batches = add_reference_log_probs(lm, dpo_collate(_pairs(), 2, 0, torch.device("cpu"), packing=packing),
                                          ctx)
        _zero(lm)
        metrics = forward_backward(lm, batches, dpo_loss_fn(0.1, 0.0, tp_group))
        result[f"dpo_ref_{packing}"] = torch.cat([b.ref_log_probs for b in batches])
        result[f"dpo_loss_{packing}"] = [float(m["stats"][0]) for m in metrics]
        result[f"dpo_grads_{packing}"] = _grads(lm)

    result.update(_ppo_updates(lm, rm, ctx, tp_group))
    return result


def _ends(ends: tuple[int, ...], sequence: TokenizedSequence) -> torch.Tensor:
    mask = torch.zeros(1, len(sequence.prompt_ids) + len(sequence.response_ids), dtype=torch.bool)
    mask[0, list(ends)] = True
    return mask


def _ppo_updates(actor, critic, ctx, tp_group) -> dict:
    """PPO actor and critic losses and gradients on train_batches' micro-batches, packed against padded."""
    from megaseg.data.batch import collate_sequences
    from megaseg.models.pipeline import forward_backward
    from megaseg.training.ppo.experience import Experience
    from megaseg.training.ppo.update import actor_loss_fn, critic_loss_fn, train_batches

    sequences = collate_sequences(_sequences(2), 0)
    generator = torch.Generator().manual_seed(3)
    shape = sequences.input_ids.shape
    fields = {name: torch.randn(shape, generator=generator) * sequences.response_mask
              for name in ("log_probs", "values", "returns", "advantages")}
    fields["log_probs"] = fields["log_probs"].abs().neg() - 1.0
    experience = _experience(Experience, sequences, fields)
    out = {}
    for packing in (False, True):
        (batch,) = train_batches(experience, rows_per_step=8, micro_batch_size=4, num_epochs=1, seed=0, step=0,
                                 parallel_ctx=None, packing=packing)
        for name, model, loss_fn in (("actor", actor, actor_loss_fn(tp_group, 0.2, "seq-mean-token-mean", batch)),
                                     ("critic", critic, critic_loss_fn(0.2, "seq-mean-token-mean", batch))):
            _zero(model)
            metrics = forward_backward(model, batch.micro_batches, loss_fn)
            out[f"ppo_{name}_loss_{packing}"] = [float(m["stats"][0]) for m in metrics]
            out[f"ppo_{name}_grads_{packing}"] = _grads(model)
    return out


def _experience(experience_type, sequences, fields):
    import dataclasses

    names = {f.name for f in dataclasses.fields(experience_type)}
    values = {"sequences": sequences, "action_mask": sequences.response_mask}
    values.update({name: tensor for name, tensor in fields.items() if name in names})
    for name in names - set(values):  # the experience's other fields (rewards, KL) are not read by the update
        values[name] = torch.zeros(sequences.input_ids.shape)
    return experience_type(**values)


@pytest.fixture(scope="module")
def layouts():
    return {"tp1": run_distributed(_run_layout, 1, 1, 1), "tp2": run_distributed(_run_layout, 2, 2, 1),
            "pp2": run_distributed(_run_layout, 2, 1, 2)}


LAYOUTS = ("tp1", "tp2", "pp2")


def _last(results):
    return [r for r in results if r["last_stage"]]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_values_entropies_and_log_probs_equal_each_sequence_alone(layouts, layout):
    for result in _last(layouts[layout]):
        for (packed_values, alone_values), sequence in zip(result["rm"], _sequences()):
            length = len(sequence.prompt_ids) + len(sequence.response_ids)
            torch.testing.assert_close(packed_values[:length], alone_values[:length], **TOLERANCE)
        for (packed, alone), sequence in zip(result["lm"], _sequences()):
            length = len(sequence.prompt_ids) + len(sequence.response_ids)
            for got, want in zip(packed, alone):  # log-probs, entropies
                torch.testing.assert_close(got[:length], want[:length], **TOLERANCE)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_infer_batch_packed_equals_padded(layouts, layout):
    for result in layouts[layout]:  # every stage gets the outputs
        packed, padded, mask = result["infer_batch"]
        for got, want in zip(packed, padded):
            torch.testing.assert_close(got[mask], want[mask], **TOLERANCE)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_losses_and_gradients_equal_padded(layouts, layout):
    results = layouts[layout]
    for result in _last(results):
        for name in ("rm_loss", "dpo_loss", "ppo_actor_loss", "ppo_critic_loss"):
            torch.testing.assert_close(torch.tensor(result[f"{name}_True"]), torch.tensor(result[f"{name}_False"]),
                                       **TOLERANCE, msg=lambda m: f"{name}: {m}")
        # Micro-batch 0's summed pair losses against its answers run one at a time.
        assert result["rm_micro_batch0_alone"] == pytest.approx(result["rm_loss_True"][0], rel=1e-4)
        torch.testing.assert_close(result["dpo_ref_True"], result["dpo_ref_False"], **TOLERANCE)
    for result in results:  # every stage's gradients, every tensor-parallel shard
        for name in ("rm_grads", "dpo_grads", "ppo_actor_grads", "ppo_critic_grads"):
            packed, padded = result[f"{name}_True"], result[f"{name}_False"]
            assert packed.keys() == padded.keys() and packed
            for key in padded:
                torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{name} {key}: {m}")
