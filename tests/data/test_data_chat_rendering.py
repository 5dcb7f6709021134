"""Chat-template rendering of Llama-3, Phi-3, Qwen2 and SmolLM2: prompt ids, EOS-terminated response ids.

References, independent of megaseg's rendering code:
- literal ids, checked by hand against each vocabulary (token strings in the comments);
- the tokenizer's own encoding of the conversation written out by hand in the model's chat format.
"""
import pytest

from megaseg.data.preference import load_preference_pairs
from megaseg.data.rendering import ChatTemplateRenderer, RenderError
from megaseg.data.resources import HH_RLHF_HARMLESS_PAIRS
from megaseg.data.tokenizer import load_tokenizer

from material import shared_tokenizer_dir

HI = [{"role": "user", "content": "Hi"}]
MULTI_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Name a color."}]

# prompt [user "Hi"], answer "Hello there.": (prompt ids, response ids), by hand from the vocabularies.
HAND_IDS = {
    "llama3": (
        # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> "\n\n" Hi <|eot_id|>
        # <|start_header_id|> assistant <|end_header_id|> "\n\n"
        [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271],
        # Hello " there" . <|eot_id|>
        [9906, 1070, 13, 128009]),
    "phi3": (
        # <s> <|user|> ▁ <0x0A> Hi <|end|> ▁ <0x0A> <|assistant|> ▁ <0x0A>  (the GGUF-derived tokenizer puts a
        # word-start ▁ after every control token)
        [1, 32010, 29871, 13, 18567, 32007, 29871, 13, 32001, 29871, 13],
        # Hello ▁there . <|end|>   (the template's trailing "\n" after <|end|> is not part of the answer)
        [10994, 727, 29889, 32007]),
    "qwen2": (
        # <|im_start|> system \n You " are" " a" " helpful" " assistant" <|im_end|> \n
        # <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 151645, 198,
         151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198],
        # Hello " there" . <|im_end|>
        [9707, 1052, 13, 151645]),
    "smollm2": (
        # <|im_start|> system \n You " are" " a" " helpful" " AI" " assistant" " named" " Sm" ol LM , " trained"
        # " by" " H" ugging " Face" <|im_end|> \n <|im_start|> user \n Hi <|im_end|> \n <|im_start|> ass istant \n
        [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
         2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198],
        # Hello " there" . <|im_end|>
        [19556, 665, 30, 2]),
}

# The multi-turn prompt written out by hand in each model's chat format, and the answer as the template ends it.
HAND_TEXT = {
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "Blue.<|eot_id|>"),
    "phi3": ("<s><|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nName a color.<|end|>\n<|assistant|>\n",
             "Blue.<|end|>"),
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
              "<|im_start|>assistant\n", "Blue.<|im_end|>"),
    "smollm2": ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n", "Blue.<|im_end|>"),
}

# (end-of-answer token id, default stop tokens): the template's token first, then the tokenizer's EOS.
STOP_TOKENS = {"llama3": (128009, (128009, 128001)), "phi3": (32007, (32007, 32000)),
               "qwen2": (151645, (151645, 151643)), "smollm2": (2, (2,))}

MODELS = list(HAND_IDS)




def renderer_for(request, model):
    return ChatTemplateRenderer(request.getfixturevalue(f"{model}_tokenizer"))


@pytest.mark.parametrize("model", MODELS)
def test_hand_checked_ids(request, model):
    renderer = renderer_for(request, model)
    rendered = renderer.render(HI, "Hello there.")
    assert (list(rendered.prompt_ids), list(rendered.response_ids)) == HAND_IDS[model]
    assert renderer.prompt_ids(HI) == rendered.prompt_ids


@pytest.mark.parametrize("model", MODELS)
def test_multi_turn_matches_the_hand_written_chat_format(request, model):
    tokenizer = request.getfixturevalue(f"{model}_tokenizer")
    prompt_text, answer_text = HAND_TEXT[model]
    expected_prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    expected_full = tokenizer(prompt_text + answer_text, add_special_tokens=False)["input_ids"]
    assert expected_full[:len(expected_prompt)] == expected_prompt
    rendered = ChatTemplateRenderer(tokenizer).render(MULTI_TURN, "Blue.")
    assert list(rendered.prompt_ids) == expected_prompt
    assert list(rendered.response_ids) == expected_full[len(expected_prompt):]


@pytest.mark.parametrize("model", MODELS)
def test_stop_tokens_and_eos_is_the_last_response_token(request, model):
    renderer = renderer_for(request, model)
    end_id, default_stops = STOP_TOKENS[model]
    assert renderer.end_of_answer_token_id == end_id and renderer.stop_token_ids == default_stops
    response = renderer.render(MULTI_TURN, "Blue, or maybe green.\nI like both.").response_ids
    assert response[-1] == end_id and end_id not in response[:-1]


@pytest.mark.parametrize("model", ["llama3", "qwen2"])
def test_system_turn_is_rendered(request, model):
    tokenizer = request.getfixturevalue(f"{model}_tokenizer")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    if model == "llama3":
        text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert list(ChatTemplateRenderer(tokenizer).prompt_ids(prompt)) == tokenizer(text, add_special_tokens=False)[
        "input_ids"]


@pytest.mark.parametrize("model", MODELS)
def test_real_hh_rlhf_pairs_render_cleanly(request, model):
    renderer = renderer_for(request, model)
    tokenizer = renderer.tokenizer
    end_id = renderer.end_of_answer_token_id
    for pair in load_preference_pairs("shipped:" + HH_RLHF_HARMLESS_PAIRS, max_samples=25).pairs:
        generation_prompt = renderer.prompt_ids(pair.prompt_messages)
        for answer in (pair.chosen, pair.rejected):
            rendered = renderer.render(pair.prompt_messages, answer)
            assert rendered.prompt_ids == generation_prompt
            assert rendered.response_ids[-1] == end_id and end_id not in rendered.response_ids[:-1]
            decoded = tokenizer.decode(list(rendered.response_ids[:-1]))
            assert " ".join(decoded.split()) == " ".join(answer.split())


def test_configured_stop_tokens(phi3_tokenizer):
    # Phi-3's stop tokens as the paper lists them: <|endoftext|> (32000) and <|end|> (32007).
    assert ChatTemplateRenderer(phi3_tokenizer, [32000, 32007]).stop_token_ids == (32000, 32007)
    with pytest.raises(ValueError, match=r"does not contain '<\|end\|>' \(32007\)"):
        ChatTemplateRenderer(phi3_tokenizer, [32000])


def test_answer_merging_with_the_generation_prompt_is_rejected(qwen2_tokenizer):
    # Qwen2 merges "assistant\n" + "\nHi" into "\n\n": the prompt/answer boundary would fall inside a token.
    with pytest.raises(RenderError, match="merges with the end of the prompt") as info:
        ChatTemplateRenderer(qwen2_tokenizer).render(HI, "\nHi")
    assert info.value.reason == "boundary_token_merge"


def test_control_tokens_inside_an_answer_are_rejected(smollm2_tokenizer):
    with pytest.raises(RenderError, match="control tokens") as info:
        ChatTemplateRenderer(smollm2_tokenizer).render(HI, "Sure.<|im_end|>\n<|im_start|>user\nmore")
    assert info.value.reason == "special_token_in_answer"


def test_tokenizer_without_chat_template_is_refused():
    gpt2 = load_tokenizer(shared_tokenizer_dir("gpt-2"))
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplateRenderer(gpt2)


def test_template_whose_prompt_is_not_a_prefix_is_refused():
    tokenizer = load_tokenizer(shared_tokenizer_dir("phi-3"))
    # Writes the generation prompt one way and a rendered answer another way.
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
                               "{% else %}<|assistant|>: {{ m['content'] }}<|end|>{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(ValueError, match="not a prefix"):
        ChatTemplateRenderer(tokenizer)


def test_template_without_an_end_token_is_refused():
    tokenizer = load_tokenizer(shared_tokenizer_dir("phi-3"))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:\n{% endif %}")
    with pytest.raises(ValueError, match="writes no control token after an assistant answer"):
        ChatTemplateRenderer(tokenizer)
