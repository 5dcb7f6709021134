"""Per-position entropy and token log-probabilities from logits, in fp32, chunked over positions.

Logits for a long rollout are huge ([batch, seq, vocab] = 64 x 2048 x 128256 is 16.8e9 values), so neither function
materialises an fp32 copy of the whole tensor. Both flatten the leading dimensions to ``[positions, vocab]`` and walk
over chunks of ``chunk_size`` positions; the extra memory at any time is about one or two ``[chunk_size, vocab]`` fp32
buffers (entropy: two, log-probs: one) plus the ``[positions]`` output.

Indexing (see docs/method.md): ``logits[..., j, :]`` is the distribution that predicts token ``j + 1``, so
``token_entropy(logits)[..., j]`` is the entropy used to decide whether response token ``j`` ends a segment, and
``token_log_probs(logits, tokens)[..., j]`` is the log-prob of ``tokens[..., j]`` (the caller passes the tokens shifted
by one: ``tokens = input_ids[..., 1:]`` with ``logits[..., :-1, :]``).

A non-contiguous ``logits`` whose leading dimensions cannot be flattened as a view (e.g. a transposed megatron
``[seq, batch, vocab]`` output) is copied once, in its own dtype, by ``reshape``; pass a contiguous tensor to avoid
that.
"""

from __future__ import annotations

import torch

from megaseg.algorithms.validation import check_shape

# Target size of one fp32 [chunk, vocab] work buffer when the caller does not choose: small enough to be noise next to
# the logits themselves, large enough that the per-chunk kernel launches do not dominate on GPU.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one fp32 ``[chunk, vocab]`` buffer is about ``DEFAULT_CHUNK_BYTES``."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_size))


def _resolve_chunk_size(chunk_size: int | None, vocab_size: int) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None (automatic), got {chunk_size!r}")
    return chunk_size


def _flat_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    return logits.reshape(-1, logits.shape[-1])


def _shifted_fp32(chunk: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``float32(chunk) - shift`` in one fresh fp32 buffer.

    For fp32 input ``.float()`` is the caller's tensor itself, which must not be modified, so subtract out of place;
    otherwise ``.float()`` already made a private copy and the subtraction can reuse it.
    """
    if chunk.dtype == torch.float32:
        return chunk - shift
    return chunk.float().sub_(shift)


@torch.no_grad()
def _entropy_chunk_inplace(chunk: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a [chunk, vocab] block using two fp32 buffers of that size.

    H = log Z - sum(exp(s) * s) / Z with s = x - max(x) and Z = sum(exp(s)): the max shift keeps exp in range and
    Z >= 1, so the log and the division are safe.
    """
    shifted = _shifted_fp32(chunk, chunk.amax(dim=-1, keepdim=True).float())
    weights = shifted.exp()
    partition = weights.sum(dim=-1)
    # A -inf logit (a masked vocabulary entry) has weight 0; clamp it to a finite value so 0 * -inf is 0, not NaN.
    shifted.clamp_(min=torch.finfo(torch.float32).min)
    weighted = weights.mul_(shifted).sum(dim=-1)
    return partition.log() - weighted / partition


def _entropy_chunk_differentiable(chunk: torch.Tensor) -> torch.Tensor:
    """Same value as ``_entropy_chunk_inplace`` built from out-of-place ops, so autograd can differentiate it."""
    log_probs = torch.log_softmax(chunk.float(), dim=-1)
    # A -inf logit (a masked vocabulary entry) contributes 0 * -inf. Zero its log-prob with `where` rather than clamping
    # it to the most negative float: a clamped value times an upstream gradient > 1 overflows to -inf, and the product
    # rule then multiplies it by the entry's zero probability gradient, giving NaN for the whole row.
    safe_log_probs = torch.where(torch.isfinite(log_probs), log_probs, torch.zeros_like(log_probs))
    return -(log_probs.exp() * safe_log_probs).sum(dim=-1)


def token_entropy(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last dimension.

    Args:
        logits: ``[..., vocab]``, any float dtype (bf16/fp16/fp32); the math runs in fp32.
        chunk_size: positions (flattened leading entries) per chunk; ``None`` picks ``default_chunk_size(vocab)``.
            Pass a value >= the number of positions to compute everything in one chunk.

    Returns:
        ``[...]`` fp32 entropies. Differentiable when ``logits`` requires grad (then the chunks use out-of-place ops
        and autograd keeps their intermediates, so the memory bound above applies to the no-grad case only).
    """
    flat = _flat_logits(logits)
    chunk = _resolve_chunk_size(chunk_size, flat.shape[1])
    if torch.is_grad_enabled() and flat.requires_grad:
        pieces = [_entropy_chunk_differentiable(flat[s : s + chunk]) for s in range(0, flat.shape[0], chunk)]
        out = torch.cat(pieces) if pieces else flat.new_empty(0, dtype=torch.float32)
        return out.reshape(logits.shape[:-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        out[start : start + chunk] = _entropy_chunk_inplace(flat[start : start + chunk])
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def _log_partition(chunk: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) per row of a [chunk, vocab] block with one fp32 buffer (exp is taken in place)."""
    row_max = chunk.amax(dim=-1, keepdim=True).float()
    return _shifted_fp32(chunk, row_max).exp_().sum(dim=-1).log_() + row_max.squeeze(-1)


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log_softmax(logits)[token] per position, chunked in forward AND backward.

    Autograd through ``log_softmax`` would keep an fp32 [positions, vocab] tensor alive for the backward pass; here only
    the logits themselves (already alive in the model) and one fp32 scalar per position are saved, and the softmax is
    recomputed chunk by chunk in backward.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
        log_partition = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        picked = flat.gather(1, tokens[:, None]).squeeze(1).float()
        for start in range(0, flat.shape[0], chunk):
            log_partition[start : start + chunk] = _log_partition(flat[start : start + chunk])
        ctx.save_for_backward(flat, tokens, log_partition)
        ctx.chunk = chunk
        return picked - log_partition

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat, tokens, log_partition = ctx.saved_tensors
        grad = torch.empty_like(flat)
        grad_out = grad_out.float()
        for start in range(0, flat.shape[0], ctx.chunk):
            end = start + ctx.chunk
            # d log p[tok] / d x = onehot(tok) - softmax(x)
            probs = _shifted_fp32(flat[start:end], log_partition[start:end, None]).exp_()
            probs.mul_(-grad_out[start:end, None])
            probs.scatter_add_(1, tokens[start:end, None], grad_out[start:end, None])
            grad[start:end] = probs
        return grad, None, None


def token_log_probs(
    logits: torch.Tensor, tokens: torch.Tensor, chunk_size: int | None = None, validate: bool = True
) -> torch.Tensor:
    """Log-probability of ``tokens[..., j]`` under ``softmax(logits[..., j, :])``, in fp32.

    Args:
        logits: ``[..., vocab]`` any float dtype.
        tokens: ``[...]`` integer token ids in ``[0, vocab)``, already aligned with ``logits`` (shifted by the caller).
        chunk_size: as in ``token_entropy``.
        validate: check the token ids are in range (one host-device sync).

    Returns:
        ``[...]`` fp32 log-probs, differentiable w.r.t. ``logits`` with chunked memory in backward too.
    """
    flat = _flat_logits(logits)
    check_shape("tokens", tokens, logits.shape[:-1], "logits without its vocabulary dimension")
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    flat_tokens = tokens.reshape(-1).long()
    vocab = flat.shape[1]
    if validate and flat_tokens.numel() > 0:
        low, high = int(flat_tokens.min()), int(flat_tokens.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"tokens must lie in [0, {vocab}) (the vocabulary), got values in [{low}, {high}]")
    chunk = _resolve_chunk_size(chunk_size, vocab)
    out = _ChunkedTokenLogProbs.apply(flat, flat_tokens, chunk)
    return out.reshape(tokens.shape)
