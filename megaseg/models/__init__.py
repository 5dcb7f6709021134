"""megatron-core models built from ModelConfig: the causal LM (actor / reference) and the scalar-head models (reward
model, critic), plus the pipeline-schedule runner. Importing this package imports megatron-core."""
from megaseg.models.gpt import build_gpt_model
from megaseg.models.pipeline import MicroBatch, ModelInputs, forward_backward, forward_only
from megaseg.models.scalar_head import ScalarHeadModel, build_critic, build_reward_model
from megaseg.models.transformer_config import build_transformer_config

__all__ = [
    "build_transformer_config",
    "build_gpt_model",
    "ScalarHeadModel",
    "build_reward_model",
    "build_critic",
    "MicroBatch",
    "ModelInputs",
    "forward_only",
    "forward_backward",
]
