"""Bytes one GPU holds for one model of a megaseg run: weights, gradients, optimizer state, activations.

Counted, not guessed, from what megaseg builds (megaseg.models: megatron's local/TE GPT layers, no biases except
Qwen2's q/k/v, a scalar head of `hidden_size` weights for reward model and critic):

- weights: this rank's parameters (vocabulary and MLP split over TP, layers over PP) x bytes of model.params_dtype.
  The worst pipeline stage counts: the first holds the embedding, the last the output layer / head (and, with tied
  embeddings under PP, megatron's copy of the embedding).
- gradients: megatron DDP's fp32 gradient buffer (grad_reduce_in_fp32) for the trainable parameters.
- optimizer: Adam's two fp32 moments, plus fp32 main weights when the model is bf16/fp16; divided over the
  data-parallel ranks with the distributed optimizer.
- activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4),
  term by term for megaseg's layers: what autograd stores per layer for a micro batch of b sequences of s tokens.
  Without sequence parallelism the norms and residual stream are replicated on the TP ranks:
      norms' inputs and outputs (2 per block)          4 s b h            elements, params dtype (6: torch norms)
      Q, K, V (un-expanded), attention context         (2 a + 2 g) s b d / t
      MLP: fc1 output kept by SwiGLU (gate, up, silu)  k s b F / t        k = 4 unfused, 2 with the fused kernel
           fc2 input                                   s b F / t
      attention log-sum-exp                           a s b / t          fp32
  Both layer specs run fused attention (TransformerEngine's flash/fused attention on GPUs, torch's
  scaled_dot_product_attention in the local spec: megaseg.models.attention), so no a s^2 b probabilities are kept.
  (Korthikanti's 34 s b h + 5 a s^2 b is this with GELU's 4h MLP, dropout masks, MHA and unfused attention.)
  Selective recompute keeps only core attention's inputs (Q, K, V), dropping its log-sum-exp; full
  recompute keeps each unit's input (s b h) and rebuilds one unit at a time in backward. Pipeline stage 1 holds up
  to PP micro batches in flight (1F1B), each with its L / PP layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaseg.config.model import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def _heads_dim(model_cfg: ModelConfig) -> tuple[int, int, int]:
    """(query heads, key/value groups, head dim)."""
    heads = model_cfg.num_attention_heads
    groups = model_cfg.num_query_groups or heads
    head_dim = model_cfg.kv_channels or model_cfg.hidden_size // heads
    return heads, groups, head_dim


def layer_parameters(model_cfg: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank."""
    h, ffn = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    heads, groups, head_dim = _heads_dim(model_cfg)
    qkv_out = (heads + 2 * groups) * head_dim
    gated = 2 if model_cfg.activation == "swiglu" else 1
    norms = 2 * h * (2 if model_cfg.normalization == "LayerNorm" else 1)  # LayerNorm has a bias
    qkv_bias = qkv_out // tp if model_cfg.add_qkv_bias else 0
    return (h * qkv_out + heads * head_dim * h + h * gated * ffn + ffn * h) // tp + qkv_bias + norms


def stage_parameters(model_cfg: ModelConfig, tp: int, pp: int, stage: int, scalar_head: bool) -> int:
    """Parameters held by one rank of pipeline stage `stage` (0-based)."""
    h, vocab = model_cfg.hidden_size, model_cfg.vocab_size
    count = model_cfg.num_layers // pp * layer_parameters(model_cfg, tp)
    first, last = stage == 0, stage == pp - 1
    if first:
        count += vocab * h // tp
    if last:
        count += h * (2 if model_cfg.normalization == "LayerNorm" else 1)  # final norm
        if scalar_head:
            count += h  # Linear(h, 1, bias=False), replicated over TP
        elif not model_cfg.tie_word_embeddings or not first:
            count += vocab * h // tp  # output layer (a separate copy of the embedding when tied under PP)
    return count


def max_stage_parameters(model_cfg: ModelConfig, tp: int, pp: int, scalar_head: bool) -> int:
    return max(stage_parameters(model_cfg, tp, pp, stage, scalar_head) for stage in range(pp))


@dataclass(frozen=True)
class Recompute:
    granularity: Optional[str] = None  # None | "selective" | "full"
    method: Optional[str] = None
    num_layers: Optional[int] = None

    @classmethod
    def of(cls, model_cfg: ModelConfig) -> "Recompute":
        return cls(model_cfg.recompute_granularity, model_cfg.recompute_method, model_cfg.recompute_num_layers)

    def describe(self) -> str:
        if self.granularity is None:
            return "none"
        if self.granularity == "selective":
            return "selective"
        return f"full/{self.method}/{self.num_layers}"


@dataclass(frozen=True)
class Kernels:
    """Which attention and activation kernels run: they decide what autograd keeps."""

    # bias_activation_fusion (on GPUs): the fused SwiGLU keeps its input only (2 F per token instead of the 4 F the
    # unfused chunk / silu / multiply keeps: the fc1 output, silu's output and the product's second operand copy).
    fused_swiglu: bool
    # TransformerEngine's fused norms keep the input (and a per-token rstd); torch's RMSNorm also keeps the
    # normalised input before the weight: 3 s b h per norm instead of 2 (the output counts as the next matmul's input).
    fused_norms: bool

    @classmethod
    def for_gpu_run(cls, model_cfg: ModelConfig) -> "Kernels":
        """The kernels a GPU run of `model_cfg` uses (transformer_impl auto means TransformerEngine there)."""
        te = model_cfg.transformer_impl != "local"
        return cls(fused_swiglu=True, fused_norms=te)


CPU_KERNELS = Kernels(fused_swiglu=False, fused_norms=False)


def layer_activation_bytes(model_cfg: ModelConfig, seq: int, batch: int, tp: int, recompute: Recompute,
                           kernels: Kernels) -> tuple[int, int]:
    """(bytes one layer stores for backward, bytes a fully recomputed layer rebuilds) for `batch` x `seq` tokens."""
    e = DTYPE_BYTES[model_cfg.params_dtype]
    h, ffn = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    heads, groups, head_dim = _heads_dim(model_cfg)
    tokens = seq * batch
    kept_by_activation = (2 if kernels.fused_swiglu else 4) if model_cfg.activation == "swiglu" else 1
    mlp = tokens * (kept_by_activation + 1) * ffn // tp * e
    norms = (4 if kernels.fused_norms else 6) * tokens * h * e
    context = tokens * heads * head_dim // tp * e
    attention_inputs = tokens * (heads + 2 * groups) * head_dim // tp * e
    # Both layer specs run fused attention (TransformerEngine's on GPUs, torch's scaled_dot_product_attention in the
    # local spec: megaseg.models.attention): it keeps Q, K, V (un-expanded), the output and a fp32 log-sum-exp per
    # head and position, never the a s^2 b probabilities.
    attention = attention_inputs + heads * tokens // tp * FP32
    full_layer = norms + attention + context + mlp
    if recompute.granularity == "selective":
        return norms + attention_inputs + context + mlp, full_layer
    return full_layer, full_layer


def stage_activation_bytes(model_cfg: ModelConfig, seq: int, batch: int, layout: Layout, recompute: Recompute,
                           kernels: Kernels, num_micro_batches: int) -> int:
    """Peak activation bytes of the busiest pipeline stage (the first: up to PP micro batches in flight)."""
    kept, rebuilt = layer_activation_bytes(model_cfg, seq, batch, layout.tp, recompute, kernels)
    layers = model_cfg.num_layers // layout.pp
    unit_input = seq * batch * model_cfg.hidden_size * DTYPE_BYTES[model_cfg.params_dtype]
    if recompute.granularity == "full":
        k = min(recompute.num_layers, layers)
        if recompute.method == "uniform":
            per_micro_batch = -(-layers // k) * unit_input
            backward_peak = k * rebuilt
        else:  # block: the first k layers of the stage recompute, the others keep everything
            per_micro_batch = k * unit_input + (layers - k) * kept
            backward_peak = rebuilt
    else:
        per_micro_batch = layers * kept
        backward_peak = 0
    in_flight = min(layout.pp, num_micro_batches)
    return in_flight * per_micro_batch + backward_peak


def logits_bytes(model_cfg: ModelConfig, tokens: int, tp: int, *, entropy: bool) -> int:
    """The vocab-parallel logits of `tokens` positions in the params dtype, the fp32 copy the log-prob (and
    entropy) pass makes, and the fp32 softmax the entropy needs."""
    per_token = model_cfg.vocab_size // tp
    return tokens * per_token * (DTYPE_BYTES[model_cfg.params_dtype] + FP32 + (FP32 if entropy else 0))


def kv_cache_bytes(model_cfg: ModelConfig, sequences: int, max_tokens: int, layout: Layout) -> int:
    """megatron's static KV cache for `sequences` x `max_tokens` on one rank: K and V of its layers and groups."""
    _, groups, head_dim = _heads_dim(model_cfg)
    layers = model_cfg.num_layers // layout.pp
    return 2 * layers * sequences * max_tokens * groups * head_dim // layout.tp * DTYPE_BYTES[model_cfg.params_dtype]


@dataclass(frozen=True)
class ModelBytes:
    weights: int
    gradients: int
    optimizer: int

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer


def trained_model_bytes(model_cfg: ModelConfig, layout: Layout, *, scalar_head: bool, distributed_optimizer: bool,
                        trainable_parameters: Optional[int] = None, stage: Optional[int] = None) -> ModelBytes:
    """Weights + fp32 gradient buffer + Adam state of a trained model on its worst stage (or `stage`).

    trainable_parameters: None = all (rm.train_top_layers etc. freeze the rest: no gradient, no Adam state)."""
    e = DTYPE_BYTES[model_cfg.params_dtype]
    params = (max_stage_parameters(model_cfg, layout.tp, layout.pp, scalar_head) if stage is None
              else stage_parameters(model_cfg, layout.tp, layout.pp, stage, scalar_head))
    trained = params if trainable_parameters is None else min(params, trainable_parameters)
    moments = 2 * FP32 * trained
    main_weights = FP32 * trained if e != FP32 else 0
    optimizer = moments + main_weights
    if distributed_optimizer:
        optimizer = -(-optimizer // layout.dp)
    return ModelBytes(weights=params * e, gradients=FP32 * trained, optimizer=optimizer)


def frozen_model_bytes(model_cfg: ModelConfig, layout: Layout, *, scalar_head: bool) -> ModelBytes:
    e = DTYPE_BYTES[model_cfg.params_dtype]
    return ModelBytes(weights=max_stage_parameters(model_cfg, layout.tp, layout.pp, scalar_head) * e,
                      gradients=0, optimizer=0)
