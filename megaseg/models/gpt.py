"""The causal language model (actor / reference / SFT policy): a megatron-core GPTModel built from ModelConfig.

Layouts: `GPTModel.forward(input_ids [batch, seq], position_ids [batch, seq], attention_mask)` runs the decoder in
megatron's [seq, batch, hidden] layout and returns logits [batch, seq, vocab / tp] on the last pipeline stage
(vocab-parallel: each tensor-parallel rank holds its slice of the vocabulary; use megaseg.parallel.vocab_parallel
for entropies and log-probs instead of gathering it), and hidden states [seq, batch, hidden] on the other stages.
RoPE is applied by position in the sequence (0..seq-1), not by `position_ids`, and `attention_mask` is honoured by the
local layers only (TransformerEngine's attention applies its own causal mask and ignores it): pad on the right, where
padding cannot reach the positions before it. Packed rows (megaseg.models.packing) pass `packed_seq_params` (THD):
RoPE then restarts at each sequence of `cu_seqlens` and attention stays inside each sequence, on both specs.
"""
from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.models.backend import build_layer_spec, resolve_transformer_impl
from megaseg.models.linear import use_local_output_layer
from megaseg.models.rotary import rotary_args
from megaseg.models.transformer_config import build_transformer_config
from megaseg.parallel.cpu_compat import cuda_device_redirect


def check_parallel_state_matches(parallel_cfg: ParallelConfig) -> None:
    """ValueError unless megatron's parallel_state is initialised with the sizes `parallel_cfg` asks for."""
    if not parallel_state.model_parallel_is_initialized():
        raise ValueError(
            "megatron parallel state is not initialised; call megaseg.parallel.initialize_parallel(config.parallel, "
            "seed) before building a model")
    actual = {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": parallel_state.get_context_parallel_world_size(),
    }
    for name, size in actual.items():
        if getattr(parallel_cfg, name) != size:
            raise ValueError(
                f"parallel.{name}={getattr(parallel_cfg, name)} but the process groups were initialised with {size}; "
                "build the model with the ParallelConfig that initialize_parallel was given")


def pipeline_stage_flags(pre_process: Optional[bool], post_process: Optional[bool]) -> tuple[bool, bool]:
    """(pre_process, post_process): whether this rank holds the embedding / the final norm and head.

    None means "from this rank's pipeline stage"; explicit values are for tests and tools that build one stage.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return pre_process, post_process


def build_gpt_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None) -> GPTModel:
    """This rank's pipeline stage of the causal LM, with vocab-parallel logits (parallel_output=True).

    Tied embeddings (SmolLM2) under pipeline parallelism are handled by megatron: the last stage keeps a copy of
    the embedding as its output layer, synchronised at init and through finalize_model_grads.
    """
    config = build_transformer_config(model_cfg, parallel_cfg)
    check_parallel_state_matches(parallel_cfg)
    pre_process, post_process = pipeline_stage_flags(pre_process, post_process)
    rope = rotary_args(model_cfg)
    impl = resolve_transformer_impl(model_cfg)
    # With tied embeddings and pipeline parallelism, GPTModel moves the last stage's copy to "cuda" to all-reduce it.
    with cuda_device_redirect():
        model = GPTModel(
            config=config,
            transformer_layer_spec=build_layer_spec(model_cfg, impl),
            vocab_size=model_cfg.vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=rope.rotary_base,
            rope_scaling=rope.rope_scaling,
            rope_scaling_factor=rope.rope_scaling_factor,
            seq_len_interpolation_factor=rope.seq_len_interpolation_factor,
        )
    if impl == "local":
        # The vocabulary projection through the local spec's linear too (plain and blocked on CPU; models/linear.py).
        use_local_output_layer(model)
    return model
