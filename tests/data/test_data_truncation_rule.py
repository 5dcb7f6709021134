"""The paper's truncation rule against hand-worked cases and a slow token-by-token reference."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaseg.data.truncation import truncate_prompt, truncate_prompt_response

EOS, OTHER_STOP = 99, 98


def reference_truncation(prompt, response, max_length, max_prompt_length, stop_token_ids):
    """One token at a time: drop prompt tokens from the front, then take response tokens while there is room."""
    prompt = list(prompt)
    while len(prompt) > max_prompt_length:
        prompt.pop(0)
    kept = []
    for token in response:
        if len(prompt) + len(kept) == max_length:
            break
        kept.append(token)
    if len(kept) < len(response) and response and response[-1] in stop_token_ids:
        kept[-1] = response[-1]
    return tuple(prompt), tuple(kept)


def truncate(prompt, response, max_length, max_prompt_length, stops=(EOS, OTHER_STOP)):
    return truncate_prompt_response(prompt, response, max_length=max_length, max_prompt_length=max_prompt_length,
                                    stop_token_ids=stops)


def test_nothing_to_cut():
    result = truncate([1, 2, 3], [4, 5, EOS], max_length=10, max_prompt_length=5)
    assert (result.prompt_ids, result.response_ids) == ((1, 2, 3), (4, 5, EOS))
    assert (result.num_prompt_tokens_dropped, result.num_response_tokens_dropped, result.eos_written) == (0, 0, False)


def test_prompt_left_truncated_response_right_truncated_eos_restored():
    # max_length 6, max prompt 3: prompt 1..5 keeps [3, 4, 5]; 3 response slots keep [10, 11] + EOS.
    result = truncate([1, 2, 3, 4, 5], [10, 11, 12, 13, EOS], max_length=6, max_prompt_length=3)
    assert (result.prompt_ids, result.response_ids) == ((3, 4, 5), (10, 11, EOS))
    assert (result.num_prompt_tokens_dropped, result.num_response_tokens_dropped, result.eos_written) == (2, 2, True)


def test_short_prompt_leaves_the_response_more_room():
    # The response budget is max_length minus the KEPT prompt, not minus max_prompt_length.
    result = truncate([1], [10, 11, 12, 13, 14, EOS], max_length=5, max_prompt_length=3)
    assert result.response_ids == (10, 11, 12, EOS)


def test_the_response_own_stop_token_is_restored():
    # A response ending with the other stop token (Phi-3: <|endoftext|> rather than <|end|>) keeps that token.
    result = truncate([1], [10, 11, 12, OTHER_STOP], max_length=3, max_prompt_length=1)
    assert result.response_ids == (10, OTHER_STOP)


def test_response_without_eos_is_cut_without_one():
    result = truncate([1], [10, 11, 12, 13], max_length=3, max_prompt_length=1)
    assert result.response_ids == (10, 11) and not result.eos_written


def test_eos_exactly_at_the_limit_is_not_rewritten():
    result = truncate([1, 2], [10, EOS], max_length=4, max_prompt_length=2)
    assert result.response_ids == (10, EOS) and not result.eos_written


def test_one_response_slot_holds_just_the_eos():
    result = truncate([1, 2, 3, 4], [10, 11, EOS], max_length=4, max_prompt_length=3)
    assert (result.prompt_ids, result.response_ids) == ((2, 3, 4), (EOS,))


@pytest.mark.parametrize("max_length, max_prompt_length", [(4, 4), (4, 5), (0, 1), (3, 0)])
def test_invalid_limits(max_length, max_prompt_length):
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncate([1], [EOS], max_length=max_length, max_prompt_length=max_prompt_length)


def test_truncate_prompt_alone():
    assert truncate_prompt([1, 2, 3, 4], 2) == (3, 4)
    assert truncate_prompt([1, 2], 5) == (1, 2)


token_lists = st.lists(st.integers(0, 99), max_size=30)


@settings(max_examples=300, deadline=None)
@given(prompt=token_lists, response=token_lists, max_length=st.integers(2, 40), data=st.data())
def test_matches_the_slow_reference(prompt, response, max_length, data):
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    result = truncate(prompt, response, max_length, max_prompt_length)
    expected_prompt, expected_response = reference_truncation(prompt, response, max_length, max_prompt_length,
                                                              (EOS, OTHER_STOP))
    assert (result.prompt_ids, result.response_ids) == (expected_prompt, expected_response)
    assert len(result.prompt_ids) + len(result.response_ids) <= max_length
    assert result.num_prompt_tokens_dropped == len(prompt) - len(expected_prompt)
    assert result.num_response_tokens_dropped == len(response) - len(expected_response)
