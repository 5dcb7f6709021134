import math

import algo_reference as ref
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megaseg.algorithms.entropy import default_chunk_size, token_entropy, token_log_probs


def _naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


@given(
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 40),
    st.sampled_from([None, 1, 2, 5, 1000]),
    st.floats(0.1, 30.0),
    st.integers(0, 2**31 - 1),
)
def test_entropy_chunked_equals_unchunked_equals_naive(batch, seq, vocab, chunk, scale, seed):
    logits = torch.randn(batch, seq, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    chunked = token_entropy(logits, chunk_size=chunk)
    whole = token_entropy(logits, chunk_size=batch * seq)
    assert chunked.shape == (batch, seq) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    torch.testing.assert_close(chunked.double(), _naive_entropy(logits), rtol=1e-5, atol=1e-5)


def test_entropy_matches_python_reference_and_bounds():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) * 3
    out = token_entropy(logits, chunk_size=3)
    expected = [ref.entropy_of(row) for row in logits.tolist()]
    assert out.tolist() == pytest.approx(expected, abs=1e-5)
    assert token_entropy(torch.zeros(2, 50)).tolist() == pytest.approx([math.log(50)] * 2, abs=1e-5)
    peaked = torch.full((1, 50), -1e4)
    peaked[0, 3] = 1e4
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_low_precision_input_is_computed_in_fp32(dtype):
    logits = (torch.randn(3, 5, 300, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    out = token_entropy(logits, chunk_size=4)
    assert out.dtype == torch.float32
    # Same as upcasting the (already rounded) low-precision logits first: no extra rounding inside.
    torch.testing.assert_close(out.double(), _naive_entropy(logits.float()), rtol=1e-5, atol=1e-5)


def test_entropy_with_masked_vocabulary_entries():
    logits = torch.tensor([[0.0, 1.0, -math.inf, 2.0], [-math.inf, 0.0, -math.inf, 0.0]])
    out = token_entropy(logits, chunk_size=1)
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx([ref.entropy_of(row) for row in logits.tolist()], abs=1e-6)
    assert out[1].item() == pytest.approx(math.log(2), abs=1e-6)


def test_entropy_gradient_matches_autograd_of_naive_formula():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = logits.float().clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    token_entropy(a, chunk_size=2).sum().backward()
    _naive_entropy(b).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


def test_entropy_gradient_is_finite_with_masked_entries_and_large_upstream_gradient():
    # Regression: clamping -inf log-probs to the most negative float overflowed once scaled by an upstream
    # gradient > 1, turning the whole row's gradient into NaN.
    logits = torch.tensor([[0.5, -math.inf, 1.5, -0.25], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    finite = torch.isfinite(logits)
    a = logits.float().clone().requires_grad_(True)
    (3.0 * token_entropy(a, chunk_size=1)).sum().backward()
    assert torch.isfinite(a.grad).all()
    # Reference: the entropy of the finite entries alone, differentiated by autograd in float64.
    reference_grads = []
    for row, keep in zip(logits, finite):
        sub = row[keep].clone().requires_grad_(True)
        (3.0 * _naive_entropy(sub)).backward()
        full = torch.zeros_like(row)
        full[keep] = sub.grad
        reference_grads.append(full)
    torch.testing.assert_close(a.grad.double(), torch.stack(reference_grads), rtol=1e-4, atol=1e-5)


def test_entropy_empty_and_default_chunk():
    assert token_entropy(torch.zeros(0, 5)).shape == (0,)
    assert default_chunk_size(128256) == 256 * 2**20 // (4 * 128256)
    assert default_chunk_size(10**12) == 1


@given(
    st.integers(1, 3), st.integers(1, 8), st.integers(2, 30), st.sampled_from([None, 1, 3, 1000]), st.integers(0, 999)
)
def test_log_probs_chunked_match_log_softmax(batch, seq, vocab, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen) * 5
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    out = token_log_probs(logits, tokens, chunk_size=chunk)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert out.dtype == torch.float32 and out.shape == tokens.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_log_probs_python_reference():
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([0, 5, 2])
    out = token_log_probs(logits, tokens, chunk_size=2)
    expected = [ref.log_prob_of(row, int(t)) for row, t in zip(logits.tolist(), tokens)]
    assert out.tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_log_probs_gradient_matches_autograd(dtype, chunk):
    gen = torch.Generator().manual_seed(4)
    base = (torch.randn(2, 5, 13, generator=gen) * 3).to(dtype)
    tokens = torch.randint(0, 13, (2, 5), generator=gen)
    weights = torch.randn(2, 5, generator=gen)
    ours = base.clone().requires_grad_(True)
    (token_log_probs(ours, tokens, chunk_size=chunk) * weights).sum().backward()
    theirs = base.float().clone().requires_grad_(True)
    (torch.log_softmax(theirs, -1).gather(-1, tokens[..., None]).squeeze(-1) * weights).sum().backward()
    assert ours.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.grad.float(), theirs.grad, rtol=tol, atol=tol)


def test_log_probs_errors():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 5\).*\[-1, 5\]"):
        token_log_probs(logits, torch.tensor([[0, 1, 5], [-1, 0, 0]]))
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 2\)"):
        token_log_probs(logits, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        token_log_probs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        token_entropy(logits, chunk_size=0)
    with pytest.raises(ValueError, match="floating-point"):
        token_entropy(torch.zeros(2, 3, dtype=torch.long))
