"""Prompt and response token ids from the tokenizer's own chat template.

prompt ids   = tokenize(template(prompt_messages, add_generation_prompt=True)): exactly what the policy is given
               before it generates, so reward-model data and PPO rollouts share one prompt encoding.
response ids = the rest of tokenize(template(prompt_messages + [assistant answer])), cut right after the model's
               stop token (the one the template writes to end the answer: Phi-3 <|end|>, Llama-3 <|eot_id|>,
               Qwen2 / SmolLM2 <|im_end|>), so that EOS is the last response token. Whatever the template writes
               after it (a newline; the old Llama-3 template's next "assistant" header) is not part of the answer.

The whole conversation is tokenized at once (not prompt and answer separately: SentencePiece tokenizers such as
Phi-3's would then put a spurious word-start marker on the answer), and two assumptions are checked for every row:
the prompt text is a prefix of the conversation text, and the prompt's ids are a prefix of the conversation's ids.
The second fails when the answer starts with text that the tokenizer merges with the end of the prompt (a leading
newline after Qwen2's "assistant\\n"): the boundary would fall inside a token, so the row is rejected, not guessed.
Templates write their own BOS, so text is tokenized without the tokenizer's add_special_tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from megaseg.data.chat_messages import Message
from megaseg.data.tokenizer import special_token_ids

_PROBE_PROMPT = [{"role": "user", "content": "Hi"}]
_PROBE_ANSWER = "Hello."


class RenderError(ValueError):
    """One conversation that the template and tokenizer cannot split cleanly; `reason` names the problem."""

    def __init__(self, reason: str, message: str, answer_index: int = 0) -> None:
        self.reason = reason
        self.answer_index = answer_index  # which of the answers given to render_answers failed
        super().__init__(message)


@dataclass(frozen=True)
class RenderedConversation:
    prompt_ids: tuple[int, ...]    # [prompt length], ends with the template's generation prompt
    response_ids: tuple[int, ...]  # [response length], ends with a stop token


def _check_text_prefix(prompt_text: str, full_text: str) -> None:
    if full_text.startswith(prompt_text):
        return
    position = next((i for i, (a, b) in enumerate(zip(prompt_text, full_text)) if a != b),
                    min(len(prompt_text), len(full_text)))
    raise RenderError("template_prefix_mismatch",
                      "the chat template renders the prompt (with the generation prompt) differently from the start "
                      f"of the full conversation, from character {position}: prompt has "
                      f"{prompt_text[position:position + 40]!r}, conversation has "
                      f"{full_text[position:position + 40]!r}; "
                      "megaseg needs a template whose prompt render is a prefix of the conversation render")


class ChatTemplateRenderer:
    """Turns (prompt messages, answer) into prompt and response ids with one tokenizer's chat template.

    `stop_token_ids`: the model's stop tokens (config `model.eos_token_ids`). Empty means: the token the template
    writes after an answer, plus the tokenizer's EOS. A non-empty list must contain the template's end-of-answer token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_token_ids: Sequence[int] = ()) -> None:
        if not tokenizer.chat_template:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; use a tokenizer directory "
                             "with chat_template (tokenizer_config.json or chat_template.jinja) or a GGUF file with "
                             "tokenizer.chat_template")
        self.tokenizer = tokenizer
        self._special_ids = special_token_ids(tokenizer)
        self.end_of_answer_token_id = self._probe_end_of_answer_token()
        self.stop_token_ids = self._resolve_stop_tokens(tuple(int(i) for i in stop_token_ids))

    def prompt_ids(self, prompt_messages: list[Message]) -> tuple[int, ...]:
        return tuple(self._encode(self._prompt_text(prompt_messages)))

    def render(self, prompt_messages: list[Message], answer: str) -> RenderedConversation:
        return self.render_answers(prompt_messages, [answer])[0]

    def render_answers(self, prompt_messages: list[Message],
                       answers: Sequence[str]) -> tuple[RenderedConversation, ...]:
        """Several answers to one prompt (chosen and rejected): the prompt is rendered once, texts encoded together."""
        prompt_text = self._prompt_text(prompt_messages)
        full_texts = [self.tokenizer.apply_chat_template(
            list(prompt_messages) + [{"role": "assistant", "content": answer}], tokenize=False,
            add_generation_prompt=False) for answer in answers]
        encoded = self._encode_many([prompt_text, *full_texts, *answers])
        prompt_ids = encoded[0]
        full_ids_per_answer, answer_ids_per_answer = encoded[1:1 + len(answers)], encoded[1 + len(answers):]
        rendered = []
        for index, (answer, full_text, full_ids, answer_ids) in enumerate(
                zip(answers, full_texts, full_ids_per_answer, answer_ids_per_answer)):
            try:
                _check_text_prefix(prompt_text, full_text)
                rendered.append(self._split_response(prompt_ids, full_ids, answer, answer_ids))
            except RenderError as error:
                error.answer_index = index
                raise
        return tuple(rendered)

    def _split_response(self, prompt_ids: list[int], full_ids: list[int], answer: str,
                        answer_ids: list[int]) -> RenderedConversation:
        if full_ids[:len(prompt_ids)] != prompt_ids:
            boundary = self.tokenizer.convert_ids_to_tokens(full_ids[max(0, len(prompt_ids) - 2):len(prompt_ids) + 1])
            raise RenderError("boundary_token_merge",
                              f"the answer starts with text ({answer[:10]!r}) that the tokenizer merges with the end "
                              f"of the prompt (tokens {boundary}), so no token boundary separates prompt and answer; "
                              "strip leading whitespace from the answers")
        answer_and_tail = full_ids[len(prompt_ids):]
        stop_position = next((i for i, token_id in enumerate(answer_and_tail) if token_id in self.stop_token_ids),
                             None)
        if stop_position is None:
            raise RenderError("no_stop_token", f"the template wrote none of the stop tokens {self.stop_token_ids} "
                              "after the answer; set model.eos_token_ids to the token that ends an answer")
        special_in_answer = self._special_ids.intersection(answer_ids)
        if special_in_answer:
            raise RenderError("special_token_in_answer",
                              f"the answer text contains control tokens "
                              f"{self.tokenizer.convert_ids_to_tokens(sorted(special_in_answer))}; they would end or "
                              "restructure the conversation, remove them from the data")
        return RenderedConversation(prompt_ids=tuple(prompt_ids),
                                    response_ids=tuple(answer_and_tail[:stop_position + 1]))

    def _prompt_text(self, prompt_messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(list(prompt_messages), tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _probe_end_of_answer_token(self) -> int:
        # The first control token after a plain answer is what the template uses to end an answer.
        prompt_ids = self._encode(self._prompt_text(_PROBE_PROMPT))
        full_ids = self._encode(self.tokenizer.apply_chat_template(
            _PROBE_PROMPT + [{"role": "assistant", "content": _PROBE_ANSWER}], tokenize=False))
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template's prompt render (add_generation_prompt=True) is not a prefix of the "
                             "conversation render; megaseg cannot split prompt and answer with this template")
        for token_id in full_ids[len(prompt_ids):]:
            if token_id in self._special_ids:
                return token_id
        raise ValueError("the chat template writes no control token after an assistant answer, so responses would "
                         "have no EOS; use a chat template that ends answers with the model's stop token")

    def _resolve_stop_tokens(self, configured: tuple[int, ...]) -> tuple[int, ...]:
        end_token = self.tokenizer.convert_ids_to_tokens(self.end_of_answer_token_id)
        if configured:
            if self.end_of_answer_token_id not in configured:
                raise ValueError(f"model.eos_token_ids={list(configured)} does not contain {end_token!r} "
                                 f"({self.end_of_answer_token_id}), which the chat template writes after every "
                                 "answer; add it")
            return configured
        eos_id = self.tokenizer.eos_token_id
        if eos_id is None or eos_id == self.end_of_answer_token_id:
            return (self.end_of_answer_token_id,)
        return (self.end_of_answer_token_id, int(eos_id))
