"""Vocab-parallel entropy and log-probs: values AND gradients equal the dense single-process computation.

References: plain-torch formulas (log_softmax in float64) and the dense ``megaseg.algorithms.entropy`` ops. The
tensor-parallel runs spawn 2 gloo ranks, each holding half of the vocabulary of the same logits.
"""

import pytest
import torch

from megaseg.algorithms.entropy import token_entropy, token_log_probs
from megaseg.parallel.spawn import run_distributed
from megaseg.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs

BATCH, SEQ, LOCAL_VOCAB, TP = 3, 17, 50, 2
ATOL = 1e-5


def _inputs(vocab: int, dtype: torch.dtype = torch.float32, masked: bool = True):
    """Logits with a wide range, some -inf (masked) entries, and one row whose first half is entirely masked (so
    rank 0's shard has no finite logit there); tokens drawn from the whole vocabulary, never a masked entry."""
    generator = torch.Generator().manual_seed(1234)
    logits = torch.randn(BATCH, SEQ, vocab, generator=generator) * 4.0
    if masked:
        logits[0, 2, : vocab // 2] = float("-inf")
        logits[1, 5, 7] = float("-inf")
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    tokens[0, 2] = vocab - 1
    tokens[1, 5] = 8
    tokens[2, 0], tokens[2, 1] = 0, vocab // 2  # the first id of each shard
    entropy_weights = torch.randn(BATCH, SEQ, generator=generator)
    log_prob_weights = torch.randn(BATCH, SEQ, generator=generator)
    return logits.to(dtype), tokens, entropy_weights, log_prob_weights


def _plain_reference(logits, tokens, entropy_weights, log_prob_weights):
    """Values and gradients from autograd through log_softmax, in float64."""
    leaf = logits.detach().double().requires_grad_(True)
    log_probs = torch.log_softmax(leaf, dim=-1)
    # 0 * log 0 = 0 for masked (-inf) entries, through a where on the log (a clamp to finfo.min overflows to -inf
    # once multiplied by an upstream gradient > 1, and then 0 * -inf = NaN in backward).
    finite_log_probs = torch.where(torch.isfinite(log_probs), log_probs, torch.zeros_like(log_probs))
    entropy = -(log_probs.exp() * finite_log_probs).sum(-1)
    picked = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    (entropy_grad,) = torch.autograd.grad((entropy * entropy_weights).sum(), leaf, retain_graph=True)
    (log_prob_grad,) = torch.autograd.grad((picked * log_prob_weights).sum(), leaf)
    return entropy, picked, entropy_grad, log_prob_grad


def _ours(logits, tokens, entropy_weights, log_prob_weights, group, chunk_size):
    leaf = logits.detach().clone().requires_grad_(True)
    entropy = vocab_parallel_entropy(leaf, group, chunk_size=chunk_size)
    (entropy_grad,) = torch.autograd.grad((entropy * entropy_weights).sum(), leaf)
    leaf.grad = None
    log_probs = vocab_parallel_log_probs(leaf, tokens, group, chunk_size=chunk_size)
    (log_prob_grad,) = torch.autograd.grad((log_probs * log_prob_weights).sum(), leaf)
    with torch.no_grad():
        entropy_no_grad = vocab_parallel_entropy(logits, group, chunk_size=chunk_size)
        log_probs_no_grad = vocab_parallel_log_probs(logits, tokens, group, chunk_size=chunk_size)
    assert torch.equal(entropy.detach(), entropy_no_grad) and torch.equal(log_probs.detach(), log_probs_no_grad)
    return entropy.detach(), log_probs.detach(), entropy_grad, log_prob_grad


def _assert_close(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL, rtol=ATOL, msg=lambda m: f"{what}: {m}")


# --- no tensor parallelism (tp_group=None): the dense computation -------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, None, 10_000])
def test_single_shard_matches_plain_torch_values_and_gradients(chunk_size):
    logits, tokens, entropy_weights, log_prob_weights = _inputs(TP * LOCAL_VOCAB)
    expected = _plain_reference(logits, tokens, entropy_weights, log_prob_weights)
    actual = _ours(logits, tokens, entropy_weights, log_prob_weights, None, chunk_size)
    for name, a, e in zip(("entropy", "log_probs", "entropy grad", "log_prob grad"), actual, expected):
        _assert_close(a, e, name)


def test_single_shard_matches_the_dense_algorithms():
    logits, tokens, _, _ = _inputs(TP * LOCAL_VOCAB)
    _assert_close(vocab_parallel_entropy(logits, None), token_entropy(logits), "entropy")
    _assert_close(vocab_parallel_log_probs(logits, tokens, None), token_log_probs(logits, tokens), "log_probs")


def test_bf16_logits_are_computed_in_fp32_and_grads_keep_the_dtype():
    logits, tokens, entropy_weights, log_prob_weights = _inputs(TP * LOCAL_VOCAB, dtype=torch.bfloat16)
    # The reference sees the same bf16-rounded values, so only the fp32 math is being compared.
    expected = _plain_reference(logits.float(), tokens, entropy_weights, log_prob_weights)
    entropy, log_probs, entropy_grad, log_prob_grad = _ours(logits, tokens, entropy_weights, log_prob_weights, None, 5)
    assert entropy.dtype == log_probs.dtype == torch.float32
    assert entropy_grad.dtype == log_prob_grad.dtype == torch.bfloat16
    _assert_close(entropy, expected[0], "entropy")
    _assert_close(log_probs, expected[1], "log_probs")
    torch.testing.assert_close(entropy_grad.double(), expected[2], atol=2e-2, rtol=1e-2)


def test_logits_are_not_modified():
    logits, tokens, _, _ = _inputs(TP * LOCAL_VOCAB)
    before = logits.clone()
    vocab_parallel_entropy(logits, None, chunk_size=3)
    vocab_parallel_log_probs(logits, tokens, None, chunk_size=3)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, t: vocab_parallel_log_probs(x, t + 100, None), r"tokens must lie in \[0, 100\)"),
        (lambda x, t: vocab_parallel_log_probs(x, t - 1, None), r"got values in \[-1,"),
        (lambda x, t: vocab_parallel_log_probs(x, t[:, :-1], None), "pass one token per logit row"),
        (lambda x, t: vocab_parallel_log_probs(x, t.float(), None), "integer tensor"),
        (lambda x, t: vocab_parallel_entropy(x, None, chunk_size=0), "chunk_size must be a positive integer"),
        (lambda x, t: vocab_parallel_entropy(x.long(), None), "floating-point"),
        (lambda x, t: vocab_parallel_entropy(x[..., :0], None), "non-empty last"),
    ],
)
def test_bad_inputs_are_refused(call, message):
    logits, tokens, _, _ = _inputs(TP * LOCAL_VOCAB)
    with pytest.raises(ValueError, match=message):
        call(logits, tokens)


# --- tensor parallelism over 2 gloo ranks -------------------------------------------------------------------------


def _tp2_rank(rank, world_size, dtype, chunk_sizes):
    from megaseg.config.parallel import ParallelConfig
    from megaseg.parallel import initialize_parallel

    context = initialize_parallel(ParallelConfig(tensor_model_parallel_size=TP), seed=0)
    logits, tokens, entropy_weights, log_prob_weights = _inputs(TP * LOCAL_VOCAB, dtype=dtype)
    shard = logits[..., context.tp_rank * LOCAL_VOCAB : (context.tp_rank + 1) * LOCAL_VOCAB].contiguous()
    results = {
        chunk: _ours(shard, tokens, entropy_weights, log_prob_weights, context.tp_group, chunk) for chunk in chunk_sizes
    }
    # A real group of size 1 (data-parallel at TP=2, world 2) over the full vocabulary: the dense computation.
    assert context.dp_size == 1
    results["full_vocab_group_of_one"] = _ours(logits, tokens, entropy_weights, log_prob_weights, context.dp_group, 7)
    return results


def _check_tp2_against_dense(results, dtype):
    logits, tokens, entropy_weights, log_prob_weights = _inputs(TP * LOCAL_VOCAB, dtype=dtype)
    dense_leaf = logits.detach().clone().requires_grad_(True)
    dense_entropy = token_entropy(dense_leaf)
    (dense_entropy_grad,) = torch.autograd.grad((dense_entropy * entropy_weights).sum(), dense_leaf)
    dense_log_probs = token_log_probs(dense_leaf, tokens)
    (dense_log_prob_grad,) = torch.autograd.grad((dense_log_probs * log_prob_weights).sum(), dense_leaf)
    plain = _plain_reference(logits.float(), tokens, entropy_weights, log_prob_weights)
    grad_tolerance = ATOL if dtype == torch.float32 else 2e-2
    for key in results[0]:
        for rank in range(TP):
            entropy, log_probs, entropy_grad, log_prob_grad = results[rank][key]
            _assert_close(entropy, dense_entropy.detach(), f"entropy rank {rank} {key}")
            _assert_close(log_probs, dense_log_probs.detach(), f"log_probs rank {rank} {key}")
            _assert_close(entropy, plain[0], f"entropy vs plain rank {rank} {key}")
            _assert_close(log_probs, plain[1], f"log_probs vs plain rank {rank} {key}")
        if key == "full_vocab_group_of_one":
            gathered_entropy_grad, gathered_log_prob_grad = results[0][key][2], results[0][key][3]
        else:
            # Each rank's gradient is its slice of the dense gradient: concatenating the shards gives it back.
            gathered_entropy_grad = torch.cat([results[r][key][2] for r in range(TP)], dim=-1)
            gathered_log_prob_grad = torch.cat([results[r][key][3] for r in range(TP)], dim=-1)
        # The dense entropy's backward is NaN on rows holding a -inf logit (its finfo.min clamp times an upstream
        # gradient > 1 overflows), so it is compared on the fully finite rows; the plain reference on every row.
        finite_rows = torch.isfinite(logits.float()).all(dim=-1)
        for name, actual, dense, reference in (
            ("entropy grad", gathered_entropy_grad, dense_entropy_grad, plain[2]),
            ("log_prob grad", gathered_log_prob_grad, dense_log_prob_grad, plain[3]),
        ):
            torch.testing.assert_close(actual.double()[finite_rows], dense.double()[finite_rows],
                                       atol=grad_tolerance, rtol=grad_tolerance, msg=lambda m: f"{name} {key}: {m}")
            torch.testing.assert_close(actual.double(), reference, atol=grad_tolerance, rtol=grad_tolerance,
                                       msg=lambda m: f"{name} {key} vs plain: {m}")


def _tp2_fp32_then_bf16(rank, world_size):
    from megaseg.parallel import destroy_parallel

    fp32 = _tp2_rank(rank, world_size, torch.float32, (1, 4, None))
    destroy_parallel()  # one spawn for both dtypes: start-up costs more than the math
    return fp32, _tp2_rank(rank, world_size, torch.bfloat16, (6,))


@pytest.mark.distributed
def test_tp2_equals_dense_values_and_gradients():
    fp32, bf16 = zip(*run_distributed(_tp2_fp32_then_bf16, TP, timeout=150))
    _check_tp2_against_dense(list(fp32), torch.float32)
    _check_tp2_against_dense(list(bf16), torch.bfloat16)
