"""One pass over a ``[tokens, vocab_shard]`` logits block: the per-token partial softmax sums of this shard, and the
backward of the entropy / target log-prob that recomputes the probabilities block by block instead of storing them.

Per token (row) the forward reads the shard once, in blocks of ``BLOCK_V`` logits, with an online rescale when the
running max grows:

    m = max_v z_v                        S = sum_v exp(z_v - m)
    A = sum_v exp(z_v - m) * (z_v - m)   z_target (if the target id falls in this shard; 0 otherwise)

``A`` is the issue's ``W = sum exp(z - m) z`` shifted by ``m`` (``W = A + m S``): the entropy ``log S - A / S`` then
never subtracts two numbers of the logits' magnitude, which ``m + log S - W / S`` would at extreme logits. Shards are
combined by the caller over the tensor-parallel group (``megaseg.parallel.vocab_parallel``): with ``M = max_s m_s``,
``S = sum_s exp(m_s - M) S_s`` and ``A = sum_s exp(m_s - M) (A_s + (m_s - M) S_s)``; then ``H = log S - A / S`` and
``log p = z_target - M - log S``.

Backward, per row and block (``lse = M + log S``, ``p_v = exp(z_v - lse)``):
    d log p / d z_v = g (1[v == target] - p_v)         d H / d z_v = -g p_v (z_v - lse + H)
A ``-inf`` logit (a masked entry) has weight 0 and contributes 0 to ``A`` and to the entropy's gradient, as in the
torch path. All math is fp32 whatever the logits' dtype; gradients are written in the logits' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
BLOCK_V = 2048


@triton.jit
def _shard_partials_kernel(logits_ptr, row_stride, tokens_ptr, vocab_start, vocab, partials_ptr,
                           HAS_TOKENS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((), -3.4028234663852886e38, tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    a = tl.zeros((), dtype=tl.float32)
    for block_start in range(0, vocab, BLOCK_V):
        cols = block_start + lanes
        z = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        # Rescale the running sums to the new max; (m - m_new) S is 0, not 0 * -inf, before the first weight.
        a = alpha * (a + tl.where(s > 0, (m - m_new) * s, 0.0))
        s = alpha * s
        shifted = z - m_new
        w = tl.exp(shifted)
        s += tl.sum(w, axis=0)
        # A -inf logit has weight 0; clamped finite, its term is 0 * finite = 0, not 0 * -inf = NaN.
        a += tl.sum(w * tl.maximum(shifted, -3.4028234663852886e38), axis=0)
        m = m_new
    out = partials_ptr + row * 4
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, a)
    if HAS_TOKENS:
        local = tl.load(tokens_ptr + row) - vocab_start
        owned = (local >= 0) & (local < vocab)
        target = tl.load(base + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
        tl.store(out + 3, tl.where(owned, target, 0.0))
    else:
        tl.store(out + 3, 0.0)


@triton.jit
def _shard_grad_kernel(logits_ptr, row_stride, grad_ptr, lse_ptr, grad_log_probs_ptr, grad_entropy_ptr, entropy_ptr,
                       tokens_ptr, vocab_start, vocab, LOG_PROB: tl.constexpr, ENTROPY: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    out = grad_ptr + row * vocab
    lse = tl.load(lse_ptr + row)
    if LOG_PROB:
        g_log_prob = tl.load(grad_log_probs_ptr + row).to(tl.float32)
        local = tl.load(tokens_ptr + row) - vocab_start
    if ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)
    lanes = tl.arange(0, BLOCK_V)
    for block_start in range(0, vocab, BLOCK_V):
        cols = block_start + lanes
        inside = cols < vocab
        log_p = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) - lse
        p = tl.exp(log_p)
        grad = tl.zeros([BLOCK_V], dtype=tl.float32)
        if LOG_PROB:
            grad += tl.where(cols == local, g_log_prob, 0.0) - g_log_prob * p
        if ENTROPY:
            grad += -g_entropy * p * (tl.maximum(log_p, -3.4028234663852886e38) + entropy)
        tl.store(out + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _rows(flat: torch.Tensor) -> torch.Tensor:
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def shard_partials(flat: torch.Tensor, tokens: torch.Tensor | None = None, vocab_start: int = 0) -> torch.Tensor:
    """``[rows, 4]`` fp32 ``(m, S, A, z_target)`` of each row of ``flat`` ``[rows, vocab_shard]`` (module docstring);
    ``tokens`` ``[rows]`` int ids in the FULL vocabulary (``z_target`` = 0 where this shard, which starts at id
    ``vocab_start``, does not hold the token; 0 everywhere when ``tokens`` is None)."""
    flat = _rows(flat)
    rows, vocab = flat.shape
    partials = torch.empty(rows, 4, dtype=torch.float32, device=flat.device)
    if rows:
        token_arg = tokens.to(torch.int64).contiguous() if tokens is not None else partials
        _shard_partials_kernel[(rows,)](flat, flat.stride(0), token_arg, vocab_start, vocab, partials,
                                        HAS_TOKENS=tokens is not None, BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)))
    return partials


def shard_grad(flat: torch.Tensor, log_normalizer: torch.Tensor, *, tokens: torch.Tensor | None = None,
               vocab_start: int = 0, grad_log_probs: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
               grad_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, vocab_shard]`` gradient through this shard (the logits' dtype) of the target log-probs
    (``g (1[v == target] - p_v)``, the indicator only where this shard holds the target; needs ``tokens`` and
    ``grad_log_probs``), of the entropies (``-g p_v (log p_v + H)``; needs ``entropy`` and ``grad_entropy``), or of
    both summed, in one pass. ``log_normalizer`` ``[rows]`` is ``M + log S`` over the whole vocabulary."""
    flat = _rows(flat)
    rows, vocab = flat.shape
    log_prob, with_entropy = grad_log_probs is not None, grad_entropy is not None
    assert log_prob or with_entropy, "nothing to differentiate"
    grad = torch.empty(rows, vocab, dtype=flat.dtype, device=flat.device)
    if rows:
        dummy = log_normalizer

        def arg(tensor):
            return tensor.contiguous() if tensor is not None else dummy

        _shard_grad_kernel[(rows,)](
            flat, flat.stride(0), grad, log_normalizer.contiguous(), arg(grad_log_probs), arg(grad_entropy),
            arg(entropy), tokens.to(torch.int64).contiguous() if log_prob else dummy, vocab_start, vocab,
            LOG_PROB=log_prob, ENTROPY=with_entropy, BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)))
    return grad
