"""Preference pairs and prompts -> token ids, through the chat template and the truncation rule.

Over-long prompts (more than max_prompt_length tokens after rendering) follow `overlong_prompt`:
- "truncate" (default, the paper): left-truncate the prompt; the pair is kept.
- "reject": the record is invalid (reason "prompt_too_long"): a ValueError naming file:line, or, with
  skip_invalid, skipped and counted. Use it when a prompt that lost its beginning (system turn, BOS, first question)
  is worse than no example.
Rows the template cannot split (see megaseg.data.rendering) are invalid records in the same way.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megaseg.config.data import OVERLONG_PROMPT_POLICIES
from megaseg.data.invalid_records import InvalidRecordError, SkippedRecords, handle_invalid
from megaseg.data.preference import PreferencePair
from megaseg.data.prompts import Prompt
from megaseg.data.rendering import ChatTemplateRenderer, RenderedConversation, RenderError
from megaseg.data.truncation import check_length_limits, truncate_prompt, truncate_prompt_response


@dataclass(frozen=True)
class TokenizedSequence:
    prompt_ids: tuple[int, ...]    # [prompt length]
    response_ids: tuple[int, ...]  # [response length] >= 1
    ends_with_eos: bool            # the last response token is a stop token (a finished answer)

    def __post_init__(self) -> None:
        if self.ends_with_eos and not self.response_ids:
            raise ValueError("ends_with_eos=True needs a response token to be the EOS; the response is empty")


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    source: str                    # "file:line" of the record
    chosen: TokenizedSequence
    rejected: TokenizedSequence    # same prompt_ids as chosen


@dataclass(frozen=True)
class TokenizedPrompt:
    id: str
    source: str
    prompt_ids: tuple[int, ...]    # [prompt length], ends with the template's generation prompt


@dataclass(frozen=True)
class TruncationCounts:
    num_prompts_truncated: int = 0
    num_responses_truncated: int = 0


@dataclass(frozen=True)
class EncodedPairs:
    pairs: list[TokenizedPair]
    skipped: SkippedRecords = field(default_factory=SkippedRecords)
    truncation: TruncationCounts = field(default_factory=TruncationCounts)


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: list[TokenizedPrompt]
    skipped: SkippedRecords = field(default_factory=SkippedRecords)
    num_prompts_truncated: int = 0


def encode_preference_pairs(pairs: Sequence[PreferencePair], renderer: ChatTemplateRenderer, *, max_length: int,
                            max_prompt_length: int, overlong_prompt: str = "truncate",
                            skip_invalid: bool = False) -> EncodedPairs:
    check_length_limits(max_length, max_prompt_length)
    _check_policy(overlong_prompt)
    encoded, skipped = [], SkippedRecords()
    num_prompts_truncated = num_responses_truncated = 0
    for pair in pairs:
        try:
            chosen, rejected = _render_pair(renderer, pair)
            _check_prompt_length(len(chosen.prompt_ids), max_prompt_length, overlong_prompt, pair.source)
            sequences = {name: truncate_prompt_response(rendered.prompt_ids, rendered.response_ids,
                                                        max_length=max_length, max_prompt_length=max_prompt_length,
                                                        stop_token_ids=renderer.stop_token_ids)
                         for name, rendered in (("chosen", chosen), ("rejected", rejected))}
        except InvalidRecordError as error:
            handle_invalid(error, skip_invalid, skipped)
            continue
        num_prompts_truncated += sequences["chosen"].num_prompt_tokens_dropped > 0
        num_responses_truncated += sum(s.num_response_tokens_dropped > 0 for s in sequences.values())
        encoded.append(TokenizedPair(id=pair.id, source=pair.source, chosen=_to_sequence(sequences["chosen"], renderer),
                                     rejected=_to_sequence(sequences["rejected"], renderer)))
    if not encoded:
        raise ValueError(f"no preference pair survived tokenisation ({skipped.summary()})")
    return EncodedPairs(pairs=encoded, skipped=skipped,
                        truncation=TruncationCounts(num_prompts_truncated, num_responses_truncated))


def encode_prompts(prompts: Sequence[Prompt], renderer: ChatTemplateRenderer, *, max_prompt_length: int,
                   overlong_prompt: str = "truncate", skip_invalid: bool = False) -> EncodedPrompts:
    """Prompt ids for generation: the template's prompt render, left-truncated to max_prompt_length."""
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be > 0")
    _check_policy(overlong_prompt)
    encoded, skipped, num_truncated = [], SkippedRecords(), 0
    for prompt in prompts:
        prompt_ids = renderer.prompt_ids(prompt.messages)
        try:
            _check_prompt_length(len(prompt_ids), max_prompt_length, overlong_prompt, prompt.source)
        except InvalidRecordError as error:
            handle_invalid(error, skip_invalid, skipped)
            continue
        num_truncated += len(prompt_ids) > max_prompt_length
        encoded.append(TokenizedPrompt(id=prompt.id, source=prompt.source,
                                       prompt_ids=truncate_prompt(prompt_ids, max_prompt_length)))
    if not encoded:
        raise ValueError(f"no prompt survived tokenisation ({skipped.summary()})")
    return EncodedPrompts(prompts=encoded, skipped=skipped, num_prompts_truncated=num_truncated)


def _check_policy(overlong_prompt: str) -> None:
    if overlong_prompt not in OVERLONG_PROMPT_POLICIES:
        raise ValueError(f"overlong_prompt={overlong_prompt!r} is not one of {list(OVERLONG_PROMPT_POLICIES)}")


def _render_pair(renderer: ChatTemplateRenderer, pair: PreferencePair) -> tuple[RenderedConversation, ...]:
    try:
        return renderer.render_answers(pair.prompt_messages, [pair.chosen, pair.rejected])
    except RenderError as error:
        raise InvalidRecordError(pair.source, error.reason, str(error),
                                 ("chosen", "rejected")[error.answer_index]) from error


def _check_prompt_length(num_prompt_tokens: int, max_prompt_length: int, overlong_prompt: str, source: str) -> None:
    if num_prompt_tokens > max_prompt_length and overlong_prompt == "reject":
        raise InvalidRecordError(source, "prompt_too_long",
                                 f"the rendered prompt has {num_prompt_tokens} tokens > data.max_prompt_length="
                                 f"{max_prompt_length}; raise the limit, or set data.overlong_prompt=truncate to "
                                 "left-truncate it as the paper does", "prompt")


def _to_sequence(truncated, renderer: ChatTemplateRenderer) -> TokenizedSequence:
    return TokenizedSequence(prompt_ids=truncated.prompt_ids, response_ids=truncated.response_ids,
                             ends_with_eos=truncated.response_ids[-1] in renderer.stop_token_ids)
