"""The paper's truncation rule, as pure functions on token id lists.

A prompt+response sequence is cut to at most `max_length` tokens:
1. the prompt is LEFT-truncated to its last `max_prompt_length` tokens (the end of the conversation matters most;
   like the released implementation this drops the template's opening tokens, BOS included, of an over-long prompt);
2. the response is RIGHT-truncated to `max_length - len(kept prompt)` tokens;
3. if the response ended with a stop token (EOS) and that token was cut, the last kept token is replaced by it, so the
   reward model still scores (and the policy still learns) a finished answer.
A response that never had an EOS (e.g. a generation cut at max_new_tokens) is cut without one.

Because max_prompt_length < max_length, every kept response has at least one token. Whether an over-long prompt is
truncated or rejected is the caller's choice (data.overlong_prompt, see megaseg.data.pair_encoding).
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TruncatedSequence:
    prompt_ids: tuple[int, ...]          # [kept prompt length]
    response_ids: tuple[int, ...]        # [kept response length]
    num_prompt_tokens_dropped: int       # from the left of the prompt
    num_response_tokens_dropped: int     # from the right of the response
    eos_written: bool                    # the last kept response token was replaced by the cut EOS


def check_length_limits(max_length: int, max_prompt_length: int) -> None:
    if max_length <= 0 or max_prompt_length <= 0:
        raise ValueError(f"max_length={max_length} and max_prompt_length={max_prompt_length} must both be > 0")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length={max_length} "
                         "(the response needs room)")


def truncate_prompt(prompt_ids: Sequence[int], max_prompt_length: int) -> tuple[int, ...]:
    """Keep the last max_prompt_length tokens (left truncation)."""
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be > 0")
    return tuple(prompt_ids[-max_prompt_length:]) if len(prompt_ids) > max_prompt_length else tuple(prompt_ids)


def truncate_prompt_response(prompt_ids: Sequence[int], response_ids: Sequence[int], *, max_length: int,
                             max_prompt_length: int, stop_token_ids: Collection[int]) -> TruncatedSequence:
    """Apply the rule above. `stop_token_ids`: the model's stop tokens; the response's last token, if one of them,
    is its EOS and is restored when cut."""
    check_length_limits(max_length, max_prompt_length)
    kept_prompt = truncate_prompt(prompt_ids, max_prompt_length)
    response_budget = max_length - len(kept_prompt)
    kept_response = list(response_ids[:response_budget])
    num_response_dropped = len(response_ids) - len(kept_response)
    had_eos = len(response_ids) > 0 and response_ids[-1] in stop_token_ids
    eos_written = had_eos and num_response_dropped > 0
    if eos_written:
        kept_response[-1] = response_ids[-1]
    return TruncatedSequence(prompt_ids=kept_prompt, response_ids=tuple(kept_response),
                             num_prompt_tokens_dropped=len(prompt_ids) - len(kept_prompt),
                             num_response_tokens_dropped=num_response_dropped, eos_written=eos_written)
