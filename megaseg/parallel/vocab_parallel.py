"""Entropy and token log-probs from tensor-parallel logit shards, without ever gathering the vocabulary.

With tensor parallelism the output layer leaves rank r holding ``logits[..., r*V/tp : (r+1)*V/tp]``. Gathering the
full vocabulary would cost every rank a ``[positions, V]`` copy (2048 x 128256 fp32 is 1 GiB per sequence). Both
quantities only need three reductions over the vocabulary, so each rank reduces its own shard and the partial
results are all-reduced over the tensor-parallel group:

    M = max_v z_v                                  (all-reduce MAX)
    Z = sum_v exp(z_v - M)                         (all-reduce SUM)
    A = sum_v exp(z_v - M) * (z_v - M)             (all-reduce SUM, entropy)   -> H = log Z - A / Z
    z_tok (only the rank owning the token adds it) (all-reduce SUM, log-probs) -> log p = z_tok - M - log Z

All math is fp32. Positions are processed in chunks of ``chunk_size`` so that the extra memory is one or two fp32
``[chunk, V/tp]`` buffers plus a few fp32 values per position; the all-reduces are batched over ALL positions (two
per call, whatever the number of chunks), so chunking adds no communication latency.

Gradients: both ops are ``torch.autograd.Function``s whose backward needs no communication. The outputs are
replicated across the tensor-parallel group, each rank back-propagates the same output gradient into its own shard,
and the gradient of shard r is exactly the slice r of the dense gradient (the ColumnParallelLinear that produced the
shard all-reduces its input gradient itself, as with megatron's ``vocab_parallel_cross_entropy``):

    d log p_tok / d z_v = 1[v == tok] - p_v
    d H / d z_v         = -p_v * (log p_v + H)

With ``kernels`` selecting Triton (``megaseg.kernels.dispatch``), both ops read each logits shard once instead of
twice: ``megaseg.kernels.vocab_partials`` gives per position the shard max ``m``, ``S = sum exp(z - m)``,
``A = sum exp(z - m) (z - m)`` and the target logit, combined here by one MAX and one SUM all-reduce (each shard's sums
rescaled by ``exp(m - M)``); the backward kernels recompute the probabilities, so nothing vocab-sized is stored.

Indexing follows ``megaseg.algorithms.entropy``: ``logits[..., j, :]`` predicts token ``j + 1``; callers pass tokens
already shifted. Every rank of ``tp_group`` must call these functions with the same leading shape and chunk size.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megaseg.kernels.dispatch import use_triton

# Target size of one fp32 [chunk, vocab / tp] work buffer when the caller does not choose one: the budget the dense
# ``megaseg.algorithms.entropy`` uses for a full-vocabulary chunk. (Not imported from there: this module must not
# pull in the whole algorithms package, and megaseg.algorithms must not import the parallel layer either.)
DEFAULT_CHUNK_BYTES = 256 * 2**20


def default_chunk_size(local_vocab_size: int) -> int:
    """Positions per chunk so that one fp32 ``[chunk, local_vocab]`` buffer is about ``DEFAULT_CHUNK_BYTES``."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * local_vocab_size))

def _group_size_and_rank(tp_group: Any) -> tuple[int, int]:
    """``tp_group=None`` means no tensor parallelism (the shard is the whole vocabulary)."""
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _all_reduce(tensor: torch.Tensor, op: Any, tp_group: Any) -> None:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


def _flatten(logits_shard: torch.Tensor) -> torch.Tensor:
    if logits_shard.dim() < 1 or logits_shard.shape[-1] == 0:
        raise ValueError(
            f"logits_shard must have a non-empty last (vocabulary shard) dimension, got shape {tuple(logits_shard.shape)}"
        )
    if not logits_shard.is_floating_point():
        raise ValueError(f"logits_shard must be a floating-point tensor, got dtype {logits_shard.dtype}")
    return logits_shard.reshape(-1, logits_shard.shape[-1])


def _resolve_chunk_size(chunk_size: Optional[int], local_vocab_size: int) -> int:
    if chunk_size is None:
        return default_chunk_size(local_vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None (automatic), got {chunk_size!r}")
    return chunk_size


def _chunks(num_positions: int, chunk: int):
    for start in range(0, num_positions, chunk):
        yield start, min(start + chunk, num_positions)


@torch.no_grad()
def _global_row_max(flat: torch.Tensor, chunk: int, tp_group: Any) -> torch.Tensor:
    """``[positions]`` fp32 max over the whole vocabulary (every shard), one all-reduce."""
    row_max = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start, end in _chunks(flat.shape[0], chunk):
        row_max[start:end] = flat[start:end].amax(dim=-1).float()
    _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
    return row_max


def _shifted_fp32(block: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``float32(block) - shift`` in one fresh buffer; fp32 input is the caller's tensor, so never in place."""
    if block.dtype == torch.float32:
        return block - shift
    return block.float().sub_(shift)


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, chunk: int, tp_group: Any) -> torch.Tensor:
        row_max = _global_row_max(flat, chunk, tp_group)
        # sums[0] = Z (partition), sums[1] = A (sum of exp(s) * s), reduced together in one all-reduce.
        sums = torch.empty(2, flat.shape[0], dtype=torch.float32, device=flat.device)
        for start, end in _chunks(flat.shape[0], chunk):
            shifted = _shifted_fp32(flat[start:end], row_max[start:end, None])
            weights = shifted.exp()
            sums[0, start:end] = weights.sum(dim=-1)
            # A -inf logit (a masked entry) has weight 0; clamp it finite so that 0 * -inf is 0, not NaN.
            shifted.clamp_(min=torch.finfo(torch.float32).min)
            sums[1, start:end] = weights.mul_(shifted).sum(dim=-1)
            del shifted, weights
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
        log_partition = sums[0].log()
        entropy = log_partition - sums[1] / sums[0]
        ctx.save_for_backward(flat, row_max + log_partition, entropy)
        ctx.chunk = chunk
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor):
        flat, log_normalizer, entropy = ctx.saved_tensors
        grad = torch.empty_like(flat)
        grad_entropy = grad_entropy.float()
        for start, end in _chunks(flat.shape[0], ctx.chunk):
            log_probs = _shifted_fp32(flat[start:end], log_normalizer[start:end, None])
            probs = log_probs.exp()
            log_probs.clamp_(min=torch.finfo(torch.float32).min)
            # dH/dz_v = -p_v (log p_v + H), scaled by the incoming gradient.
            log_probs.add_(entropy[start:end, None]).mul_(probs).mul_(-grad_entropy[start:end, None])
            grad[start:end] = log_probs
            del log_probs, probs
        return grad, None, None


class _VocabParallelTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, tokens: torch.Tensor, vocab_start: int, chunk: int, tp_group: Any):
        row_max = _global_row_max(flat, chunk, tp_group)
        local_tokens = tokens - vocab_start
        owned_mask = (local_tokens >= 0) & (local_tokens < flat.shape[1])
        local_tokens = local_tokens.masked_fill(~owned_mask, 0)
        # sums[0] = Z; sums[1] = the token's logit, contributed by the one rank whose shard holds it.
        sums = torch.empty(2, flat.shape[0], dtype=torch.float32, device=flat.device)
        sums[1] = flat.gather(1, local_tokens[:, None]).squeeze(1).float().masked_fill_(~owned_mask, 0.0)
        for start, end in _chunks(flat.shape[0], chunk):
            sums[0, start:end] = _shifted_fp32(flat[start:end], row_max[start:end, None]).exp_().sum(dim=-1)
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
        log_normalizer = row_max + sums[0].log()
        ctx.save_for_backward(flat, local_tokens, owned_mask, log_normalizer)
        ctx.chunk = chunk
        return sums[1] - log_normalizer

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor):
        flat, local_tokens, owned_mask, log_normalizer = ctx.saved_tensors
        grad = torch.empty_like(flat)
        grad_log_probs = grad_log_probs.float()
        owned_grad = grad_log_probs.masked_fill(~owned_mask, 0.0)
        for start, end in _chunks(flat.shape[0], ctx.chunk):
            # d log p_tok / d z_v = 1[v == tok] - p_v; the indicator only on the rank that owns the token.
            probs = _shifted_fp32(flat[start:end], log_normalizer[start:end, None]).exp_()
            probs.mul_(-grad_log_probs[start:end, None])
            probs.scatter_add_(1, local_tokens[start:end, None], owned_grad[start:end, None])
            grad[start:end] = probs
            del probs
        return grad, None, None, None, None


def _combine_partials(partials: torch.Tensor, tp_group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-normalizer ``M + log S``, entropy ``log S - A / S``, target logit) ``[positions]`` from every shard's
    ``shard_partials`` ``[positions, 4]`` (``m, S, A, z_target``): one MAX and one SUM all-reduce."""
    shard_max = partials[:, 0]
    row_max = shard_max.clone()
    _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
    offset = shard_max - row_max
    scale = offset.exp()
    sums = torch.stack([partials[:, 1] * scale, (partials[:, 2] + offset * partials[:, 1]) * scale, partials[:, 3]])
    _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
    log_partition = sums[0].log()
    return row_max + log_partition, log_partition - sums[1] / sums[0], sums[2]


class _TritonVocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, tp_group: Any) -> torch.Tensor:
        from megaseg.kernels.vocab_partials import shard_partials

        log_normalizer, entropy, _ = _combine_partials(shard_partials(flat), tp_group)
        ctx.save_for_backward(flat, log_normalizer, entropy)
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor):
        from megaseg.kernels.vocab_partials import shard_grad

        flat, log_normalizer, entropy = ctx.saved_tensors
        return shard_grad(flat, log_normalizer, entropy=entropy, grad_entropy=grad_entropy), None


class _TritonVocabParallelTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, tokens: torch.Tensor, vocab_start: int, tp_group: Any) -> torch.Tensor:
        from megaseg.kernels.vocab_partials import shard_partials

        log_normalizer, _, target = _combine_partials(shard_partials(flat, tokens, vocab_start), tp_group)
        ctx.save_for_backward(flat, tokens, log_normalizer)
        ctx.vocab_start = vocab_start
        return target - log_normalizer

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor):
        from megaseg.kernels.vocab_partials import shard_grad

        flat, tokens, log_normalizer = ctx.saved_tensors
        grad = shard_grad(flat, log_normalizer, tokens=tokens, vocab_start=ctx.vocab_start, grad_log_probs=grad_log_probs)
        return grad, None, None, None


class _TritonVocabParallelLogProbsAndEntropy(torch.autograd.Function):
    """Both outputs from one read of the shard, and one backward pass for both gradients."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, tokens: torch.Tensor, vocab_start: int, tp_group: Any):
        from megaseg.kernels.vocab_partials import shard_partials

        log_normalizer, entropy, target = _combine_partials(shard_partials(flat, tokens, vocab_start), tp_group)
        ctx.save_for_backward(flat, tokens, log_normalizer, entropy)
        ctx.vocab_start = vocab_start
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: its term is skipped
        return target - log_normalizer, entropy

    @staticmethod
    def backward(ctx, grad_log_probs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        from megaseg.kernels.vocab_partials import shard_grad

        flat, tokens, log_normalizer, entropy = ctx.saved_tensors
        grad = shard_grad(flat, log_normalizer, tokens=tokens, vocab_start=ctx.vocab_start,
                          grad_log_probs=grad_log_probs, entropy=entropy, grad_entropy=grad_entropy)
        return grad, None, None, None


def vocab_parallel_entropy(
    logits_shard: torch.Tensor, tp_group: Any, chunk_size: Optional[int] = None
) -> torch.Tensor:
    """Entropy (nats) of the softmax over the FULL vocabulary, from this rank's vocabulary shard.

    Args:
        logits_shard: ``[..., vocab / tp]`` this rank's slice of the logits (any float dtype; math in fp32).
        tp_group: the tensor-parallel process group the vocabulary is split over; None for no tensor parallelism.
        chunk_size: positions per chunk of the torch path; None picks ``default_chunk_size(vocab / tp)`` (the Triton
            path reads each row in blocks and needs no chunks).

    Returns:
        ``[...]`` fp32 entropies, identical on every rank of ``tp_group``; differentiable w.r.t. ``logits_shard``.
    """
    flat = _flatten(logits_shard)
    chunk = _resolve_chunk_size(chunk_size, flat.shape[1])
    if use_triton(flat):
        entropy = _TritonVocabParallelEntropy.apply(flat, tp_group)
    else:
        entropy = _VocabParallelEntropy.apply(flat, chunk, tp_group)
    return entropy.reshape(logits_shard.shape[:-1])


def _check_tokens(tokens: torch.Tensor, logits_shard: torch.Tensor, global_vocab_size: int, validate: bool) -> None:
    if tuple(tokens.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but logits_shard without its vocabulary dimension has shape "
            f"{tuple(logits_shard.shape[:-1])}; pass one token per logit row (already shifted by one)"
        )
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if validate and tokens.numel() > 0:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= global_vocab_size:
            raise ValueError(
                f"tokens must lie in [0, {global_vocab_size}) (the full vocabulary), got values in [{low}, {high}]"
            )


def vocab_parallel_log_probs(
    logits_shard: torch.Tensor,
    tokens: torch.Tensor,
    tp_group: Any,
    chunk_size: Optional[int] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Log-probability of ``tokens`` (ids in the FULL vocabulary) from this rank's vocabulary shard of the logits.

    Rank r of ``tp_group`` holds vocabulary ids ``[r * V/tp, (r + 1) * V/tp)`` (megatron's ``VocabUtility``, the
    layout ``ColumnParallelLinear`` produces).

    Args:
        logits_shard: ``[..., vocab / tp]`` any float dtype; math in fp32.
        tokens: ``[...]`` integer ids in ``[0, vocab)``, aligned with ``logits_shard`` (shifted by the caller).
        tp_group: the tensor-parallel process group; None for no tensor parallelism.
        chunk_size: positions per chunk; None picks ``default_chunk_size(vocab / tp)``.
        validate: check the token ids are in range (one host-device sync).

    Returns:
        ``[...]`` fp32 log-probs, identical on every rank; differentiable w.r.t. ``logits_shard`` (chunked backward).
    """
    from megatron.core.tensor_parallel.utils import VocabUtility

    flat = _flatten(logits_shard)
    tp_size, tp_rank = _group_size_and_rank(tp_group)
    local_vocab = flat.shape[1]
    _check_tokens(tokens, logits_shard, local_vocab * tp_size, validate)
    vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(local_vocab, tp_rank, tp_size)
    chunk = _resolve_chunk_size(chunk_size, local_vocab)
    if use_triton(flat):
        log_probs = _TritonVocabParallelTokenLogProbs.apply(flat, tokens.reshape(-1).long(), vocab_start, tp_group)
    else:
        log_probs = _VocabParallelTokenLogProbs.apply(flat, tokens.reshape(-1).long(), vocab_start, chunk, tp_group)
    return log_probs.reshape(tokens.shape)


def vocab_parallel_log_probs_and_entropy(
    logits_shard: torch.Tensor,
    tokens: torch.Tensor,
    tp_group: Any,
    chunk_size: Optional[int] = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vocab_parallel_log_probs(...), vocab_parallel_entropy(...))`` of one logits shard: with the Triton kernels
    both come from one read of the shard (and one backward pass); with torch they are the two functions above."""
    if not use_triton(_flatten(logits_shard)):
        return (vocab_parallel_log_probs(logits_shard, tokens, tp_group, chunk_size, validate),
                vocab_parallel_entropy(logits_shard, tp_group, chunk_size))
    from megatron.core.tensor_parallel.utils import VocabUtility

    flat = _flatten(logits_shard)
    tp_size, tp_rank = _group_size_and_rank(tp_group)
    _check_tokens(tokens, logits_shard, flat.shape[1] * tp_size, validate)
    vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(flat.shape[1], tp_rank, tp_size)
    log_probs, entropy = _TritonVocabParallelLogProbsAndEntropy.apply(flat, tokens.reshape(-1).long(), vocab_start,
                                                                      tp_group)
    return log_probs.reshape(tokens.shape), entropy.reshape(tokens.shape)
