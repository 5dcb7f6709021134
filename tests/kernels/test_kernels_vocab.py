"""The vocabulary-shard kernels: per-shard partials against torch on the shard, and vocab-parallel entropy /
log-probs with the kernels against the chunked torch path and float64 log_softmax (values and gradients), at TP=1
and over 2 gloo ranks (each holding half the vocabulary, so some rows' targets are in the other shard)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_strategies import DEVICE, logits_blocks

from megaseg.kernels import kernels_mode
from megaseg.parallel.spawn import run_distributed
from megaseg.parallel.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
)


def _float64_reference(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor):
    """(entropy, log-probs, their gradients with per-row weights) by autograd through log_softmax in float64."""
    leaf = logits.detach().double().cpu().requires_grad_(True)
    log_probs = torch.log_softmax(leaf, dim=-1)
    finite = torch.where(torch.isfinite(log_probs), log_probs, torch.zeros_like(log_probs))
    entropy = -(log_probs.exp() * finite).sum(-1)
    picked = log_probs.gather(-1, tokens.cpu()[:, None]).squeeze(-1)
    (entropy_grad,) = torch.autograd.grad((entropy * weights).sum(), leaf, retain_graph=True)
    (log_prob_grad,) = torch.autograd.grad((picked * weights).sum(), leaf)
    return entropy.detach(), picked.detach(), entropy_grad, log_prob_grad


def _vocab_parallel(logits, tokens, weights, group, mode):
    leaf = logits.detach().clone().requires_grad_(True)
    with kernels_mode(mode):
        entropy = vocab_parallel_entropy(leaf, group)
        log_probs = vocab_parallel_log_probs(leaf, tokens, group)
    (entropy_grad,) = torch.autograd.grad((entropy * weights.to(entropy.device)).sum(), leaf)
    (log_prob_grad,) = torch.autograd.grad((log_probs * weights.to(log_probs.device)).sum(), leaf)
    return entropy.detach(), log_probs.detach(), entropy_grad, log_prob_grad


def _close(actual, expected, what, tolerance):
    torch.testing.assert_close(actual.detach().double().cpu(), expected.double().cpu(), atol=tolerance,
                               rtol=tolerance, msg=lambda m: f"{what}: {m}")


@given(block=logits_blocks(), vocab_start=st.integers(0, 400))
def test_shard_partials_match_torch_on_the_shard(block, vocab_start):
    from megaseg.kernels.vocab_partials import shard_partials

    logits, tokens = block
    tokens = tokens + vocab_start - logits.shape[1] // 2  # about half of the targets fall outside this shard
    partials = shard_partials(logits, tokens, vocab_start).cpu().double()
    z = logits.cpu().double()
    m = z.amax(-1)
    shifted = z - m[:, None]
    weights = shifted.exp()
    local = tokens.cpu() - vocab_start
    owned = (local >= 0) & (local < z.shape[1])
    target = torch.where(owned, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
    _close(partials[:, 0], m, "shard max", 0.0)
    _close(partials[:, 1], weights.sum(-1), "S", 1e-5)
    # A is compared relative to S: it sums terms of both signs, |A| <= S * max|z - m|.
    a = torch.where(weights > 0, weights * shifted, 0.0).sum(-1)
    scale = weights.sum(-1) * (1 + shifted.clamp(min=-1e30).abs().amax(-1).clamp(max=1e6))
    assert ((partials[:, 2] - a).abs() <= 1e-5 * scale).all()
    _close(partials[:, 3], target, "target logit", 0.0)


@given(block=logits_blocks())
def test_tp1_kernels_match_torch_and_float64(block):
    logits, tokens = block
    weights = torch.linspace(-2, 3, logits.shape[0])
    expected = _float64_reference(logits, tokens, weights)
    ours = _vocab_parallel(logits, tokens, weights, None, "triton")
    torch_path = _vocab_parallel(logits, tokens, weights, None, "torch")
    # Logits of magnitude 1e3-1e4 carry fp32 rounding of ~1e-4 into z - lse: tolerances scale with them.
    magnitude = float(logits[torch.isfinite(logits)].abs().max())
    tolerance = 2e-5 * max(1.0, magnitude / 10)
    names = ("entropy", "log_probs", "entropy grad", "log_prob grad")
    for name, actual, reference, torch_value in zip(names, ours, expected, torch_path):
        assert torch.isfinite(actual).all(), f"{name} is not finite"
        _close(actual, reference, f"{name} vs float64", tolerance)
        _close(actual, torch_value, f"{name} vs the torch path", tolerance)


@given(block=logits_blocks(max_rows=4, max_vocab=200), use=st.sampled_from(["both", "log_probs", "entropy"]))
def test_fused_log_probs_and_entropy_equal_the_two_ops(block, use):
    """One read and one backward pass for both outputs; the gradient of an unused output is skipped, not wrong."""
    logits, tokens = block
    weights = torch.linspace(-1, 2, logits.shape[0], device=logits.device)
    leaf = logits.detach().clone().requires_grad_(True)
    with kernels_mode("triton"):
        log_probs, entropy = vocab_parallel_log_probs_and_entropy(leaf, tokens, None)
    loss = {"both": (log_probs + 0.5 * entropy), "log_probs": log_probs, "entropy": entropy}[use]
    (grad,) = torch.autograd.grad((loss * weights).sum(), leaf)
    expected_entropy, expected_log_probs, entropy_grad, log_prob_grad = _float64_reference(logits, tokens,
                                                                                           weights.cpu().double())
    expected_grad = {"both": log_prob_grad + 0.5 * entropy_grad, "log_probs": log_prob_grad, "entropy": entropy_grad}
    magnitude = float(logits[torch.isfinite(logits)].abs().max())
    tolerance = 2e-5 * max(1.0, magnitude / 10)
    _close(log_probs, expected_log_probs, "log_probs", tolerance)
    _close(entropy, expected_entropy, "entropy", tolerance)
    _close(grad, expected_grad[use], f"gradient of {use}", tolerance)
    with kernels_mode("torch"):  # the torch path of the same function: the two separate ops
        torch_log_probs, torch_entropy = vocab_parallel_log_probs_and_entropy(logits, tokens, None)
    _close(log_probs, torch_log_probs, "log_probs vs torch", tolerance)
    _close(entropy, torch_entropy, "entropy vs torch", tolerance)


def test_bf16_logits_keep_their_dtype_in_the_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 70, generator=generator) * 3).to(torch.bfloat16).to(DEVICE)
    tokens = torch.randint(0, 70, (5,), generator=generator).to(DEVICE)
    weights = torch.ones(5)
    entropy, log_probs, entropy_grad, log_prob_grad = _vocab_parallel(logits, tokens, weights, None, "triton")
    assert entropy.dtype == log_probs.dtype == torch.float32
    assert entropy_grad.dtype == log_prob_grad.dtype == torch.bfloat16
    expected = _float64_reference(logits.float(), tokens, weights)
    _close(entropy, expected[0], "entropy", 1e-5)
    _close(log_probs, expected[1], "log_probs", 1e-5)
    _close(log_prob_grad, expected[3], "log_prob grad", 1e-2)


ROWS, LOCAL_VOCAB, TP = 7, 40, 2


def _tp_inputs():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(ROWS, TP * LOCAL_VOCAB, generator=generator) * 5
    logits[0, :LOCAL_VOCAB] = float("-inf")  # rank 0's shard holds no finite logit in row 0
    logits[1, 3] = 1e4  # one extreme logit
    tokens = torch.randint(0, TP * LOCAL_VOCAB, (ROWS,), generator=generator)
    tokens[0], tokens[2], tokens[3] = TP * LOCAL_VOCAB - 1, 0, LOCAL_VOCAB  # the first id of each shard
    return logits, tokens, torch.linspace(-1, 2, ROWS)


def _tp2_rank(rank, world_size):
    from megaseg.config.parallel import ParallelConfig
    from megaseg.parallel import initialize_parallel

    context = initialize_parallel(ParallelConfig(tensor_model_parallel_size=TP), seed=0)
    logits, tokens, weights = _tp_inputs()
    shard = logits[:, context.tp_rank * LOCAL_VOCAB:(context.tp_rank + 1) * LOCAL_VOCAB].contiguous()
    return _vocab_parallel(shard, tokens, weights, context.tp_group, "triton")


@pytest.mark.distributed
def test_tp2_kernels_equal_the_dense_float64_computation(monkeypatch):
    # The combine over the group is device-agnostic: the ranks run on CPU (gloo, the interpreter) on any machine, so a
    # one-GPU machine, where two ranks could not each own a GPU, runs this test too. The kernels on CUDA are the
    # TP=1 tests' business.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_distributed(_tp2_rank, TP, timeout=150)
    logits, tokens, weights = _tp_inputs()
    expected = _float64_reference(logits, tokens, weights)
    for rank in range(TP):
        _close(results[rank][0], expected[0], f"entropy rank {rank}", 1e-4)
        _close(results[rank][1], expected[1], f"log_probs rank {rank}", 1e-4)
    # Each rank's gradient is its slice of the dense gradient.
    _close(torch.cat([r[2] for r in results], dim=-1), expected[2], "entropy grad", 1e-4)
    _close(torch.cat([r[3] for r in results], dim=-1), expected[3], "log_prob grad", 1e-4)
