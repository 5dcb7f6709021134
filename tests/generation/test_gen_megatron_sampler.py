"""generate() on a tiny megatron GPTModel (TP=1, PP=1, one spawned process) against independent references:
the per-row full-forward greedy loop (no batching, no padding, no cache), the sampler's own no-cache backend, and
single-row batches."""
import pytest
import torch
from gen_scenarios import MAX_NEW_TOKENS, PAD_ID, PROMPT_LENGTHS

pytestmark = pytest.mark.distributed


@pytest.fixture
def run(dense_run):
    return dense_run


def test_kv_cache_greedy_equals_full_forward_reference(run):
    assert run["kv_greedy"]["responses"] == run["reference"]
    # The reference is not degenerate: responses vary within and across rows.
    assert len({token for response in run["reference"] for token in response}) > MAX_NEW_TOKENS


def test_decode_steps_rotate_the_new_key_only(run):
    """The KV cache holds rotated keys (models/attention.py: RotatedKeyCacheSelfAttention): the prefill rotates its
    columns' queries and keys, each decode step one column's, never the whole cache (megatron's static cache
    rotates every cached key again in every step)."""
    rows = run["rotated_rows"]
    layers, width = 2, max(PROMPT_LENGTHS)
    assert rows[:2 * layers] == [width] * (2 * layers)  # the prefill: queries and keys of every layer
    assert rows[2 * layers:] and set(rows[2 * layers:]) == {1}
    assert len(rows) == 2 * layers * MAX_NEW_TOKENS


def test_full_forward_backend_equals_reference(run):
    assert run["full_forward_greedy"]["responses"] == run["reference"]


def test_padding_does_not_change_a_row(run):
    """A row alone in its batch generates what it generates next to longer and shorter prompts."""
    assert run["alone"] == run["kv_greedy"]["responses"]


def test_output_layout_is_a_right_padded_sequence_batch(run):
    out = run["kv_greedy"]
    for row, (prompt, response) in enumerate(zip(run["prompts"], out["responses"])):
        length = len(prompt) + len(response)
        assert out["input_ids"][row, :length].tolist() == prompt + response
        assert (out["input_ids"][row, length:] == PAD_ID).all()
        assert out["attention_mask"][row].tolist() == [True] * length + [False] * (out["input_ids"].shape[1] - length)
        assert out["response_mask"][row].nonzero().flatten().tolist() == list(range(len(prompt), length))
        assert out["position_ids"][row, :length].tolist() == list(range(length))
        assert (out["position_ids"][row, length:] == 0).all()
    assert out["prompt_lengths"].tolist() == list(PROMPT_LENGTHS)
    assert out["prompt_ids"] == tuple(f"prompt-{i}" for i in range(len(PROMPT_LENGTHS)))
    # The sequence length is that of the longest row, not prompt width + max_new_tokens.
    assert out["input_ids"].shape[1] == max(len(p) + len(r) for p, r in zip(run["prompts"], out["responses"]))


def test_stop_tokens_end_rows_and_set_the_masks(run):
    stop = run["stop_tokens"]
    out = run["stop_run"]
    assert out["responses"] == run["stop_reference"]
    stopped_rows = [row for row, response in enumerate(out["responses"]) if response[-1] in stop]
    # Rows 0 and 1 stop early on the chosen tokens; at least one row runs to max_new_tokens without a stop token.
    assert {0, 1} <= set(stopped_rows)
    assert len(out["responses"][0]) <= 4 and len(out["responses"][1]) <= 6
    assert len(stopped_rows) < len(out["responses"])
    for row, (prompt, response) in enumerate(zip(run["prompts"], out["responses"])):
        end = len(prompt) + len(response)
        expected_eos = torch.zeros(out["input_ids"].shape[1], dtype=torch.bool)
        if row in stopped_rows:
            expected_eos[end - 1] = True
            assert out["stopped_mask"][row]
        else:
            assert len(response) == MAX_NEW_TOKENS and not out["stopped_mask"][row]
        assert torch.equal(out["eos_mask"][row], expected_eos)
        assert out["response_lengths"][row] == len(response)
        assert (out["input_ids"][row, end:] == PAD_ID).all()
        assert not out["response_mask"][row, end:].any() and not out["attention_mask"][row, end:].any()


def test_sampling_is_reproducible_with_a_seed(run):
    assert run["sampled"] == run["sampled_again"]
    assert run["sampled"] != run["sampled_other_seed"]
    # Same seed, same distribution: the no-cache backend draws the same tokens.
    assert run["sampled_full_forward"] == run["sampled"]
    assert run["sampled"] != run["reference"]


def test_top_k_1_equals_greedy(run):
    assert run["top_k_1"] == run["kv_greedy"]["responses"]


def test_model_mode_is_restored(run):
    assert run["training_after_generate"] is True


def test_impossible_calls_are_refused_with_the_fix(run):
    errors = run["errors"]
    assert "'beam_search' is not one of ['kv_cache', 'full_forward']" in errors["backend"]
    assert "torch.Generator" in errors["no_generator"]
    assert "[500]" in errors["stop_outside_vocab"] and "model.vocab_size" in errors["stop_outside_vocab"]
    assert "max_new_tokens=2100" in errors["too_long"] and "max_position_embeddings=2048" in errors["too_long"]
