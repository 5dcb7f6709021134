"""Reward model and critic: the GPT backbone without its unembedding, plus a linear head hidden -> 1 per position.

Built by composition from the same megatron-core parts GPTModel uses (LanguageModelEmbedding, RotaryEmbedding,
TransformerBlock with its final norm), under the same attribute names, so a GPTModel checkpoint of the SFT model
loads into it (the output layer is simply not asked for) and the hidden states are the decoder's own output. No
vocabulary-sized output layer is allocated and nothing is patched at run time (the NeMo-Aligner mock of
`post_process` is what this avoids).

Layouts: megatron runs the decoder in [seq, batch, hidden]; `forward` takes input_ids [batch, seq] and returns the
head's value at every position as [batch, seq] on the last pipeline stage, and the decoder's hidden states
[seq, batch, hidden] on the other stages (what the pipeline schedule sends to the next stage).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

try:  # megatron-core moved ModelType between releases
    from megatron.core.enums import ModelType
except ImportError:  # pragma: no cover - older layouts
    from megatron.core.transformer.enums import ModelType  # type: ignore[no-redef]

from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.models.backend import build_layer_spec, resolve_transformer_impl
from megaseg.models.gpt import check_parallel_state_matches, pipeline_stage_flags
from megaseg.models.rotary import RotaryArgs, rotary_args
from megaseg.models.transformer_config import TORCH_DTYPES, build_transformer_config


class ScalarHeadModel(MegatronModule):
    """One pipeline stage of backbone + scalar head; `values = head(final_norm(decoder(embed(input_ids))))`.

    The head is a plain (tensor-parallel replicated) Linear(hidden, 1, bias=False), present on the last pipeline
    stage only, initialised N(0, 1 / (hidden + 1)) like OpenRLHF's value head, drawn from its own generator seeded
    with `head_seed`: the default generator is seeded per pipeline stage, so a head drawn from it would depend on the
    pipeline-parallel size (every reward model and critic gets its head here, nowhere else). It computes in
    `head_dtype` (fp32 by default, whatever the backbone's dtype).
    """

    def __init__(self, config: TransformerConfig, transformer_layer_spec: ModuleSpec, *, vocab_size: int,
                 max_sequence_length: int, rotary: RotaryArgs, head_dtype: torch.dtype, head_seed: int,
                 pre_process: bool = True, post_process: bool = True) -> None:
        super().__init__(config=config)
        self.pre_process = pre_process
        self.post_process = post_process
        # Read by megatron's pipeline schedules and finalize_model_grads (there is no output layer to tie).
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                position_embedding_type="rope")
        # Every stage rotates its own layers' queries and keys, so every stage holds the (parameter-free) RoPE.
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_interleaved=config.rotary_interleaved,
            seq_len_interpolation_factor=rotary.seq_len_interpolation_factor, rotary_base=rotary.rotary_base,
            rope_scaling=rotary.rope_scaling, rope_scaling_factor=rotary.rope_scaling_factor,
            use_cpu_initialization=config.use_cpu_initialization)
        # post_process=True gives the block its final norm, exactly as in GPTModel.
        self.decoder = TransformerBlock(config=config, spec=transformer_layer_spec, pre_process=pre_process,
                                        post_process=post_process)
        if post_process:
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            self.head = torch.nn.Linear(config.hidden_size, 1, bias=False, device=device, dtype=head_dtype)
            generator = torch.Generator().manual_seed(head_seed)
            std = 1.0 / (config.hidden_size + 1)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * std)
            # Under sequence parallelism each tensor-parallel rank sees a slice of the positions, so the head's
            # gradient is partial per rank and megatron must all-reduce it like the norms' weights.
            self.head.weight.sequence_parallel = config.sequence_parallel

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Called by the pipeline schedule with the previous stage's hidden states [seq, batch, hidden]."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "a GPT-style decoder takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """input_ids, position_ids [batch, seq]; attention_mask None (causal) or bool [batch, 1, seq, seq] with
        True = masked out (local layers only; see megaseg.models.gpt on padding). Returns values [batch, seq] (last
        stage) or hidden states [seq, batch, hidden]. packed_seq_params (THD, megaseg.models.packing): batch is 1
        and seq holds several sequences, each attending to itself with RoPE from its own first token, as in
        GPTModel."""
        # On later stages the decoder reads the tensor set by set_input_tensor and ignores this argument.
        hidden_states = self.embedding(input_ids=input_ids, position_ids=position_ids) if self.pre_process else None
        rotary_seq_len = self.rotary_pos_emb.get_rotary_seq_len(None, self.decoder, hidden_states, self.config,
                                                                packed_seq_params)
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        hidden_states = self.decoder(hidden_states=hidden_states, attention_mask=attention_mask,
                                     rotary_pos_emb=self.rotary_pos_emb(rotary_seq_len, packed_seq=packed),
                                     packed_seq_params=packed_seq_params)
        if not self.post_process:
            return hidden_states
        values = self.head(hidden_states.to(self.head.weight.dtype)).squeeze(-1)  # [seq(/tp), batch]
        if self.config.sequence_parallel:
            # Each rank's loss uses every position, so the backward only keeps this rank's slice of the grad.
            values = tensor_parallel.gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False)
        return values.transpose(0, 1).contiguous()


def build_scalar_head_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, seed: int,
                            pre_process: Optional[bool] = None,
                            post_process: Optional[bool] = None) -> ScalarHeadModel:
    """This rank's pipeline stage of a backbone + scalar head (None flags: from the rank's pipeline stage); `seed`
    (the run's seed) draws the fresh head."""
    config = build_transformer_config(model_cfg, parallel_cfg)
    check_parallel_state_matches(parallel_cfg)
    pre_process, post_process = pipeline_stage_flags(pre_process, post_process)
    return ScalarHeadModel(
        config, build_layer_spec(model_cfg, resolve_transformer_impl(model_cfg)),
        vocab_size=model_cfg.vocab_size, max_sequence_length=model_cfg.max_position_embeddings,
        rotary=rotary_args(model_cfg), head_dtype=TORCH_DTYPES[model_cfg.reward_head_dtype], head_seed=seed,
        pre_process=pre_process, post_process=post_process)


def build_reward_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, seed: int,
                       pre_process: Optional[bool] = None, post_process: Optional[bool] = None) -> ScalarHeadModel:
    """The segment reward model: values[b, j] is the reward of a segment ending at token j (paper Eq. 3-4)."""
    return build_scalar_head_model(model_cfg, parallel_cfg, seed=seed, pre_process=pre_process,
                                   post_process=post_process)


def build_critic(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, seed: int, pre_process: Optional[bool] = None,
                 post_process: Optional[bool] = None) -> ScalarHeadModel:
    """The PPO critic: values[b, j] estimates the return after token j (initialised from the SFT backbone with a
    fresh head, paper App. D)."""
    return build_scalar_head_model(model_cfg, parallel_cfg, seed=seed, pre_process=pre_process,
                                   post_process=post_process)
