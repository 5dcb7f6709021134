"""A scalar-head model split at a layer boundary: the frozen bottom (embedding + layers [0, L)) and the top (layers
[L, num_layers) + final norm + head), and a hook that takes layer L's input out of a GPT forward.

When only the top N layers of a reward model train (rm.train_top_layers), its bottom L = num_layers - N layers are
the SFT model's, frozen. Their output for a sequence never changes, and the entropy pass over the frozen SFT language
model computes it anyway on its way to the logits. So one pass gives both the entropies and the trainable layers'
input, and every epoch (and the held-out scoring) runs only the top N layers: exact, because the frozen layers are
the SFT model's weights, and causal attention makes the hidden state at a position independent of the right padding.

``bottom_hidden_states(model, input_ids, position_ids, L)`` and ``top_values(model, hidden, L)`` are the two halves
of ``ScalarHeadModel.forward`` (same modules, same calls, same rotary embedding): ``top_values(m, bottom(m, ...))``
equals ``m(...)``. ``LayerInputCapture`` records the input of layer L in any megatron GPT-style model (the output of
layer L - 1) through a forward hook: the model's own forward runs unchanged, no flag is patched.

Only one pipeline stage holding every layer (PP=1) is supported: there the split is a plain function of two tensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from megatron.core.utils import make_viewless_tensor


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside megatron's DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") and hasattr(model, "ddp_config") else model


def _check_split(model: torch.nn.Module, num_bottom_layers: int) -> None:
    num_layers = len(model.decoder.layers)
    if not (model.pre_process and model.post_process):
        raise ValueError("the frozen-prefix split needs the whole model on one pipeline stage "
                         "(parallel.pipeline_model_parallel_size=1)")
    if not 0 < num_bottom_layers < num_layers:
        raise ValueError(f"cannot split a {num_layers}-layer model after layer {num_bottom_layers}: the frozen bottom "
                         f"needs 1 to {num_layers - 1} layers")


def _rotary(model: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # As ScalarHeadModel.forward: the rotary length is the sequence length of the decoder's input.
    rotary_seq_len = model.rotary_pos_emb.get_rotary_seq_len(None, model.decoder, hidden_states, model.config, None)
    return model.rotary_pos_emb(rotary_seq_len)


def _run_layers(model: torch.nn.Module, layers: Any, hidden_states: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    rotary_pos_emb = _rotary(model, hidden_states)
    for layer in layers:
        hidden_states, _ = layer(hidden_states=hidden_states, attention_mask=attention_mask,
                                 rotary_pos_emb=rotary_pos_emb)
    return hidden_states


def bottom_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         num_bottom_layers: int, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input_ids, position_ids [b, S] -> the input of layer ``num_bottom_layers`` (0-based), [S, b, hidden]."""
    model = unwrapped(model)
    _check_split(model, num_bottom_layers)
    hidden_states = model.embedding(input_ids=input_ids, position_ids=position_ids)
    return _run_layers(model, model.decoder.layers[:num_bottom_layers], hidden_states, attention_mask)


def top_values(model: torch.nn.Module, hidden_states: torch.Tensor, num_bottom_layers: int,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The input of layer ``num_bottom_layers`` [S, b, hidden] -> head values [b, S] (what the whole model returns)."""
    model = unwrapped(model)
    _check_split(model, num_bottom_layers)
    if model.config.sequence_parallel:
        raise ValueError("the frozen-prefix split does not support parallel.sequence_parallel")
    # The decoder's first operation on its input (TransformerBlock.forward): autograd sees a fresh, viewless tensor.
    hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
    hidden_states = _run_layers(model, model.decoder.layers[num_bottom_layers:], hidden_states, attention_mask)
    hidden_states = model.decoder.final_layernorm(hidden_states)
    values = model.head(hidden_states.to(model.head.weight.dtype)).squeeze(-1)  # [S, b]
    return values.transpose(0, 1).contiguous()


class LayerInputCapture:
    """The input of layer ``layer_index`` (0-based; the output of layer ``layer_index - 1``) of the last forward of
    a megatron GPT-style model (GPTModel or ScalarHeadModel), [S, b, hidden], detached; while ``attached``."""

    def __init__(self, layer_index: int) -> None:
        if layer_index < 1:
            raise ValueError(f"layer_index={layer_index} must be >= 1 (the input of layer 0 is the embedding)")
        self.layer_index = layer_index
        self.hidden_states: Optional[torch.Tensor] = None

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        # A TransformerLayer returns (hidden_states, context).
        self.hidden_states = (output[0] if isinstance(output, tuple) else output).detach()

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module) -> Iterator["LayerInputCapture"]:
        layers = unwrapped(model).decoder.layers
        numbers = [layer.layer_number for layer in layers]
        if self.layer_index not in numbers:  # layer_number is 1-based: layer layer_index - 1 has layer_index
            raise ValueError(f"this pipeline stage holds layers {numbers[0] - 1}..{numbers[-1] - 1}, not layer "
                             f"{self.layer_index - 1} whose output is to be captured")
        handle = layers[numbers.index(self.layer_index)].register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.hidden_states = None

    def take(self) -> torch.Tensor:
        """The captured tensor of the last forward (once: it is cleared so a stale one is never read twice)."""
        assert self.hidden_states is not None, "no forward ran since the last take()"
        hidden_states, self.hidden_states = self.hidden_states, None
        return hidden_states
