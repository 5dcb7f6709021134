"""Batched sampling from the megatron actor: prompts in, prompt + response SequenceBatch out.

The loop, per decode step: feed the new column(s) through the pipeline (``StageRunner``), sample the next token of
every row on the sampling rank (``sample_next_tokens``), share it with every model-parallel rank, write it into the
token buffer (``TokenBuffer.record``: prompt rows keep their prompt token, finished rows their pad), stop once every
row has produced a stop token or ``max_new_tokens`` tokens.

Backends (``ppo.generation_backend``):
- ``kv_cache``: megatron-core's static KV cache. The first forward runs the columns every prompt has (the prefill);
  each later step feeds one column and attends over the cached keys/values. With megaseg's SDPAttention (the local
  spec) the prompts' ends are aligned behind a masked leading pad, so the prefill covers every whole prompt; with
  attention that goes by mask type (TransformerEngine) prompts start at column 0 and longer ones are fed their
  remaining tokens one step at a time (see ``token_buffer``).
- ``full_forward``: no cache; every step runs the whole sequence so far. O(steps x length) work: the slow baseline
  of the benchmark and a fallback for a megatron-core release whose cache API changed.

Every rank of a model-parallel group must call ``generate`` with the same prompts and settings (data-parallel
ranks pass their own prompts). Every rank passes a seeded ``generator`` when sampling, but only the sampling rank
(tensor-parallel rank 0 of the last pipeline stage) draws from it, so its state advances there alone; seed it per
data-parallel rank so that replicas do not share their random draws.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core.utils import get_attr_wrapped_model

from megaseg.config.policy import GENERATION_BACKENDS
from megaseg.data.batch import PromptBatch
from megaseg.generation.kv_cache import StaticKVCache
from megaseg.generation.output import GenerationOutput, build_output
from megaseg.generation.sampling import sample_next_tokens
from megaseg.generation.settings import SamplingSettings
from megaseg.generation.stage_runner import StageRunner
from megaseg.generation.token_buffer import TokenBuffer
from megaseg.models.attention import SDPAttention
from megaseg.parallel.initialize import ParallelContext


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """megatron only uses the KV cache when the model is not training; the caller's mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def attention_takes_masks(model: torch.nn.Module) -> bool:
    """True when every attention layer of this stage honours an explicit mask (megaseg's SDPAttention), so the
    token buffer may align the prompts' ends behind masked leading pad (see ``token_buffer``). megatron's fused
    softmax and TransformerEngine take the mask TYPE over the mask on GPU, so with them prompts start at column 0."""
    cores = [module.core_attention for module in model.modules() if hasattr(module, "core_attention")]
    return bool(cores) and all(isinstance(core, SDPAttention) for core in cores)


def attention_mask(buffer: TokenBuffer, start: int, stop: int) -> Optional[torch.Tensor]:
    """``[B, 1, stop - start, stop]`` bool, True = masked, for feeding columns ``[start, stop)`` after columns
    ``[0, start)`` are cached: a row's leading pad and every later column. None when no row has leading pad (the
    attention's own causal mask is then the same thing)."""
    pad = buffer.leading_pad_mask(stop)
    if pad is None:
        return None
    keys = torch.arange(stop, device=pad.device)
    future = keys[None, :] > torch.arange(start, stop, device=pad.device)[:, None]
    return pad[:, None, None, :] | future[None, None, :, :]


def _check_against_model(model: torch.nn.Module, buffer: TokenBuffer, settings: SamplingSettings,
                         pad_token_id: int) -> None:
    vocab_size = get_attr_wrapped_model(model, "vocab_size")
    bad_ids = [i for i in (*settings.stop_token_ids, pad_token_id) if not 0 <= i < vocab_size]
    if bad_ids:
        raise ValueError(f"token ids {bad_ids} (stop tokens / pad) lie outside the model's vocabulary "
                         f"[0, {vocab_size}); check model.eos_token_ids and the tokenizer against model.vocab_size")
    max_length = get_attr_wrapped_model(model, "max_sequence_length")
    longest_prompt = int(buffer.prompt_lengths.max())
    if buffer.width > max_length:
        raise ValueError(
            f"the longest prompt ({longest_prompt} tokens) + max_new_tokens={settings.max_new_tokens} = {buffer.width} "
            f"exceeds the model's model.max_position_embeddings={max_length}; lower ppo.max_new_tokens or "
            "ppo.max_prompt_length")


def _check_call(model: torch.nn.Module, settings: SamplingSettings, backend: str, parallel: ParallelContext,
                generator: Optional[torch.Generator]) -> None:
    """Refuse what cannot work before the first collective, identically on every rank (so none is left waiting)."""
    if backend not in GENERATION_BACKENDS:
        raise ValueError(f"generation backend {backend!r} is not one of {list(GENERATION_BACKENDS)}")
    if isinstance(model, (list, tuple)):
        raise ValueError("generate takes one model chunk per rank; virtual (interleaved) pipeline stages are not "
                         "supported: build the actor without virtual_pipeline_model_parallel_size")
    config = get_attr_wrapped_model(model, "config")
    if config.sequence_parallel or parallel.cp_size > 1:
        # A decode step feeds one column, which cannot be split over tensor- or context-parallel ranks.
        raise ValueError(
            f"generation needs parallel.sequence_parallel=false and parallel.context_parallel_size=1 (got "
            f"{config.sequence_parallel} and {parallel.cp_size}): a decode step feeds one token per row, which "
            "cannot be split along the sequence")
    if not settings.is_greedy and generator is None:
        raise ValueError("sampling needs a seeded torch.Generator; pass generator=torch.Generator(device)"
                         ".manual_seed(seed) on every rank (or greedy=True for argmax decoding)")
    if generator is not None and generator.device.type != parallel.device.type:
        raise ValueError(f"the sampling generator lives on {generator.device} but the model on {parallel.device}; "
                         f"create it with torch.Generator(device={str(parallel.device)!r})")


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: PromptBatch, settings: SamplingSettings, parallel: ParallelContext, *,
             pad_token_id: int, generator: Optional[torch.Generator] = None, backend: str = "kv_cache",
             pad_to_multiple_of: int = 1) -> GenerationOutput:
    """Sample a response for every prompt of ``prompts`` (left-padded, as ``collate_prompts`` builds them).

    Args:
        model: this rank's pipeline stage of the actor (a GPTModel from ``build_gpt_model``, DDP-wrapped or not).
        settings: temperature / top-p / top-k / greedy, stop tokens, max_new_tokens.
        parallel: the groups from ``initialize_parallel``.
        pad_token_id: written after each row's response.
        generator: seeded torch.Generator on the model's device; required unless decoding greedily.
        backend: ``kv_cache`` or ``full_forward`` (see the module docstring).
        pad_to_multiple_of: round the output's sequence length up (e.g. to the tensor-parallel size).

    Returns:
        ``GenerationOutput`` with the same rows on every model-parallel rank.
    """
    _check_call(model, settings, backend, parallel, generator)
    prompts = prompts.to(parallel.device)
    buffer = TokenBuffer.from_prompts(prompts, settings.max_new_tokens, settings.stop_token_ids, pad_token_id,
                                      align_prompt_ends=attention_takes_masks(model))
    _check_against_model(model, buffer, settings, pad_token_id)
    batch_size = buffer.tokens.shape[0]
    runner = StageRunner(model, parallel, batch_size)
    cache = StaticKVCache(model, batch_size, buffer.width) if backend == "kv_cache" else None
    with _eval_mode(model):
        fed_columns = 0
        column = buffer.first_column_to_predict()
        while column < buffer.width and not buffer.all_done():
            start = fed_columns if cache is not None else 0
            kwargs = cache.forward_kwargs(start) if cache is not None else {}
            logits = runner.forward(buffer.tokens[:, start:column], buffer.positions(start, column - start),
                                    attention_mask(buffer, start, column), kwargs)
            if cache is not None and fed_columns == 0:
                cache.prefill_done()
            fed_columns = column
            sampled = sample_next_tokens(logits, settings, generator) if runner.is_sampling_rank else None
            buffer.record(column, runner.share_tokens(sampled, parallel.device))
            column += 1
    return build_output(buffer, prompts.prompt_ids, pad_token_id, pad_to_multiple_of)
