"""Everything a PPO run needs, built from the config: tokenizer and prompts, the four models, the reward parts.

- actor and reference: the SFT causal LM (model.checkpoint, a megatron dist checkpoint); the reference is frozen and
  also gives the segmentation entropies (the frozen SFT model of the method).
- critic: the SFT backbone with a fresh scalar head (paper App. D).
- reward model: rm.checkpoint (a `megaseg train-rm` directory), loaded at this run's TP/PP, with its normalizer
  (normalizer.path or <rm dir>/normalizer.json), both checked against ppo.reward_granularity (reward_plan).

``assemble_ppo_run`` takes already-built models, so tests run the same trainer on tiny models and hand-written
rewards.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from megaseg.algorithms.normalizer import Normalizer
from megaseg.algorithms.segmentation import sentence_end_mask
from megaseg.config import MegasegConfig
from megaseg.data.batch import SequenceBatch
from megaseg.data.encoding import TokenizedPrompt
from megaseg.data.sampler import ResumableShardedSampler
from megaseg.training.ppo.experience import ExperienceSources
from megaseg.training.common.optimizer import setup_training
from megaseg.training.ppo.step import (
    PPORun,
    build_kl_controller,
    check_batch_layout,
    optimizer_steps_per_ppo_step,
    total_ppo_steps,
)
from megaseg.training.ppo.reward_plan import RewardPlan, check_reward_model, load_matching_normalizer, resolve_reward_plan
from megaseg.training.ppo.reward_shaping import SegmentScorer, SentenceMarker
from megaseg.generation.rollout import RolloutFn, megatron_rollout


class TokenizerSentenceMarker:
    """Sentence ends from the tokenizer's token texts, by the same rule the reward model was segmented with."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, sequences: SequenceBatch) -> torch.Tensor:
        from megaseg.segmentation.cutting import response_token_texts

        rows = []
        for row in range(sequences.batch_size):
            columns = torch.nonzero(sequences.response_mask[row]).flatten()
            texts = [""] * sequences.seq_length
            ids = sequences.input_ids[row, columns].tolist()
            for column, text in zip(columns.tolist(), response_token_texts(self.tokenizer, ids, self._texts)):
                texts[column] = text
            rows.append(texts)
        return sentence_end_mask(rows, (sequences.batch_size, sequences.seq_length),
                                 device=sequences.response_mask.device)


@dataclasses.dataclass(frozen=True)
class PolicyModels:
    """This rank's stages of the models PPO reads or trains (not yet wrapped for training)."""

    actor: torch.nn.Module      # GPTModel, from the SFT weights
    reference: torch.nn.Module  # GPTModel, frozen copy of the SFT weights
    critic: torch.nn.Module     # scalar-head model, SFT backbone + fresh head


def assemble_ppo_run(config: MegasegConfig, parallel_ctx: Any, *, models: PolicyModels, plan: RewardPlan,
                     scorer: SegmentScorer, normalizer: Normalizer, prompts: Sequence[TokenizedPrompt],
                     rollout_fn: RolloutFn, stop_token_ids: Sequence[int], pad_token_id: int,
                     sentence_marker: Optional[SentenceMarker] = None,
                     decode: Optional[Callable[[list[int]], str]] = None,
                     eval_prompts: Sequence[TokenizedPrompt] = ()) -> PPORun:
    """Wrap actor and critic for training (DDP, Adam, LR schedules over the whole run), freeze the reference."""
    check_batch_layout(config, parallel_ctx.dp_size)
    ppo = config.ppo
    total_steps = total_ppo_steps(config, len(prompts), parallel_ctx.dp_size)
    optimizer_steps = total_steps * optimizer_steps_per_ppo_step(config)
    actor = setup_training(models.actor, ppo.actor_optimizer, optimizer_steps, ppo.actor_train_top_layers)
    critic = setup_training(models.critic, ppo.critic_optimizer, optimizer_steps, ppo.critic_train_top_layers)
    models.reference.eval()
    for param in models.reference.parameters():
        param.requires_grad_(False)
    sources = ExperienceSources(actor=actor.model, reference=models.reference, critic=critic.model, scorer=scorer,
                                normalizer=normalizer, sentence_marker=sentence_marker)
    sampler = ResumableShardedSampler(len(prompts), seed=config.seed, dp_rank=parallel_ctx.dp_rank,
                                      dp_size=parallel_ctx.dp_size, shuffle=config.data.shuffle, drop_last=True)
    return PPORun(config=config, parallel_ctx=parallel_ctx, plan=plan, actor=actor, critic=critic, sources=sources,
                  prompts=list(prompts), sampler=sampler, rollout_fn=rollout_fn,
                  stop_token_ids=tuple(int(i) for i in stop_token_ids), pad_token_id=pad_token_id,
                  kl_controller=build_kl_controller(config), total_steps=total_steps, decode=decode,
                  eval_prompts=list(eval_prompts))


def load_policy_models(config: MegasegConfig) -> PolicyModels:
    """Actor, reference and critic from model.checkpoint (the SFT model as `megaseg convert` writes it)."""
    from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.scalar_head import build_critic
    from megaseg.checkpoint.reward_model_dir import initialize_from_sft

    sft = config.model.checkpoint
    if sft is None or not (Path(sft) / "metadata.json").is_file():
        raise ValueError(f"model.checkpoint={sft!r} is not a megatron dist checkpoint of the SFT model; PPO starts "
                         "actor, reference and critic from it. Convert one with `megaseg convert hf-to-megatron "
                         "--hf DIR --out DIR` (or gguf-to-hf first) and set model.checkpoint")
    actor = build_gpt_model(config.model, config.parallel)
    load_model_checkpoint(actor, Path(sft))
    reference = build_gpt_model(config.model, config.parallel)
    load_model_checkpoint(reference, Path(sft))
    critic = build_critic(config.model, config.parallel)
    initialize_from_sft(critic, sft)
    return PolicyModels(actor=actor, reference=reference, critic=critic)


@dataclasses.dataclass(frozen=True)
class RewardParts:
    plan: RewardPlan
    reward_model: torch.nn.Module
    rm_config: MegasegConfig
    normalizer: Normalizer


def load_reward_parts(config: MegasegConfig, parallel_ctx: Any) -> RewardParts:
    """The reward model of rm.checkpoint and its normalizer, both checked against the run's granularity."""
    from megaseg.checkpoint.reward_model_dir import load_reward_model, resolve_reward_model_dir

    if config.rm.checkpoint is None:
        raise ValueError("rm.checkpoint is not set; point it at the reward model `megaseg train-rm` wrote "
                         "(<its logging.out_dir>/reward_model)")
    rm_dir = str(resolve_reward_model_dir(config.rm.checkpoint))
    reward_model, rm_config = load_reward_model(rm_dir, parallel_ctx)
    # PPO scores with the reward model's own aggregation; the run's rm section only names the checkpoint.
    config = dataclasses.replace(config, rm=dataclasses.replace(config.rm, aggregation=rm_config.rm.aggregation))
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
    normalizer = load_matching_normalizer(plan, config, rm_config, rm_dir)
    return RewardParts(plan=plan, reward_model=reward_model, rm_config=rm_config, normalizer=normalizer)


def _same_path(first: Optional[str], second: Optional[str]) -> bool:
    if first is None or second is None:
        return first == second
    return Path(first).resolve() == Path(second).resolve()


def build_rollout_fn(config: MegasegConfig, pad_token_id: int) -> RolloutFn:
    return megatron_rollout(config.ppo.generation_backend, pad_token_id)
