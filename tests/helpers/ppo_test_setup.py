"""Shared pieces of the PPO tests: a tiny config, random prompts, a plain sampling loop, hand-written rewards, and a
PPOTrainer on tiny random models (built inside spawned ranks, see megaseg.parallel.spawn.run_distributed).

The sampling loop here is deliberately the slow obvious one (a full forward per new token, no KV cache), so the PPO
tests do not depend on megaseg.generation; it works under TP (vocab shards gathered) and PP (tokens broadcast from
the last stage).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megaseg.config import MegasegConfig, load_config
from megaseg.data.batch import PromptBatch, SequenceBatch
from megaseg.data.encoding import TokenizedPrompt

VOCAB = 128
PAD_ID = 0
EOS_ID = 1
# Tokens a hand-written reward likes (the synthetic task).
LIKED_TOKENS = tuple(range(10, 42))

BASE_OVERRIDES = (
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    f"model.vocab_size={VOCAB}", "model.max_position_embeddings=64",
    "ppo.rollout_batch_size=4", "ppo.train_batch_size=2", "ppo.micro_batch_size=1", "ppo.micro_rollout_batch_size=2",
    "ppo.max_new_tokens=6", "ppo.max_prompt_length=8", "ppo.actor_optimizer.lr=1e-3",
    "ppo.critic_optimizer.lr=1e-3", "ppo.actor_optimizer.warmup_ratio=0", "ppo.critic_optimizer.warmup_ratio=0",
    "ppo.actor_optimizer.scheduler=constant", "ppo.critic_optimizer.scheduler=constant",
    "segmentation.entropy_cutoff=4.5", "segmentation.entropy_chunk_size=null", "logging.tensorboard=false",
)


def tiny_config(*overrides: str) -> MegasegConfig:
    return load_config(None, [*BASE_OVERRIDES, *overrides])


def random_prompts(num: int, seed: int = 3, min_length: int = 3, max_length: int = 6) -> list[TokenizedPrompt]:
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for index in range(num):
        length = int(torch.randint(min_length, max_length + 1, (1,), generator=generator))
        ids = torch.randint(2, VOCAB, (length,), generator=generator).tolist()
        prompts.append(TokenizedPrompt(id=f"p{index}", source=f"test:{index}", prompt_ids=tuple(ids)))
    return prompts


def _gathered_last_logits(model, tokens: torch.Tensor, columns: torch.Tensor, ctx) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [B, V] at each row's ``columns`` on the last stage (None elsewhere)."""
    from megaseg.models.pipeline import MicroBatch, forward_only

    width = tokens.shape[1]
    batch = MicroBatch(tokens, torch.arange(width).expand_as(tokens).contiguous())
    outputs = forward_only(model, [batch], lambda out, b: out[torch.arange(out.shape[0]), columns])
    if not ctx.is_last_pipeline_stage:
        return None
    shard = outputs[0].contiguous()
    if ctx.tp_size == 1:
        return shard
    shards = [torch.empty_like(shard) for _ in range(ctx.tp_size)]
    dist.all_gather(shards, shard, group=ctx.tp_group)
    return torch.cat(shards, dim=-1)


def plain_rollout(model, prompts: PromptBatch, settings, ctx, generator) -> SequenceBatch:
    """Sample responses with a full forward per token; every model-parallel rank returns the same batch."""
    lengths = prompts.attention_mask.sum(dim=1)
    num_rows, prompt_width = prompts.input_ids.shape
    width = int(lengths.max()) + settings.max_new_tokens
    tokens = torch.full((num_rows, width), PAD_ID, dtype=torch.long)
    for row in range(num_rows):
        tokens[row, :lengths[row]] = prompts.input_ids[row, prompt_width - lengths[row]:]
    generated = torch.zeros(num_rows, dtype=torch.long)
    stopped = torch.zeros(num_rows, dtype=torch.bool)
    stop_ids = torch.tensor(settings.stop_token_ids)
    was_training = model.training
    model.eval()
    for _ in range(settings.max_new_tokens):
        ends = lengths + generated
        logits = _gathered_last_logits(model, tokens[:, :int(ends.max())], ends - 1, ctx)
        next_tokens = torch.empty(num_rows, dtype=torch.long)
        if logits is not None:
            if settings.is_greedy:
                next_tokens = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if ctx.pp_size > 1:
            dist.broadcast(next_tokens, src=dist.get_global_rank(ctx.pp_group, ctx.pp_size - 1), group=ctx.pp_group)
        active = ~stopped & (generated < settings.max_new_tokens)
        for row in torch.nonzero(active).flatten().tolist():
            tokens[row, ends[row]] = next_tokens[row]
        generated += active.long()
        stopped |= active & torch.isin(next_tokens, stop_ids)
        if bool((stopped | (generated >= settings.max_new_tokens)).all()):
            break
    model.train(was_training)
    total = lengths + generated
    seq_length = int(total.max())
    columns = torch.arange(seq_length)[None, :]
    attention = columns < total[:, None]
    response = attention & (columns >= lengths[:, None])
    eos = (columns == (total - 1)[:, None]) & stopped[:, None]
    return SequenceBatch(input_ids=tokens[:, :seq_length], attention_mask=attention, response_mask=response,
                         eos_mask=eos, position_ids=torch.where(attention, columns.expand_as(attention), 0))


class LikedTokenReward:
    """A known segment reward: the fraction of a segment's tokens that are in ``LIKED_TOKENS``, minus 0.5."""

    def __call__(self, sequences: SequenceBatch, segment_ends: torch.Tensor) -> torch.Tensor:
        liked = torch.isin(sequences.input_ids, torch.tensor(LIKED_TOKENS)).float()
        out = torch.zeros(sequences.input_ids.shape)
        for row in range(sequences.batch_size):
            start = None
            for column in torch.nonzero(sequences.response_mask[row]).flatten().tolist():
                start = column if start is None else start
                if segment_ends[row, column]:
                    out[row, column] = liked[row, start:column + 1].mean() - 0.5
                    start = None
        return out


def sentence_marker_every_7th(sequences: SequenceBatch) -> torch.Tensor:
    """A stand-in for token texts on the tiny vocabulary: ids divisible by 7 'end a sentence'."""
    return (sequences.input_ids % 7 == 0) & sequences.response_mask


def build_tiny_models(config: MegasegConfig):
    """Actor, an identical frozen reference, and a critic with the actor's backbone and a fresh head."""
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.scalar_head import build_critic
    from megaseg.training.ppo.trainer import PolicyModels

    actor = build_gpt_model(config.model, config.parallel)
    reference = build_gpt_model(config.model, config.parallel)
    reference.load_state_dict(actor.state_dict())
    critic = build_critic(config.model, config.parallel, seed=config.seed)
    backbone = {key: value for key, value in actor.state_dict().items() if not key.startswith("output_layer")}
    result = critic.load_state_dict(backbone, strict=False)
    assert all(key.startswith("head.") for key in result.missing_keys), result.missing_keys
    return PolicyModels(actor=actor, reference=reference, critic=critic)


def build_tiny_run(config: MegasegConfig, ctx: Any, *, scorer=None, normalizer=None, plan=None,
                   prompts: Optional[Sequence[TokenizedPrompt]] = None, models=None, sentence_marker=None):
    """A PPOTrainer on tiny random models; the reward is ``LikedTokenReward`` and no normalization unless given."""
    from megaseg.algorithms.normalizer import IdentityNormalizer
    from megaseg.training.ppo.reward_plan import resolve_reward_plan
    from megaseg.training.ppo.trainer import PPOTrainer

    plan = plan or resolve_reward_plan(config)
    normalizer = normalizer or IdentityNormalizer(model="tiny", c_ent=None, aggregation="mean",
                                                  segmentation=plan.segmentation.mode)
    return PPOTrainer(
        config, ctx, models=models or build_tiny_models(config), reward_plan=plan, scorer=scorer or LikedTokenReward(),
        normalizer=normalizer, prompts=prompts or random_prompts(8), rollout_fn=plain_rollout,
        stop_token_ids=(EOS_ID,), pad_token_id=PAD_ID,
        sentence_marker=sentence_marker or sentence_marker_every_7th,
        decode=lambda ids: " ".join(map(str, ids)))


def run_ppo_steps(trainer, num_steps: int, progress=None) -> tuple[list[dict], object]:
    """``num_steps`` steps of ``trainer`` from ``progress`` (a fresh start by default), as the training loop runs
    them, without logging or checkpoints; (every step's metrics, the progress after the last)."""
    from megaseg.checkpoint.step_dirs import TrainingProgress

    progress = progress or TrainingProgress()
    history = []
    for _ in range(num_steps):
        _, progress = trainer.train_one_step(progress)
        history.append(dict(trainer.last_metrics))
    return history, progress
