"""A PPO run built from the config: tokenizer and prompts, the four models, the reward parts -> ``PPOTrainer``.

- actor and reference: the SFT causal LM (model.checkpoint); the reference is frozen and also gives the segmentation
  entropies (the frozen SFT model of the method).
- critic: the SFT backbone with a fresh, seeded scalar head (paper App. D).
- reward model: rm.checkpoint (a `megaseg train-rm` directory), loaded at this run's TP/PP, with its normalizer
  (normalizer.path or <rm dir>/normalizer.json), both checked against ppo.reward_granularity (reward_plan).

PPO scores with the reward model's own aggregation: the run takes ``rm.aggregation`` from the reward model, so the
config the run saves is the config it ran; an explicit ``rm.aggregation`` that differs is an error naming both.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import torch

from megaseg.algorithms.normalizer import Normalizer
from megaseg.checkpoint.reward_model_dir import load_reward_model, resolve_reward_model_dir
from megaseg.checkpoint.sft import load_sft_language_model, load_sft_scalar_head_model
from megaseg.config import MegasegConfig
from megaseg.config.loader import absolute_local_paths
from megaseg.generation.rollout import megatron_rollout
from megaseg.parallel.initialize import ParallelContext
from megaseg.segmentation.cutting import TokenizerSentenceMarker
from megaseg.training.ppo.experience import RewardModelScorer
from megaseg.training.ppo.reward_plan import RewardPlan, check_reward_model, load_plan_normalizer, resolve_reward_plan
from megaseg.training.ppo.trainer import PolicyModels, PPOTrainer


@dataclasses.dataclass(frozen=True)
class RewardParts:
    config: MegasegConfig            # the run's config with the reward model's aggregation
    plan: RewardPlan
    reward_model: torch.nn.Module
    rm_config: MegasegConfig
    normalizer: Normalizer


def with_reward_model_aggregation(config: MegasegConfig, rm_config: MegasegConfig, rm_dir: str,
                                  explicit_keys: frozenset[str]) -> MegasegConfig:
    """``config`` with rm.aggregation = the reward model's; ValueError when the user set another one explicitly."""
    trained = rm_config.rm.aggregation
    if "rm.aggregation" in explicit_keys and config.rm.aggregation != trained:
        raise ValueError(f"rm.aggregation={config.rm.aggregation!r} was set, but the reward model {rm_dir} was "
                         f"trained with rm.aggregation={trained!r}; PPO scores with the reward model's aggregation: "
                         f"drop the setting or set rm.aggregation={trained}")
    return dataclasses.replace(config, rm=dataclasses.replace(config.rm, aggregation=trained))


def load_reward_parts(config: MegasegConfig, parallel_ctx: ParallelContext,
                      explicit_keys: frozenset[str] = frozenset()) -> RewardParts:
    """The reward model of rm.checkpoint and its normalizer, both checked against the run's granularity."""
    if config.rm.checkpoint is None:
        raise ValueError("rm.checkpoint is not set; point it at the reward model `megaseg train-rm` wrote "
                         "(<its logging.out_dir>/reward_model)")
    rm_dir = str(resolve_reward_model_dir(config.rm.checkpoint))
    reward_model, rm_config = load_reward_model(rm_dir, parallel_ctx)
    config = with_reward_model_aggregation(config, rm_config, rm_dir, explicit_keys)
    plan = resolve_reward_plan(config)
    check_reward_model(plan, rm_config, rm_dir)
    if rm_config.model.vocab_size != config.model.vocab_size:
        raise ValueError(f"the reward model {rm_dir} has model.vocab_size={rm_config.model.vocab_size}, the policy "
                         f"{config.model.vocab_size}: it cannot read the policy's token ids; use a reward model "
                         "trained from the same backbone family (same tokenizer)")
    if plan.entropy_needed and not _same_path(rm_config.model.checkpoint, config.model.checkpoint):
        warnings.warn(f"the reward model was segmented with the entropies of {rm_config.model.checkpoint}, this run "
                      f"computes them with {config.model.checkpoint}; segment boundaries may differ from the reward "
                      "model's training data")
    normalizer = load_plan_normalizer(plan, config, rm_config, rm_dir)
    return RewardParts(config=config, plan=plan, reward_model=reward_model, rm_config=rm_config,
                       normalizer=normalizer)


def _same_path(first: Optional[str], second: Optional[str]) -> bool:
    if first is None or second is None:
        return first == second
    return Path(first).resolve() == Path(second).resolve()


def load_policy_models(config: MegasegConfig) -> PolicyModels:
    """Actor, reference and critic from model.checkpoint (the SFT model as `megaseg convert` writes it)."""
    return PolicyModels(actor=load_sft_language_model(config, "train-ppo"),
                        reference=load_sft_language_model(config, "train-ppo", frozen=True),
                        critic=load_sft_scalar_head_model(config, "train-ppo"))


def build_ppo_trainer(config: MegasegConfig, parallel_ctx: ParallelContext,
                      explicit_keys: frozenset[str] = frozenset()) -> PPOTrainer:
    """Every input checked (prompts, reward model, normalizer, SFT checkpoint) before any output is written."""
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.splits import load_prompt_set
    from megaseg.data.tokenizer import load_tokenizer, padding_token_id

    config = absolute_local_paths(config)
    if config.data.prompt_path is None:
        raise ValueError("data.prompt_path is not set; give a prompt file, e.g. "
                         "data.prompt_path=shipped:prompts/arena-hard-v0.1_question.jsonl")
    if config.model.tokenizer is None:
        raise ValueError("model.tokenizer is not set; give the SFT model's tokenizer directory or GGUF file")
    tokenizer = load_tokenizer(config.model.tokenizer)
    renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
    prompts = load_prompt_set(config.data.prompt_path, config.data, renderer,
                              max_prompt_length=config.ppo.max_prompt_length, max_samples=config.data.max_samples)
    eval_prompts = []
    if config.ppo.eval_every:
        if config.data.eval_prompt_path is None:
            raise ValueError(f"ppo.eval_every={config.ppo.eval_every} needs held-out prompts: set "
                             "data.eval_prompt_path (or ppo.eval_every=0)")
        eval_prompts = load_prompt_set(config.data.eval_prompt_path, config.data, renderer,
                                       max_prompt_length=config.ppo.max_prompt_length,
                                       max_samples=config.ppo.eval_max_prompts).prompts
    reward = load_reward_parts(config, parallel_ctx, explicit_keys)
    config = reward.config
    pad_id = padding_token_id(tokenizer)
    marker = TokenizerSentenceMarker(tokenizer) if reward.plan.segmentation.mode == "sentence" else None
    return PPOTrainer(
        config, parallel_ctx, models=load_policy_models(config), reward_plan=reward.plan,
        scorer=RewardModelScorer(reward.reward_model, parallel_ctx, config.ppo.micro_rollout_batch_size,
                                 packing=config.data.packing),
        normalizer=reward.normalizer, prompts=prompts.prompts,
        rollout_fn=megatron_rollout(config.ppo.generation_backend, pad_id), stop_token_ids=renderer.stop_token_ids,
        pad_token_id=pad_id, sentence_marker=marker, decode=lambda ids: tokenizer.decode(ids),
        eval_prompts=eval_prompts)
