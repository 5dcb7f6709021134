"""Typed batches: right-padded pairs (chosen rows then rejected rows), left-padded prompts, masks by hand."""
import pytest
import torch

from megaseg.data.batch import collate_pairs, collate_prompts, collate_sequences
from megaseg.data.encoding import TokenizedPair, TokenizedPrompt, TokenizedSequence

PAD, EOS = 0, 9


def pair(pair_id, prompt, chosen, rejected, chosen_eos=True, rejected_eos=True):
    return TokenizedPair(pair_id, f"f.jsonl:{pair_id}", TokenizedSequence(prompt, chosen, chosen_eos),
                         TokenizedSequence(prompt, rejected, rejected_eos))


def test_collate_pairs_by_hand():
    batch = collate_pairs([pair("a", (1, 2), (3, EOS), (4, 5, 6, EOS)),
                           pair("b", (7,), (8, EOS), (5, 6), rejected_eos=False)], pad_id=PAD)
    assert batch.pair_ids == ("a", "b") and batch.num_pairs == 2
    sequences = batch.sequences
    # Rows: a-chosen, b-chosen, a-rejected, b-rejected; longest row 6 tokens.
    assert sequences.input_ids.tolist() == [[1, 2, 3, EOS, PAD, PAD],
                                            [7, 8, EOS, PAD, PAD, PAD],
                                            [1, 2, 4, 5, 6, EOS],
                                            [7, 5, 6, PAD, PAD, PAD]]
    assert sequences.attention_mask.int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0],
                                                       [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert sequences.response_mask.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0],
                                                      [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    # The last row was cut without EOS: no EOS mark.
    assert sequences.eos_mask.int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0],
                                                 [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]
    assert sequences.position_ids.tolist() == [[0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 0, 0],
                                               [0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0]]
    for name in ("attention_mask", "response_mask", "eos_mask"):
        assert getattr(sequences, name).dtype == torch.bool
    assert sequences.input_ids.dtype == sequences.position_ids.dtype == torch.long
    assert sequences.prompt_lengths().tolist() == [2, 1, 2, 1]
    assert sequences.response_lengths().tolist() == [2, 2, 4, 2]


def test_split_rows_and_chosen_rejected_views():
    batch = collate_pairs([pair("a", (1,), (2, EOS), (3, EOS)), pair("b", (1,), (4, EOS), (5, 6, EOS))], PAD)
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    chosen, rejected = batch.split_rows(scores)
    assert chosen.tolist() == [10.0, 20.0] and rejected.tolist() == [30.0, 40.0]
    assert batch.chosen().input_ids[:, :3].tolist() == [[1, 2, EOS], [1, 4, EOS]]
    assert batch.rejected().input_ids.tolist() == [[1, 3, EOS, PAD], [1, 5, 6, EOS]]
    with pytest.raises(ValueError, match="expected 4 rows"):
        batch.split_rows(torch.zeros(3))


def test_pad_to_multiple_of():
    batch = collate_sequences([TokenizedSequence((1, 2), (3, EOS), True)], PAD, pad_to_multiple_of=8)
    assert batch.seq_length == 8 and batch.attention_mask.sum().item() == 4
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        collate_sequences([TokenizedSequence((1,), (EOS,), True)], PAD, pad_to_multiple_of=0)


def test_collate_prompts_left_pads():
    batch = collate_prompts([TokenizedPrompt("p", "f:1", (5, 6, 7)), TokenizedPrompt("q", "f:2", (8,))], pad_id=PAD)
    assert batch.prompt_ids == ("p", "q")
    assert batch.input_ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert batch.attention_mask.int().tolist() == [[1, 1, 1], [0, 0, 1]]
    # Positions count from each row's first real token, so rotary positions do not depend on padding.
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.prompt_lengths().tolist() == [3, 1]
    wide = collate_prompts([TokenizedPrompt("q", "f:2", (8, 9))], pad_id=PAD, pad_to_multiple_of=4)
    assert wide.input_ids.tolist() == [[PAD, PAD, 8, 9]] and wide.position_ids.tolist() == [[0, 0, 0, 1]]


def test_empty_response_cannot_claim_an_eos():
    with pytest.raises(ValueError, match="response is empty"):
        TokenizedSequence((1, 2), (), True)
    batch = collate_sequences([TokenizedSequence((1, 2), (), False)], PAD)
    assert not batch.response_mask.any() and not batch.eos_mask.any()


def test_empty_inputs_are_refused():
    for collate in (collate_pairs, collate_prompts, collate_sequences):
        with pytest.raises(ValueError, match="empty"):
            collate([], PAD)


def test_to_device_keeps_types():
    batch = collate_pairs([pair("a", (1,), (2, EOS), (3, EOS))], PAD).to("cpu")
    assert batch.pair_ids == ("a",) and batch.sequences.eos_mask.dtype == torch.bool
