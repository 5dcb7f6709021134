"""Pairs and prompts -> ids: template + truncation + the over-long-prompt policy, and the config-driven splits."""
import json

import pytest

from megaseg.config.data import DataConfig
from megaseg.data.encoding import encode_preference_pairs, encode_prompts
from megaseg.data.invalid_records import InvalidRecordError
from megaseg.data.preference import load_preference_pairs
from megaseg.data.prompts import load_prompts
from megaseg.data.rendering import ChatTemplateRenderer
from megaseg.data.resources import HH_RLHF_HARMLESS_PAIRS
from megaseg.data.splits import hold_out, load_preference_splits, load_prompt_set

LONG_QUESTION = "Tell me everything about " + "the history of the Roman empire and " * 20 + "its fall."


@pytest.fixture(scope="module")
def phi3(phi3_tokenizer):
    return ChatTemplateRenderer(phi3_tokenizer)


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    return path


def test_short_pair_is_rendered_untouched(phi3, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", [("Hi", "Hello there.", "Go away.")])
    encoded = encode_preference_pairs(load_preference_pairs(path).pairs, phi3, max_length=64, max_prompt_length=32)
    (pair,) = encoded.pairs
    # prompt: <s> <|user|> ▁ \n Hi <|end|> ▁ \n <|assistant|> ▁ \n ; chosen: Hello ▁there . <|end|>
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids == (1, 32010, 29871, 13, 18567, 32007, 29871, 13,
                                                                  32001, 29871, 13)
    assert pair.chosen.response_ids == (10994, 727, 29889, 32007) and pair.chosen.ends_with_eos
    assert pair.rejected.response_ids[-1] == 32007 and pair.rejected.ends_with_eos
    assert encoded.truncation.num_prompts_truncated == encoded.truncation.num_responses_truncated == 0


def test_long_pair_is_truncated_by_the_rule_and_keeps_its_eos(phi3, tmp_path):
    answer = "The empire " + "grew and grew " * 30 + "and then it fell."
    path = write_pairs(tmp_path / "p.jsonl", [(LONG_QUESTION, answer, "No idea.")])
    (pair,) = load_preference_pairs(path).pairs
    full = phi3.render(pair.prompt_messages, answer)
    encoded = encode_preference_pairs([pair], phi3, max_length=48, max_prompt_length=32)
    chosen = encoded.pairs[0].chosen
    assert chosen.prompt_ids == full.prompt_ids[-32:]                 # left-truncated
    assert chosen.response_ids[:-1] == full.response_ids[:15]         # right-truncated to 48 - 32 = 16 tokens
    assert chosen.response_ids[-1] == 32007 and chosen.ends_with_eos  # ... whose last one is the restored EOS
    assert encoded.truncation.num_prompts_truncated == 1 and encoded.truncation.num_responses_truncated == 1


def test_overlong_prompt_reject_policy_names_file_and_line(phi3, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", [("Hi", "Hello.", "Bye."), (LONG_QUESTION, "Rome.", "Carthage.")])
    pairs = load_preference_pairs(path).pairs
    with pytest.raises(InvalidRecordError, match=rf"{path}:2: field 'prompt'.*data.max_prompt_length=32") as info:
        encode_preference_pairs(pairs, phi3, max_length=64, max_prompt_length=32, overlong_prompt="reject")
    assert info.value.reason == "prompt_too_long"
    encoded = encode_preference_pairs(pairs, phi3, max_length=64, max_prompt_length=32, overlong_prompt="reject",
                                      skip_invalid=True)
    assert [pair.source for pair in encoded.pairs] == [f"{path}:1"]
    assert encoded.skipped.counts == {"prompt_too_long": 1}


def test_untokenizable_row_names_file_line_and_answer(qwen2_tokenizer, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", [("Hi", "Hello.", "Bye."), ("Hi", "Fine.", "\nBad start.")])
    pairs = load_preference_pairs(path).pairs
    with pytest.raises(InvalidRecordError, match=rf"{path}:2: field 'rejected'.*boundary_token_merge"):
        encode_preference_pairs(pairs, ChatTemplateRenderer(qwen2_tokenizer), max_length=64, max_prompt_length=32)


def test_prompts_for_generation_are_left_truncated(phi3, tmp_path):
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": LONG_QUESTION}) + "\n")
    prompts = load_prompts(path).prompts
    encoded = encode_prompts(prompts, phi3, max_prompt_length=20)
    assert encoded.prompts[0].prompt_ids == phi3.prompt_ids(prompts[0].messages)
    assert encoded.prompts[1].prompt_ids == phi3.prompt_ids(prompts[1].messages)[-20:]
    assert encoded.num_prompts_truncated == 1
    rejected = encode_prompts(prompts, phi3, max_prompt_length=20, overlong_prompt="reject", skip_invalid=True)
    assert len(rejected.prompts) == 1 and rejected.skipped.counts == {"prompt_too_long": 1}


def test_hold_out_is_seeded_and_order_preserving():
    items = list(range(20))
    kept, held = hold_out(items, 0.25, seed=3)
    assert len(held) == 5 and sorted(kept + held) == items
    assert kept == sorted(kept) and held == sorted(held)
    assert hold_out(items, 0.25, seed=3) == (kept, held) and hold_out(items, 0.25, seed=4) != (kept, held)
    with pytest.raises(ValueError, match="empty split"):
        hold_out(items[:2], 0.1, seed=0)


def test_splits_from_config_on_the_shipped_data(phi3):
    data = DataConfig(train_path="shipped:" + HH_RLHF_HARMLESS_PAIRS, max_samples=40, eval_fraction=0.25,
                      max_length=128, max_prompt_length=96)
    train, evaluation = load_preference_splits(data, phi3, seed=1)
    assert len(train.pairs) == 30 and len(evaluation.pairs) == 10
    assert not {p.id for p in train.pairs} & {p.id for p in evaluation.pairs}
    for pair in train.pairs + evaluation.pairs:
        for sequence in (pair.chosen, pair.rejected):
            assert len(sequence.prompt_ids) <= 96 and len(sequence.prompt_ids) + len(sequence.response_ids) <= 128
            assert sequence.response_ids[-1] == 32007 and sequence.ends_with_eos
    no_eval = load_preference_splits(DataConfig(train_path="shipped:" + HH_RLHF_HARMLESS_PAIRS, max_samples=3),
                                     phi3, seed=1)
    assert len(no_eval[0].pairs) == 3 and no_eval[1] is None


def test_skip_counts_of_a_split_cover_loading_and_tokenisation(phi3, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "Hi", "chosen": "A.", "rejected": "B."}), "{broken",
                               json.dumps({"prompt": LONG_QUESTION, "chosen": "A.", "rejected": "B."})]) + "\n")
    data = DataConfig(train_path=str(path), skip_invalid=True, overlong_prompt="reject", max_length=64,
                      max_prompt_length=32)
    train, _ = load_preference_splits(data, phi3, seed=0)
    assert len(train.pairs) == 1 and train.skipped.counts == {"not_json": 1, "prompt_too_long": 1}
    # The first five MT-Bench prompts render to 37, 64, 69, 59 and 37 Phi-3 tokens.
    prompts = load_prompt_set("shipped:prompts/mt_bench_question.jsonl", data, phi3, max_prompt_length=60,
                              max_samples=5)
    assert [prompt.id for prompt in prompts.prompts] == ["81", "84", "85"]
    assert prompts.skipped.counts == {"prompt_too_long": 2}


def test_config_validation():
    with pytest.raises(ValueError, match="data.overlong_prompt='cut'"):
        DataConfig(overlong_prompt="cut")
    with pytest.raises(ValueError, match="both choose the eval set"):
        DataConfig(eval_path="e.jsonl", eval_fraction=0.1)
    with pytest.raises(ValueError, match="data.train_path is not set"):
        load_preference_splits(DataConfig(), None, seed=0)


def test_shipped_pairs_to_one_forward_batch_with_smollm2(smollm2_tokenizer):
    from megaseg.data.batch import collate_pairs
    from megaseg.data.sampler import ResumableShardedSampler
    from megaseg.data.tokenizer import padding_token_id

    renderer = ChatTemplateRenderer(smollm2_tokenizer)
    data = DataConfig(train_path="shipped:" + HH_RLHF_HARMLESS_PAIRS, max_samples=16, max_length=192,
                      max_prompt_length=128)
    train, _ = load_preference_splits(data, renderer, seed=0)
    sampler = ResumableShardedSampler(len(train.pairs), seed=0, dp_rank=1, dp_size=2)
    indices = list(sampler)[:4]
    batch = collate_pairs([train.pairs[i] for i in indices], padding_token_id(smollm2_tokenizer))
    sequences = batch.sequences
    assert sequences.batch_size == 8 and sequences.seq_length <= 192
    # Every response (all end with <|im_end|> = 2) has exactly one EOS mark, on its last response token.
    assert sequences.eos_mask.sum(dim=1).tolist() == [1] * 8
    last_response_column = sequences.attention_mask.sum(dim=1) - 1
    assert sequences.input_ids.gather(1, last_response_column[:, None]).squeeze(1).tolist() == [2] * 8
    assert sequences.eos_mask.gather(1, last_response_column[:, None]).all()
    assert (sequences.prompt_lengths() <= 128).all()
    chosen, rejected = batch.split_rows(sequences.response_lengths())
    assert chosen.tolist() == [len(train.pairs[i].chosen.response_ids) for i in indices]
    assert rejected.tolist() == [len(train.pairs[i].rejected.response_ids) for i in indices]
