"""Run a model over micro-batches through megatron's pipeline schedule (any pipeline-parallel size, 1 included).

The schedule (`get_forward_backward_func`) sends hidden states [seq, batch, hidden] between pipeline stages, calls
`set_input_tensor` on later stages, runs the backward of each micro-batch when training, and at the end of a training
pass calls `config.finalize_model_grads_func` (set by megaseg.training.common.optimizer) to reduce the gradients over
data-parallel ranks and tied embeddings. Every rank calls these functions with the same micro-batches; only the last
pipeline stage gets results back (an empty list elsewhere).

Loss scaling follows megatron: each micro-batch's loss is divided by the number of micro-batches, and megatron's
DistributedDataParallel averages gradients over data-parallel ranks, so `loss_fn` should return the mean over its
micro-batch for the gradient to be that of the mean over the global batch.

Packed micro-batches (a ``packing: PackedRows`` field, megaseg.models.packing): the model runs on the packed row
``[1, T]`` with its ``PackedSeqParams``, and ``loss_fn`` / ``output_fn`` get the output unpacked to the micro-batch's
``[b, S, ...]`` rows, exactly what they get unpacked. Under pipeline parallelism the micro-batches of one call share
one shape (packed ones one ``T``; their row counts and row lengths may differ), which the stages' fixed-size sends
need; without it each may have its own (megaseg.models.packing.packed_lengths).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaseg.models.packing import PackedRows, pipeline_parallel
from megaseg.parallel.cpu_compat import cuda_device_redirect


class ModelInputs(Protocol):
    """What a micro-batch must carry for the model's forward; trainers' batch dataclasses add their own fields."""

    input_ids: torch.Tensor  # [batch, seq] int64
    position_ids: torch.Tensor  # [batch, seq] int64
    attention_mask: Optional[torch.Tensor]  # None (causal) or bool [batch, 1, seq, seq], True = masked out
    # Optionally also `packing: Optional[PackedRows]` (read with getattr, so batch types without it need not
    # declare it): when set, the model runs on the packed inputs instead (module docstring).


def packing_of(batch: Any) -> Optional[PackedRows]:
    return getattr(batch, "packing", None)


@dataclass(frozen=True)
class MicroBatch:
    """The plain ModelInputs, for callers that need nothing else per micro-batch."""

    input_ids: torch.Tensor  # [batch, seq]
    position_ids: torch.Tensor  # [batch, seq]
    attention_mask: Optional[torch.Tensor] = None  # [batch, 1, seq, seq] bool, True = masked out


Batch = TypeVar("Batch", bound=ModelInputs)
# (model output on the last stage, the micro-batch) -> (scalar loss, metrics to report); see the module docstring.
LossFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (model output on the last stage, the micro-batch) -> whatever forward_only should hand back for it.
OutputFn = Callable[[torch.Tensor, Any], Any]
# (the model as the schedule holds it, the micro-batch) -> the model's output: another way through the same modules
# (megaseg.models.frozen_prefix runs only the top layers from stored hidden states). Default: the model's forward.
ForwardFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def model_forward(model: torch.nn.Module, batch: ModelInputs) -> torch.Tensor:
    """The model's forward on the micro-batch: its packed row (megaseg.models.packing) when it carries one."""
    packing = packing_of(batch)
    if packing is None:
        return model(batch.input_ids, batch.position_ids, batch.attention_mask)
    return model(packing.input_ids, packing.position_ids, None, packed_seq_params=packing.packed_seq_params)


def _micro_batch_shape(micro_batches: Sequence[ModelInputs]) -> tuple[int, int]:
    if not micro_batches:
        raise ValueError("no micro-batches to run: pass at least one")
    packed = {packing_of(batch) is not None for batch in micro_batches}
    if len(packed) != 1:
        raise ValueError("micro-batches of one schedule call must be all packed or all unpacked")
    shapes = {tuple((packing_of(batch) or batch).input_ids.shape) for batch in micro_batches}
    if any(len(shape) != 2 for shape in shapes):
        raise ValueError(f"micro-batch input_ids shapes {sorted(shapes)} are not all [batch, seq]")
    if len(shapes) != 1 and pipeline_parallel():
        raise ValueError(
            f"micro-batch input_ids shapes {sorted(shapes)} differ; the pipeline schedule sends fixed-size "
            "activations between stages, so pad every micro-batch to the same [batch, seq] (packed ones to one "
            "packed length: megaseg.models.packing.packed_lengths)")
    # Without pipeline stages the schedule does not use these (megatron: "unused").
    batch_size, seq_length = max(shapes, key=lambda shape: shape[1])
    return batch_size, seq_length


def _run_schedule(model: torch.nn.Module, micro_batches: Sequence[Batch], on_output: Callable[..., Any],
                  *, forward_only: bool, collect_non_loss_data: bool, forward: ForwardFn = model_forward) -> list[Any]:
    batch_size, seq_length = _micro_batch_shape(micro_batches)

    def forward_step(data_iterator, step_model):
        batch = next(data_iterator)
        output = forward(step_model, batch)
        packing = packing_of(batch)

        # The schedule calls this on the last stage only: (output) when training, (output, non_loss_data=True) when
        # collecting inference outputs.
        def output_func(output_tensor, non_loss_data: bool = False):
            if packing is not None:
                output_tensor = packing.unpack(output_tensor)
            return on_output(output_tensor, batch)

        return output, output_func

    forward_backward = get_forward_backward_func()
    # The schedules allocate their token counters and p2p buffers with device="cuda".
    with cuda_device_redirect():
        return forward_backward(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=batch_size,
            forward_only=forward_only, collect_non_loss_data=collect_non_loss_data)


@torch.no_grad()
def forward_only(model: torch.nn.Module, micro_batches: Sequence[Batch], output_fn: Optional[OutputFn] = None,
                 forward: ForwardFn = model_forward) -> list[Any]:
    """Inference over `micro_batches`: on the last stage, `output_fn(output, micro_batch)` per micro-batch (the
    output itself when None; prefer reducing it there, e.g. to entropies, to keep vocab-sized logits from piling up).
    Train/eval mode is the caller's (the models have no dropout).
    """
    reduce = output_fn if output_fn is not None else (lambda output, batch: output)
    return list(_run_schedule(model, micro_batches, reduce, forward_only=True, collect_non_loss_data=True,
                              forward=forward))


def forward_backward(model: torch.nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn,
                     forward: ForwardFn = model_forward) -> list[dict[str, torch.Tensor]]:
    """Forward and backward of every micro-batch; gradients accumulate into the model (main_grad under megatron
    DDP, reduced at the end). Returns each micro-batch's metrics dict on the last stage. Does not step."""
    return list(_run_schedule(model, micro_batches, loss_fn, forward_only=False, collect_non_loss_data=False,
                              forward=forward))
