"""Sentence granularity in PPO reads token texts from the real tokenizer: the marker flags exactly the response tokens
whose decoded text ends with a sentence mark, as a per-token decode loop does."""
from __future__ import annotations


import pytest
import torch

from material import smollm2_gguf_path

from megaseg.data.batch import collate_sequences
from megaseg.data.encoding import TokenizedSequence

MARKS = (".", "!", "?", "\n", ";", "...", ",", ":", "。", "！", "？", "；", "，", "：")


@pytest.fixture(scope="module")
def tokenizer():
    from megaseg.data.tokenizer import load_tokenizer

    return load_tokenizer(str(smollm2_gguf_path()))


def test_marker_flags_sentence_ends_of_responses_only(tokenizer):
    from megaseg.segmentation.cutting import TokenizerSentenceMarker

    prompt = tuple(tokenizer("Hi. How are you?", add_special_tokens=False)["input_ids"])
    answers = ["Fine, thanks! And you: well? Yes.\nOk", "No marks here at all", "Done."]
    rows = [TokenizedSequence(prompt, tuple(tokenizer(text, add_special_tokens=False)["input_ids"]), False)
            for text in answers]
    batch = collate_sequences(rows, pad_id=0)
    marks = TokenizerSentenceMarker(tokenizer)(batch)
    expected = torch.zeros_like(marks)
    for row, sequence in enumerate(rows):
        for k, token_id in enumerate(sequence.response_ids):
            text = tokenizer.decode([token_id]).rstrip(" \t")
            expected[row, len(prompt) + k] = text.endswith(MARKS)
    assert torch.equal(marks, expected)
    assert not marks[~batch.response_mask].any()  # the prompt's "." and "?" are not response tokens
    assert int(marks[0].sum()) >= 4 and not marks[1].any() and bool(marks[2].any())
