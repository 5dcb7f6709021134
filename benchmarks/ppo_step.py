"""Seconds per phase of one PPO step on SmolLM2, and the share of the reward machinery in the step.

    .venv/bin/python benchmarks/ppo_step.py [--model smollm2] [--steps 3] [--rollout-batch 8] [--max-new-tokens 48]
        [--threads 1] [--cache-dir /tmp/megaseg-bench-cache]
    .venv/bin/python benchmarks/ppo_step.py --model tiny --steps 1 --rollout-batch 2 --max-new-tokens 4  # smoke mode

The step is megaseg's own: ``PPOTrainer.train_one_step`` with its named, timed phases (megaseg.training.ppo):

    rollout -> actor_forward -> reference_forward -> critic_forward -> segmentation -> score_segments
    -> shape_rewards -> advantages -> update_critic -> update_actor

Setup (examples/ppo_cpu.yaml's settings: segment rewards, even interpolation, location normalizer, c_ent 4.0, top 6
layers of actor and critic train, micro-batches of 2 for the updates): actor, reference and critic from the SFT
weights (benchmarks/bench_models.py: SmolLM2-135M-Instruct, or the tiny random Llama), Arena-Hard prompts shipped in
megaseg/resources/data/prompts, sampled with the paper's rollout settings (temperature 1, top-p 1) and the KV-cache
sampler. The reward model is the SFT backbone with a fresh seeded head and the normalizer has fixed coefficients
(the paper's Phi-3 fit): a trained reward model and a fitted normalizer cost exactly the same per step.

Reported: each phase's seconds per step (median over ``--steps`` steps after one warm-up step), the step's total,
and ``reward_machinery_share`` = (segmentation + shape_rewards + advantages) / step seconds (target <= 2%);
``shape_rewards`` is the normalizer, the interpolation, the clamp and the KL penalty, ``advantages`` GAE and
whitening. The CPU may be shared with other work: the shares
within one run compare, absolute seconds less so. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, where kernels.py would shadow the `kernels` package that
# transformers probes for at import; the siblings are imported as `benchmarks.*` from the repository root instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.bench_models import BenchCheckpoints, bench_checkpoints  # noqa: E402

from megaseg.parallel.spawn import run_distributed  # noqa: E402

REWARD_MACHINERY = ("segmentation", "shape_rewards", "advantages")
# examples/ppo_cpu.yaml's PPO settings (its model and reward-model paths come from the benchmark's checkpoints).
PPO_OVERRIDES = (
    "data.prompt_path=shipped:prompts/arena-hard-v0.1_question.jsonl", "segmentation.mode=entropy",
    "segmentation.entropy_cutoff=4.0", "segmentation.entropy_chunk_size=null", "normalizer.kind=location",
    "ppo.reward_granularity=segment", "ppo.interpolation=even", "ppo.kl_coef=0.01", "ppo.gamma=1.0", "ppo.lam=0.95",
    "ppo.clip_eps=0.2", "ppo.value_clip=0.25", "ppo.ppo_epochs=1", "ppo.micro_batch_size=2",
    "ppo.max_prompt_length=96", "ppo.temperature=1.0", "ppo.top_p=1.0", "ppo.actor_optimizer.lr=1e-5",
    "ppo.actor_optimizer.warmup_ratio=0", "ppo.actor_optimizer.scheduler=constant", "ppo.critic_optimizer.lr=5e-5",
    "ppo.critic_optimizer.warmup_ratio=0", "ppo.critic_optimizer.scheduler=constant", "ppo.eval_every=0",
    "ppo.generation_backend=kv_cache", "logging.tensorboard=false")
# The paper's Phi-3-mini location normalizer (c_ent 1.75): fixed coefficients of the right shape.
PAPER_NORMALIZER = dict(w_mu=0.7668, w_sigma=0.2569, b_mu=0.4705, b_sigma=2.8339)


def ppo_config(checkpoints: BenchCheckpoints, args: argparse.Namespace):
    from megaseg.config import load_config

    num_layers = checkpoints.model_config().num_layers
    top = min(6, num_layers)
    return load_config(str(checkpoints.model_yaml), [
        *PPO_OVERRIDES, f"ppo.rollout_batch_size={args.rollout_batch}", f"ppo.train_batch_size={args.rollout_batch // 2}",
        f"ppo.micro_rollout_batch_size={args.rollout_batch}", f"ppo.max_new_tokens={args.max_new_tokens}",
        f"ppo.max_steps={args.steps + 1}", f"data.max_samples={args.rollout_batch * (args.steps + 1)}",
        f"ppo.actor_train_top_layers={top}", f"ppo.critic_train_top_layers={top}",
        f"logging.out_dir={Path(args.cache_dir).absolute() / 'ppo-bench-run'}"])


def build_trainer(config, ctx):
    """megaseg's PPOTrainer on the SFT weights, with the reward model and normalizer of the module docstring."""
    from megaseg.algorithms.normalizer import LocationNormalizer
    from megaseg.checkpoint.sft import freeze, load_sft_scalar_head_model
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.splits import load_prompt_set
    from megaseg.data.tokenizer import load_tokenizer, padding_token_id
    from megaseg.generation.rollout import megatron_rollout
    from megaseg.training.ppo.experience import RewardModelScorer
    from megaseg.training.ppo.reward_plan import resolve_reward_plan
    from megaseg.training.ppo.setup import load_policy_models
    from megaseg.training.ppo.trainer import PPOTrainer

    tokenizer = load_tokenizer(config.model.tokenizer)
    renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
    prompts = load_prompt_set(config.data.prompt_path, config.data, renderer,
                              max_prompt_length=config.ppo.max_prompt_length, max_samples=config.data.max_samples)
    plan = resolve_reward_plan(config)
    reward_model = freeze(load_sft_scalar_head_model(config, "train-rm"))
    normalizer = LocationNormalizer(**PAPER_NORMALIZER, p_min=0.01, model=config.model.name,
                                    c_ent=config.segmentation.entropy_cutoff, aggregation=config.rm.aggregation,
                                    segmentation=plan.segmentation.mode)
    pad_id = padding_token_id(tokenizer)
    return PPOTrainer(
        config, ctx, models=load_policy_models(config), reward_plan=plan,
        scorer=RewardModelScorer(reward_model, ctx, config.ppo.micro_rollout_batch_size), normalizer=normalizer,
        prompts=prompts.prompts, rollout_fn=megatron_rollout(config.ppo.generation_backend, pad_id),
        stop_token_ids=renderer.stop_token_ids, pad_token_id=pad_id, decode=None)


def _measure(rank, world_size, config, steps: int):
    from megaseg.checkpoint.step_dirs import TrainingProgress
    from megaseg.parallel import initialize_parallel

    ctx = initialize_parallel(config.parallel, config.seed)
    trainer = build_trainer(config, ctx)
    progress = TrainingProgress()
    per_step = []
    for index in range(steps + 1):  # the first step warms up (allocator, lazy initialisation)
        _, progress = trainer.train_one_step(progress)
        seconds = trainer.timer.pop()
        response_tokens = int(trainer.last_experience.action_mask.sum())
        print(f"step {index}: {sum(seconds.values()):.2f} s, {response_tokens} response tokens "
              f"({'warm-up' if index == 0 else 'timed'})", flush=True)
        if index:
            per_step.append(seconds)
    return per_step


def summarize(per_step: list[dict[str, float]]) -> dict:
    phases = list(per_step[0])
    medians = {name: statistics.median(step[name] for step in per_step) for name in phases}
    totals = [sum(step.values()) for step in per_step]
    shares = [sum(step[name] for name in REWARD_MACHINERY) / total for step, total in zip(per_step, totals)]
    return {"phase_seconds": {name: round(value, 4) for name, value in medians.items()},
            "step_seconds": round(statistics.median(totals), 3),
            "reward_machinery_seconds": round(sum(medians[name] for name in REWARD_MACHINERY), 4),
            "reward_machinery_share": round(statistics.median(shares), 5),
            "phase_share": {name: round(medians[name] / statistics.median(totals), 4) for name in phases}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--rollout-batch", type=int, default=8, help="prompts per step (even)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cache-dir", default="/tmp/megaseg-bench-cache")
    args = parser.parse_args()
    if args.rollout_batch < 2 or args.rollout_batch % 2:
        raise SystemExit(f"--rollout-batch {args.rollout_batch} must be even (train batches are half of it)")
    checkpoints = bench_checkpoints(args.model, args.cache_dir)
    config = ppo_config(checkpoints, args)
    (per_step,) = run_distributed(_measure, 1, config, args.steps, timeout=3600.0, threads_per_rank=args.threads)
    summary = {"model": args.model, "rollout_batch": args.rollout_batch, "max_new_tokens": args.max_new_tokens,
               "steps": args.steps, "threads": args.threads, **summarize(per_step)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
