"""The local spec's linear layers: megatron-core's Column/RowParallelLinear, with a plain ``F.linear`` where no
autograd graph and no communication is needed.

megatron's parallel linears route every call through autograd Functions (the matmul in
``LinearWithGradAccumulationAndAsyncCommunication`` or ``linear_with_frozen_weight``, plus the identity-at-TP=1
``copy_to`` / ``reduce_from`` tensor-parallel regions) and look up their process group each time. On a decode step
(one token per row) that bookkeeping rivals the matmul: measured on SmolLM2-135M generating 64 tokens for 8 rows on 2
CPU cores, 8.3-9.0 s per call through megatron's path against 7.4-8.6 s with this one (interleaved rounds).

The plain path runs when the result needs neither (``_is_plain``): one tensor-parallel rank (every region is the
identity), no sequence parallelism or expert communication, no CPU activation offloading, and no gradient to record
(grad mode off, or neither the input nor the weight requires grad: the frozen bottom layers of a top-N reward
model). It computes ``input @ weight.T (+ bias)`` as megatron does, bias handling (``skip_bias_add``) included;
everything else goes to megatron's forward unchanged.

GPTModel's output layer (the vocabulary projection, built by GPTModel itself rather than by the layer spec) becomes a
``LocalColumnParallelLinear`` too (``use_local_output_layer``), with the weight it is handed when the embeddings are
tied. On CPU a wide layer (at least ``_CPU_BLOCKED_MIN_ROWS`` output features) is computed in blocks of
``_CPU_OUTPUT_BLOCK`` output features: MKL's sgemm runs [8, 576] x [576, 49152] (SmolLM2's decode-step logits) in
18.4-21.2 ms as one call and in 14.6-15.5 ms as 32 calls of 1536 columns, 19.1 against 24.0 ms for 16 rows, 465
against 510 ms for 696 rows, 1 thread (2 threads: 11.4 against 15.7 ms); 8 rows through 8192 / 16384 / 32768 output
features of 576 inputs: 2.9 / 5.4 / 10.1 against 3.4 / 6.5 / 13.0 ms; SmolLM2's layer linears (at most 3072 output
features) gained nothing. Each output element is the same dot product over the same input row, and the results were
bitwise equal in every measured shape.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _is_plain(layer: torch.nn.Module, input_: torch.Tensor, weight: Optional[torch.Tensor] = None) -> bool:
    weight = layer.weight if weight is None else weight
    if torch.is_grad_enabled() and (input_.requires_grad or weight.requires_grad):
        return False
    return (layer.tp_group.size() == 1 and not layer.sequence_parallel and not layer.explicit_expert_comm
            and layer.config._cpu_offloading_context is None)


# Output features per block of a wide linear on CPU, and the width from which it is blocked (module docstring).
_CPU_OUTPUT_BLOCK = 1536
_CPU_BLOCKED_MIN_ROWS = 8192


def _linear(input_: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` (no autograd: only the plain path calls it); on CPU a wide one block by block (module
    docstring), each block's product written straight into its columns of the one output (a strided BLAS result:
    no per-block copies, and no more memory than the output itself, which matters for a long row's logits)."""
    rows = weight.shape[0]
    if input_.device.type != "cpu" or rows < _CPU_BLOCKED_MIN_ROWS:
        return F.linear(input_, weight, bias)
    flat = input_.reshape(-1, input_.shape[-1])
    output = flat.new_empty(flat.shape[0], rows)
    for start in range(0, rows, _CPU_OUTPUT_BLOCK):
        block = slice(start, start + _CPU_OUTPUT_BLOCK)
        # mm / addmm: what F.linear runs on a flattened input without / with a bias.
        if bias is None:
            torch.mm(flat, weight[block].t(), out=output[:, block])
        else:
            torch.addmm(bias[block], flat, weight[block].t(), out=output[:, block])
    return output.view(*input_.shape[:-1], rows)


def _plain_forward(layer: torch.nn.Module, input_: torch.Tensor, weight: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = layer.weight if weight is None else weight
    if layer.skip_bias_add:
        return _linear(input_, weight, None), layer.bias
    return _linear(input_, weight, layer.bias), None


class LocalColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` with the plain path (module docstring)."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, *args, **kwargs
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Extra arguments (runtime_gather_output, or what a later megatron-core adds) change nothing at TP=1 but
        # are megatron's to interpret: the plain path only takes the call without them or with gathering. A weight
        # handed in (the tied embedding of GPTModel's output layer) must have this layer's shape, as megatron checks.
        given_weight_fits = weight is None or weight.shape == (self.output_size_per_partition, self.input_size)
        if (weight is not None or self.weight is not None) and given_weight_fits and not args \
                and set(kwargs) <= {"runtime_gather_output"} and _is_plain(self, input_, weight):
            return _plain_forward(self, input_, weight)  # at TP=1 gathering the output is the identity
        return super().forward(input_, weight, *args, **kwargs)


def use_local_output_layer(model: torch.nn.Module) -> None:
    """Make GPTModel's output layer (a megatron ``ColumnParallelLinear`` GPTModel builds itself, outside the layer
    spec) a ``LocalColumnParallelLinear``: the subclass adds behaviour only, no parameters or buffers, so changing
    the instance's class keeps its weights, state-dict keys and checkpoint layout."""
    output_layer = getattr(model, "output_layer", None)
    if type(output_layer) is ColumnParallelLinear:
        output_layer.__class__ = LocalColumnParallelLinear


class LocalRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` with the plain path (module docstring)."""

    def forward(self, input_: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not args and not kwargs and _is_plain(self, input_):
            return _plain_forward(self, input_)
        return super().forward(input_, *args, **kwargs)
