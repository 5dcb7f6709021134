"""One forward of some token columns through every pipeline stage, and the sampled tokens back to every rank.

Pipeline parallelism during generation is the simple non-interleaved kind: for each decode step, stage 0 embeds
and runs its layers, sends the hidden states ``[columns, batch, hidden]`` to stage 1 (a blocking send/recv over the
pipeline group), and so on; the last stage produces the logits of the last fed column. Stages idle while the others
work, which is acceptable for rollouts (megatron's static generation does the same for small batches).

Tokens are sampled once, by tensor-parallel rank 0 of the last stage, and broadcast: first over the last stage's
tensor-parallel group, then from the last stage over each pipeline group. So every rank of the model-parallel
group holds the same tokens by construction, not by the luck of identical floating-point reductions.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.utils import get_attr_wrapped_model

from megaseg.parallel.initialize import ParallelContext


def gather_vocab_shards(logits_shard: torch.Tensor, tp_group: Any, tp_size: int) -> torch.Tensor:
    """``[batch, vocab / tp]`` -> ``[batch, vocab]``: rank r holds ids ``[r V/tp, (r+1) V/tp)`` (megatron's
    VocabUtility layout), so the shards concatenate in rank order."""
    if tp_size == 1:
        return logits_shard
    shards = [torch.empty_like(logits_shard) for _ in range(tp_size)]
    dist.all_gather(shards, logits_shard.contiguous(), group=tp_group)
    return torch.cat(shards, dim=-1)


class StageRunner:
    """Runs this rank's pipeline stage of ``model`` on a range of columns of the token buffer."""

    def __init__(self, model: torch.nn.Module, parallel: ParallelContext, batch_size: int):
        self.model = model
        self.parallel = parallel
        self.batch_size = batch_size
        config = get_attr_wrapped_model(model, "config")
        self.hidden_size = config.hidden_size
        # Activations travel between stages in the pipeline dtype (megatron's p2p communication does the same).
        self.activation_dtype = config.pipeline_dtype or config.params_dtype
        self.vocab_size = get_attr_wrapped_model(model, "vocab_size")
        self._set_input_tensor = get_attr_wrapped_model(model, "set_input_tensor")
        pp_group = parallel.pp_group
        self._prev_rank = dist.get_global_rank(pp_group, parallel.pp_rank - 1) if parallel.pp_rank > 0 else None
        self._next_rank = (dist.get_global_rank(pp_group, parallel.pp_rank + 1)
                           if parallel.pp_rank < parallel.pp_size - 1 else None)

    @property
    def is_sampling_rank(self) -> bool:
        return self.parallel.is_last_pipeline_stage and self.parallel.tp_rank == 0

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor],
                forward_kwargs: dict[str, Any]) -> Optional[torch.Tensor]:
        """Feed ``tokens`` ``[B, n]`` (the next n buffer columns) at ``positions`` ``[B, n]``, attending with
        ``attention_mask`` (``[B, 1, n, columns so far]`` bool, True = masked; None: causal); on the last stage
        return fp32 full-vocabulary logits ``[B, vocab]`` predicting the next column, else None."""
        num_columns = tokens.shape[1]
        # RoPE in megatron's GPTModel goes by column, not by position_ids; these only matter to learned positions.
        if self.parallel.pp_size > 1:
            received = None
            if self._prev_rank is not None:
                received = torch.empty((num_columns, self.batch_size, self.hidden_size), dtype=self.activation_dtype,
                                       device=tokens.device)
                dist.recv(received, src=self._prev_rank, group=self.parallel.pp_group)
            self._set_input_tensor(received)
        output = self.model(tokens, positions, attention_mask, **forward_kwargs)
        if self._next_rank is not None:
            dist.send(output.to(self.activation_dtype).contiguous(), dst=self._next_rank,
                      group=self.parallel.pp_group)
            return None
        # [B, n or 1, vocab (/ tp)]: with a KV cache megatron keeps only the last column and gathers the vocabulary.
        last = output[:, -1, :]
        if last.shape[-1] != self.vocab_size:
            last = gather_vocab_shards(last, self.parallel.tp_group, self.parallel.tp_size)
        return last.float()

    def share_tokens(self, sampled: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """``[B]`` long on every rank: ``sampled`` from the sampling rank (ignored elsewhere)."""
        parallel = self.parallel
        tokens = sampled if self.is_sampling_rank else None
        if tokens is None:
            tokens = torch.empty(self.batch_size, dtype=torch.long, device=device)
        tokens = tokens.to(dtype=torch.long).contiguous()
        if parallel.is_last_pipeline_stage and parallel.tp_size > 1:
            dist.broadcast(tokens, src=dist.get_global_rank(parallel.tp_group, 0), group=parallel.tp_group)
        if parallel.pp_size > 1:
            last_stage = dist.get_global_rank(parallel.pp_group, parallel.pp_size - 1)
            dist.broadcast(tokens, src=last_stage, group=parallel.pp_group)
        return tokens
