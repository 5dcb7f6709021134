"""The token buffer (left-padded prompts moved to column 0, per-column recording) and the SequenceBatch built from
it, on small hand-checked batches."""
import pytest
import torch

from megaseg.data.batch import PromptBatch, collate_prompts
from megaseg.data.encoding import TokenizedPrompt
from megaseg.generation.output import build_output
from megaseg.generation.token_buffer import TokenBuffer, right_aligned_prompts

PAD = 0
STOP = (9,)


def _prompts(*rows):
    return collate_prompts([TokenizedPrompt(id=f"p{i}", source="t", prompt_ids=tuple(row))
                            for i, row in enumerate(rows)], PAD)


def test_prompts_move_to_column_zero():
    tokens, lengths = right_aligned_prompts(_prompts([5, 6], [1, 2, 3, 4], [7]), width=6, pad_token_id=PAD)
    assert tokens.tolist() == [[5, 6, 0, 0, 0, 0], [1, 2, 3, 4, 0, 0], [7, 0, 0, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 1]


def test_prompts_that_are_not_left_padded_or_empty_are_refused():
    batch = _prompts([5, 6], [1, 2, 3])
    right_padded = PromptBatch(batch.input_ids.flip(1), batch.attention_mask.flip(1), batch.position_ids,
                               batch.prompt_ids)
    with pytest.raises(ValueError, match=r"\['p0'\] are not left-padded"):
        right_aligned_prompts(right_padded, 8, PAD)
    with pytest.raises(ValueError, match=r"\['p1'\] are empty"):
        right_aligned_prompts(_prompts([5, 6], []), 8, PAD)


def test_record_keeps_prompts_pads_finished_rows_and_stops():
    buffer = TokenBuffer.from_prompts(_prompts([5, 6], [1, 2, 3, 4], [7]), max_new_tokens=3, stop_token_ids=STOP,
                                      pad_token_id=PAD)
    assert buffer.width == 4 + 3 and buffer.first_column_to_predict() == 1
    # Column 1: only row 2 (prompt length 1) generates; the others keep their prompt token.
    buffer.record(1, torch.tensor([50, 51, 9]))
    buffer.record(2, torch.tensor([60, 61, 62]))  # row 0 generates; row 2 already stopped
    buffer.record(3, torch.tensor([70, 71, 72]))
    buffer.record(4, torch.tensor([80, 81, 82]))  # row 0 hits max_new_tokens=3; row 1 generates its first
    assert buffer.tokens.tolist() == [[5, 6, 60, 70, 80, 0, 0], [1, 2, 3, 4, 81, 0, 0], [7, 9, 0, 0, 0, 0, 0]]
    assert buffer.response_lengths.tolist() == [3, 1, 1]
    assert buffer.stopped_mask.tolist() == [False, False, True]
    assert buffer.done_mask.tolist() == [True, False, True]
    assert not buffer.all_done()


def test_output_masks_and_padding():
    buffer = TokenBuffer.from_prompts(_prompts([5, 6], [1, 2, 3]), max_new_tokens=4, stop_token_ids=STOP,
                                      pad_token_id=PAD)
    for column, tokens in zip(range(2, 5), ([11, 3], [9, 12], [13, 14])):
        buffer.record(column, torch.tensor(tokens))
    out = build_output(buffer, ("a", "b"), PAD, pad_to_multiple_of=4)
    batch = out.sequences
    # Row 0: prompt [5, 6], response [11, 9] (stopped); row 1: prompt [1, 2, 3], response [12, 14] so far.
    assert batch.input_ids.tolist() == [[5, 6, 11, 9, 0, 0, 0, 0], [1, 2, 3, 12, 14, 0, 0, 0]]
    assert batch.attention_mask.sum(1).tolist() == [4, 5]
    assert batch.response_mask.tolist() == [[False, False, True, True] + [False] * 4,
                                            [False, False, False, True, True] + [False] * 3]
    assert batch.eos_mask.nonzero().tolist() == [[0, 3]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    assert torch.equal(batch.prompt_lengths(), out.prompt_lengths) and out.prompt_lengths.tolist() == [2, 3]
    assert torch.equal(batch.response_lengths(), out.response_lengths)
    assert out.response_token_ids() == [[11, 9], [12, 14]] and out.num_generated_tokens == 4
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        build_output(buffer, ("a", "b"), PAD, pad_to_multiple_of=0)


def test_prompt_ends_aligned_behind_masked_leading_pad():
    """align_prompt_ends: prompts end together at the longest prompt's length, every row samples from there, the
    leading pad is masked and skipped by the positions, and the output is back at column 0."""
    from megaseg.generation.sampler import attention_mask

    buffer = TokenBuffer.from_prompts(_prompts([5, 6], [1, 2, 3]), max_new_tokens=3, stop_token_ids=STOP,
                                      pad_token_id=PAD, align_prompt_ends=True)
    assert buffer.tokens.tolist() == [[0, 5, 6, 0, 0, 0], [1, 2, 3, 0, 0, 0]]
    assert buffer.start_columns.tolist() == [1, 0] and buffer.first_column_to_predict() == 3
    assert buffer.positions(0, 3).tolist() == [[0, 0, 1], [0, 1, 2]]
    assert buffer.positions(3, 1).tolist() == [[2], [3]]
    # The prefill: causal, and row 0 never attends to its pad column 0.
    prefill = attention_mask(buffer, 0, 3)
    assert prefill.shape == (2, 1, 3, 3)
    assert prefill[0, 0].tolist() == [[True, True, True], [True, False, True], [True, False, False]]
    assert prefill[1, 0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    # One decode column after 4 cached columns.
    assert attention_mask(buffer, 4, 5)[:, 0, 0].tolist() == [[True] + [False] * 4, [False] * 5]
    for column, tokens in zip(range(3, 6), ([11, 12], [9, 13], [14, 9])):
        buffer.record(column, torch.tensor(tokens))
    out = build_output(buffer, ("a", "b"), PAD)
    assert out.sequences.input_ids.tolist() == [[5, 6, 11, 9, 0, 0], [1, 2, 3, 12, 13, 9]]
    assert out.response_token_ids() == [[11, 9], [12, 13, 9]]
    assert out.sequences.position_ids.tolist() == [[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5]]
    # Prompts of one length need no mask: the attention's own causal mask is the same thing.
    same = TokenBuffer.from_prompts(_prompts([5, 6], [1, 2]), max_new_tokens=2, stop_token_ids=STOP,
                                    pad_token_id=PAD, align_prompt_ends=True)
    assert same.leading_pad_mask(2) is None and attention_mask(same, 0, 2) is None
