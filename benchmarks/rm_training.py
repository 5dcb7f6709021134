"""Tokens/s of one segment reward-model training step on real HH-RLHF pairs: packed vs right-padded rows, segment vs
bandit segmentation, and megaseg vs a plain Hugging Face transformers implementation of the same step.

    .venv/bin/python benchmarks/rm_training.py [--model smollm2] [--pairs 8] [--micro-batch 4] [--top-layers 4]
        [--rounds 5] [--threads 1] [--cache-dir /tmp/megaseg-bench-cache] [--profile]
    .venv/bin/python benchmarks/rm_training.py --model tiny --pairs 2 --micro-batch 1 --rounds 1    # smoke mode

The step (what train-rm does per optimizer step): zero the gradients, forward + backward of the chosen and rejected
answers of ``--pairs`` pairs (``--micro-batch`` pairs per forward) through backbone + scalar head, segment
Bradley-Terry loss (mean of the head outputs at the segment ends, paper Eq. 3-4), clip, Adam step; only the top
``--top-layers`` layers, the final norm and the head train. (The quickstart's frozen-prefix path, which also skips
the frozen layers' forward after the entropy pass, is not this step: it is measured by the quickstart's own log.)

Data: the first ``--pairs`` pairs of megaseg/resources/data/hh_rlhf_harmless/pairs.jsonl rendered with the model's
chat template and the quickstart's truncation (192 tokens, prompt <= 128), segmented by the entropy pass of the SFT
model at the quickstart's c_ent 4.0 (cached in ``--cache-dir``/segments after the first run) and, for the bandit
step, at the EOS only; collated as train-rm collates them, packed (data.packing, the default) and right-padded.
Models: benchmarks/bench_models.py (SmolLM2-135M-Instruct, or the tiny random Llama).

First, at the same weights, megaseg packed, megaseg padded and transformers must give the same loss (to 1e-4).
Figures (each side timed in interleaved rounds, the order alternating, so a change in the machine's load hits all;
medians of per-round ratios):
- ``megaseg_over_hf``: transformers' step seconds / megaseg's step as train-rm runs it (packed), i.e. megaseg's
  throughput over transformers' on the same pairs (target >= 1.0). The HF step is transformers' LlamaModel (sdpa
  attention, right-padded rows, as a plain HF training step runs) + a Linear head with megaseg's initial head
  weights, the same frozen layers, torch AdamW with the same hyper-parameters and gradient clipping.
- ``megaseg_padded_over_hf``: the same with megaseg on right-padded rows too (the same tokens through both models).
- ``packed_over_padded``: megaseg padded seconds / megaseg packed seconds (target >= 1.3).
- ``segment_over_bandit``: segment-step seconds / bandit-step seconds, packed (same model, same tokens, only the
  segment ends differ; target <= 1.02).
- ``tokens_per_s``: real (non-pad) tokens of the batch / median step seconds, per side (``model_tokens``: what the
  model ran on, the packed length or the padded rows).
The CPU may be shared with other work: compare figures made within one run. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

# Python puts this script's folder first on sys.path, where kernels.py would shadow the `kernels` package that
# transformers probes for at import; the siblings are imported as `benchmarks.*` from the repository root instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.bench_models import BenchCheckpoints, bench_checkpoints, profile_table  # noqa: E402

LOSS_TOLERANCE = 1e-4
# The quickstart's data and reward-model settings (megaseg/resources/configs/quickstart.yaml).
BENCH_OVERRIDES = ("data.train_path=shipped:hh_rlhf_harmless/pairs.jsonl", "data.eval_fraction=0",
                   "data.max_length=192", "data.max_prompt_length=128", "segmentation.entropy_cutoff=4.0",
                   "rm.aggregation=mean", "rm.optimizer.lr=1e-4", "rm.optimizer.warmup_ratio=0",
                   "rm.optimizer.grad_clip=1.0")


def bench_config(checkpoints: BenchCheckpoints, args: argparse.Namespace, mode: str):
    from megaseg.config import load_config

    top = f"rm.train_top_layers={args.top_layers}" if args.top_layers else "rm.train_top_layers=null"
    return load_config(str(checkpoints.model_yaml), [
        *BENCH_OVERRIDES, top, f"data.max_samples={args.pairs}", f"segmentation.mode={mode}",
        f"segmentation.cache_dir={Path(args.cache_dir).absolute() / 'segments'}",
        f"logging.out_dir={Path(args.cache_dir).absolute() / 'rm-bench-run'}"])


def segmented_batches(config, parallel_ctx, micro_batch: int):
    """({packing: the step's RewardMicroBatches} for right-padded (False) and packed (True) rows, as train-rm
    collates them; the pairs' segment statistics)."""
    from megaseg.training.reward_model.batches import collate_step
    from megaseg.training.reward_model.data import load_reward_model_data

    data = load_reward_model_data(config, parallel_ctx)
    if len(data.train) % micro_batch:
        raise SystemExit(f"--pairs {len(data.train)} must be a multiple of --micro-batch {micro_batch}")
    return ({packing: collate_step(data.train, micro_batch, data.pad_id, packing=packing) for packing in (False, True)},
            data.describe())


@dataclass
class RewardStep:
    """One optimizer step of a side: ``run(micro_batches, update=True)`` -> the step's mean pair loss (before the
    update; ``update=False``: forward + backward only, the weights stay)."""

    name: str
    run: Callable[..., float]


def megaseg_step(config, total_steps: int) -> tuple[RewardStep, torch.Tensor]:
    """megaseg's train-rm step (trainer's forward_backward + optimizer) and the head's initial weight."""
    from megaseg.checkpoint.sft import load_sft_scalar_head_model
    from megaseg.models.pipeline import forward_backward
    from megaseg.training.common.optimizer import setup_training
    from megaseg.training.reward_model.loss import STAT_NAMES, segment_preference_loss, zero_statistics

    model = load_sft_scalar_head_model(config, "train-rm")
    head_weight = model.head.weight.detach().clone()
    setup = setup_training(model, config.rm.optimizer, total_steps, config.rm.train_top_layers)
    loss_fn = partial(segment_preference_loss, aggregation=config.rm.aggregation)
    loss_index, pairs_index = STAT_NAMES.index("loss_sum"), STAT_NAMES.index("num_pairs")

    def run(micro_batches, update: bool = True) -> float:
        setup.zero_grads()
        outputs = forward_backward(setup.model, micro_batches, loss_fn)
        if update:
            setup.step()
        stats = sum((output["stats"] for output in outputs), zero_statistics())
        return float(stats[loss_index] / stats[pairs_index])

    return RewardStep("megaseg", run), head_weight


class HFRewardModel(torch.nn.Module):
    """transformers' backbone (final norm included) + Linear(hidden, 1, bias=False): values ``[batch, seq]``."""

    def __init__(self, checkpoints: BenchCheckpoints, head_weight: torch.Tensor):
        from transformers import AutoModel

        super().__init__()
        self.backbone = AutoModel.from_pretrained(str(checkpoints.hf_dir), dtype=torch.float32,
                                                  attn_implementation="sdpa", local_files_only=True)
        self.head = torch.nn.Linear(head_weight.shape[1], 1, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # No attention mask: causal only, as megaseg's right-padded step (padding never precedes a real token).
        hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1)

    def freeze_all_but_top_layers(self, num_layers: int | None) -> None:
        if num_layers is None:
            return
        self.requires_grad_(False)
        for module in (*self.backbone.layers[-num_layers:], self.backbone.norm, self.head):
            module.requires_grad_(True)


def hf_segment_loss(values: torch.Tensor, segment_ends: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """The segment BT loss written out in plain torch (not megaseg's algorithms): e = mean of ``values`` at each
    row's segment ends, loss = -mean log sigmoid(e_chosen - e_rejected); rows [0, P) chosen, [P, 2P) rejected."""
    ends = segment_ends.float()
    scores = (values * ends).sum(dim=1) / ends.sum(dim=1)
    return -torch.nn.functional.logsigmoid(scores[:num_pairs] - scores[num_pairs:]).mean()


def hf_step(checkpoints: BenchCheckpoints, config, head_weight: torch.Tensor) -> RewardStep:
    opt = config.rm.optimizer
    model = HFRewardModel(checkpoints, head_weight).train()
    model.freeze_all_but_top_layers(config.rm.train_top_layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                                  weight_decay=opt.weight_decay)

    def run(micro_batches, update: bool = True) -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro_batches:
            loss = hf_segment_loss(model(batch.input_ids, batch.position_ids), batch.segment_ends, batch.num_pairs)
            (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, opt.grad_clip)
        if update:
            optimizer.step()
        return total

    return RewardStep("hf", run)


def timed_rounds(calls: Sequence[tuple[str, Callable[[], float]]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every call in each of ``rounds`` rounds; the order alternates between rounds so that neither
    side always runs first after the other."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in calls}
    for index in range(rounds):
        for name, call in (calls if index % 2 == 0 else list(reversed(calls))):
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
        print("round " + ", ".join(f"{name} {values[-1]:.3f} s" for name, values in seconds.items()), flush=True)
    return seconds


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(numerators, denominators)), 3)


def side_summary(seconds: Sequence[float], micro_batches) -> dict:
    """Step seconds, real tokens, the tokens the model ran on (packed length or padded rows) and real tokens/s."""
    tokens = sum(batch.num_tokens for batch in micro_batches)
    model_tokens = sum(batch.packing.packed_length if batch.packing is not None else batch.input_ids.numel()
                       for batch in micro_batches)
    median = statistics.median(seconds)
    return {"seconds": [round(s, 3) for s in seconds], "median_step_s": round(median, 3), "tokens": tokens,
            "model_tokens": model_tokens, "tokens_per_s": round(tokens / median, 1)}


def measure_segment_over_bandit(step: RewardStep, segment_batches, bandit_batches, rounds: int) -> dict:
    """Segment vs bandit segmentation on one model: same token batch, other segment ends."""
    assert all(torch.equal(s.input_ids, b.input_ids) for s, b in zip(segment_batches, bandit_batches))
    step.run(bandit_batches)  # warm-up of the bandit layout (the segment one warmed up in the loss check)
    seconds = timed_rounds([("segment", lambda: step.run(segment_batches)),
                            ("bandit", lambda: step.run(bandit_batches))], rounds)
    return {"segment": side_summary(seconds["segment"], segment_batches),
            "bandit": side_summary(seconds["bandit"], bandit_batches),
            "segment_over_bandit": median_ratio(seconds["segment"], seconds["bandit"])}


def measure_versus_hf(megaseg: RewardStep, hf: RewardStep, batches: dict, rounds: int,
                      profile: bool = False) -> dict:
    """megaseg's step on packed and on right-padded rows vs transformers' (right-padded, as a plain HF step runs) on
    the same pairs. First, at the same weights (no update), all three must give the same loss; ``profile``: then
    print torch.profiler's operator table of one more step of each (not timed)."""
    losses = {"megaseg_packed": megaseg.run(batches[True], update=False),
              "megaseg_padded": megaseg.run(batches[False], update=False),
              "hf": hf.run(batches[False], update=False)}
    if max(losses.values()) - min(losses.values()) > LOSS_TOLERANCE:
        raise SystemExit(f"the steps compute different losses on the same weights and pairs: {losses} "
                         f"(tolerance {LOSS_TOLERANCE})")
    print(f"same loss: {losses}", flush=True)
    if profile:
        for name, side, side_batches in (("megaseg packed", megaseg, batches[True]), ("hf", hf, batches[False])):
            print(f"torch.profiler, one {name} step:\n" + profile_table(lambda: side.run(side_batches), 30),
                  flush=True)
    for side, side_batches in ((megaseg, batches[True]), (megaseg, batches[False]), (hf, batches[False])):
        side.run(side_batches)  # warm-up of each layout
    seconds = timed_rounds([("megaseg_packed", lambda: megaseg.run(batches[True])),
                            ("megaseg_padded", lambda: megaseg.run(batches[False])),
                            ("hf", lambda: hf.run(batches[False]))], rounds)
    return {"first_step_loss": {name: round(loss, 6) for name, loss in losses.items()},
            "megaseg_packed": side_summary(seconds["megaseg_packed"], batches[True]),
            "megaseg_padded": side_summary(seconds["megaseg_padded"], batches[False]),
            "hf": side_summary(seconds["hf"], batches[False]),
            "megaseg_over_hf": median_ratio(seconds["hf"], seconds["megaseg_packed"]),
            "megaseg_padded_over_hf": median_ratio(seconds["hf"], seconds["megaseg_padded"]),
            "packed_over_padded": median_ratio(seconds["megaseg_padded"], seconds["megaseg_packed"])}


def run(args: argparse.Namespace) -> dict:
    from megaseg.parallel import destroy_parallel, initialize_parallel

    checkpoints = bench_checkpoints(args.model, args.cache_dir)
    segment_config = bench_config(checkpoints, args, "entropy")
    ctx = initialize_parallel(segment_config.parallel, segment_config.seed)
    try:
        segment_batches, described = segmented_batches(segment_config, ctx, args.micro_batch)
        bandit_batches, _ = segmented_batches(bench_config(checkpoints, args, "bandit"), ctx, args.micro_batch)
        print(described, flush=True)
        # The schedule spans every step the measurements take (warm-ups included).
        megaseg, head_weight = megaseg_step(segment_config, total_steps=5 * args.rounds + 8)
        hf = hf_step(checkpoints, segment_config, head_weight)
        versus_hf = measure_versus_hf(megaseg, hf, segment_batches, args.rounds, args.profile)
        # As train-rm runs it (data.packing, on by default).
        layout = segment_config.data.packing
        versus_bandit = measure_segment_over_bandit(megaseg, segment_batches[layout], bandit_batches[layout],
                                                    args.rounds)
        return {"model": args.model, "num_layers": segment_config.model.num_layers, "top_layers": args.top_layers,
                "pairs_per_step": args.pairs, "micro_batch_pairs": args.micro_batch,
                "padded_seq": [batch.input_ids.shape[1] for batch in segment_batches[False]], "rounds": args.rounds,
                "threads": torch.get_num_threads(), "segments": described,
                "tokens_per_s": versus_hf["megaseg_packed"]["tokens_per_s"],
                "packed_over_padded": versus_hf["packed_over_padded"],
                "segment_over_bandit": versus_bandit["segment_over_bandit"],
                "megaseg_over_hf": versus_hf["megaseg_over_hf"],
                "megaseg_padded_over_hf": versus_hf["megaseg_padded_over_hf"],
                "versus_hf": versus_hf, "versus_bandit": versus_bandit}
    finally:
        destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--top-layers", type=int, default=4, help="train only the top N layers + head (0: all)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward pass")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after the warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cache-dir", default="/tmp/megaseg-bench-cache")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's table of one megaseg and one transformers step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
