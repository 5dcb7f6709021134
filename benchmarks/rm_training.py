"""Tokens/s of one segment reward-model training step on real HH-RLHF pairs: segment vs bandit segmentation, and
megaseg vs a plain Hugging Face transformers implementation of the same step.

    .venv/bin/python benchmarks/rm_training.py [--model smollm2] [--pairs 4] [--micro-batch 4] [--top-layers 4]
        [--rounds 3] [--threads 1] [--cache-dir /tmp/megaseg-bench-cache]
    .venv/bin/python benchmarks/rm_training.py --model tiny --pairs 2 --micro-batch 2 --rounds 1    # smoke mode
    .venv/bin/python benchmarks/rm_training.py --packing-compare --pairs 8 --micro-batch 4 --threads 2   # packed vs padded
    .venv/bin/python benchmarks/rm_training.py --profile    # also torch.profiler's table of one step of each side

The step (what train-rm does per optimizer step): zero the gradients, forward + backward of the chosen and rejected
answers of ``--pairs`` pairs (``--micro-batch`` pairs per forward) through backbone + scalar head, segment
Bradley-Terry loss (mean of the head outputs at the segment ends, paper Eq. 3-4), clip, Adam step; only the top
``--top-layers`` layers, the final norm and the head train.

Data: the first ``--pairs`` pairs of megaseg/resources/data/hh_rlhf_harmless/pairs.jsonl rendered with the model's
chat template and the quickstart's truncation (192 tokens, prompt <= 128), segmented by the entropy pass of the SFT
model at the quickstart's c_ent 4.0 (cached in ``--cache-dir``/segments after the first run) and, for the bandit
step, at the EOS only. Models: benchmarks/bench_models.py (SmolLM2-135M-Instruct, or the tiny random Llama).

Figures (each side timed in interleaved rounds, so a change in the machine's load hits both; medians):
- ``segment_over_bandit``: median over rounds of segment-step seconds / bandit-step seconds (same model, same token
  batch, only the segment ends differ; target <= 1.02).
- ``megaseg_over_hf``: median over rounds of hf-step seconds / megaseg-step seconds, i.e. megaseg's throughput over
  transformers' (target >= 1.0). The HF step is transformers' LlamaModel (sdpa attention) + a Linear head with
  megaseg's initial head weights, the same frozen layers, torch AdamW with the same hyper-parameters and gradient
  clipping; the two losses of the first step (same weights, same batch) are checked to agree to 1e-4 first.
- ``tokens_per_s``: real (non-pad) tokens of the batch / median step seconds, per side.
Packed vs padded batches (``packed_over_padded``) is measured beside these by ``measure_packed_over_padded``.
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
    """(the step's RewardMicroBatches, right-padded as train-rm pads them, the pairs' segment statistics)."""
    from megaseg.training.reward_model.batches import collate_step
    from megaseg.training.reward_model.data import load_reward_model_data

    data = load_reward_model_data(config, parallel_ctx)
    if len(data.train) % micro_batch:
        raise SystemExit(f"--pairs {len(data.train)} must be a multiple of --micro-batch {micro_batch}")
    return collate_step(data.train, micro_batch, data.pad_id), data.describe()


@dataclass
class RewardStep:
    """One optimizer step of a side: ``run(micro_batches)`` -> the step's mean pair loss (before the update)."""

    name: str
    run: Callable[[Sequence], float]


def megaseg_step(config, total_steps: int) -> tuple[RewardStep, torch.Tensor]:
    """megaseg's train-rm step (trainer's forward_backward + optimizer) and the head's initial weight."""
    from functools import partial

    from megaseg.checkpoint.sft import load_sft_scalar_head_model
    from megaseg.models.pipeline import forward_backward
    from megaseg.training.common.optimizer import setup_training
    from megaseg.training.reward_model.loss import STAT_NAMES, segment_preference_loss, zero_statistics

    model = load_sft_scalar_head_model(config, "train-rm")
    head_weight = model.head.weight.detach().clone()
    setup = setup_training(model, config.rm.optimizer, total_steps, config.rm.train_top_layers)
    loss_fn = partial(segment_preference_loss, aggregation=config.rm.aggregation)
    loss_index, pairs_index = STAT_NAMES.index("loss_sum"), STAT_NAMES.index("num_pairs")

    def run(micro_batches) -> float:
        setup.zero_grads()
        outputs = forward_backward(setup.model, micro_batches, loss_fn)
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

    def run(micro_batches) -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro_batches:
            loss = hf_segment_loss(model(batch.input_ids, batch.position_ids), batch.segment_ends, batch.num_pairs)
            (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, opt.grad_clip)
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
    tokens = sum(batch.num_tokens for batch in micro_batches)
    padded = sum(batch.input_ids.numel() for batch in micro_batches)
    median = statistics.median(seconds)
    return {"seconds": [round(s, 3) for s in seconds], "median_step_s": round(median, 3), "tokens": tokens,
            "padded_tokens": padded, "tokens_per_s": round(tokens / median, 1)}


def measure_segment_over_bandit(step: RewardStep, segment_batches, bandit_batches, rounds: int) -> dict:
    """Segment vs bandit segmentation on one model: same token batch, other segment ends."""
    assert all(torch.equal(s.input_ids, b.input_ids) for s, b in zip(segment_batches, bandit_batches))
    step.run(bandit_batches)  # warm-up of the bandit layout (the segment one warmed up in the loss check)
    seconds = timed_rounds([("segment", lambda: step.run(segment_batches)),
                            ("bandit", lambda: step.run(bandit_batches))], rounds)
    return {"segment": side_summary(seconds["segment"], segment_batches),
            "bandit": side_summary(seconds["bandit"], bandit_batches),
            "segment_over_bandit": median_ratio(seconds["segment"], seconds["bandit"])}


def measure_megaseg_over_hf(megaseg: RewardStep, hf: RewardStep, micro_batches, rounds: int,
                            profile: bool = False) -> dict:
    """megaseg's step vs transformers' on the same batch; the first step of each (same weights) checks the loss.
    ``profile``: then print torch.profiler's operator table of one more step of each (not timed)."""
    megaseg_loss, hf_loss = megaseg.run(micro_batches), hf.run(micro_batches)
    if abs(megaseg_loss - hf_loss) > LOSS_TOLERANCE:
        raise SystemExit(f"the two steps compute different losses on the same weights and batch: megaseg "
                         f"{megaseg_loss:.6f}, transformers {hf_loss:.6f} (tolerance {LOSS_TOLERANCE})")
    print(f"same loss: megaseg {megaseg_loss:.6f}, transformers {hf_loss:.6f}", flush=True)
    if profile:
        for side in (megaseg, hf):
            print(f"torch.profiler, one {side.name} step:\n" + profile_table(lambda: side.run(micro_batches), 30),
                  flush=True)
    seconds = timed_rounds([("megaseg", lambda: megaseg.run(micro_batches)),
                            ("hf", lambda: hf.run(micro_batches))], rounds)
    return {"first_step_loss": {"megaseg": round(megaseg_loss, 6), "hf": round(hf_loss, 6)},
            "megaseg": side_summary(seconds["megaseg"], micro_batches),
            "hf": side_summary(seconds["hf"], micro_batches),
            "megaseg_over_hf": median_ratio(seconds["hf"], seconds["megaseg"])}


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
        megaseg, head_weight = megaseg_step(segment_config, total_steps=4 * args.rounds + 6)
        hf = hf_step(checkpoints, segment_config, head_weight)
        versus_hf = measure_megaseg_over_hf(megaseg, hf, segment_batches, args.rounds, args.profile)
        versus_bandit = measure_segment_over_bandit(megaseg, segment_batches, bandit_batches, args.rounds)
        return {"model": args.model, "num_layers": segment_config.model.num_layers, "top_layers": args.top_layers,
                "pairs_per_step": args.pairs, "micro_batch_pairs": args.micro_batch,
                "seq": segment_batches[0].input_ids.shape[1], "rounds": args.rounds,
                "threads": torch.get_num_threads(), "segments": described,
                "tokens_per_s": versus_hf["megaseg"]["tokens_per_s"],
                "segment_over_bandit": versus_bandit["segment_over_bandit"],
                "megaseg_over_hf": versus_hf["megaseg_over_hf"],
                "versus_hf": versus_hf, "versus_bandit": versus_bandit}
    finally:
        destroy_parallel()


def measure_packed_over_padded(model_yaml: str | None, *, tokenizer: str | None, pairs: int, micro_batch: int,
                               top_layers: int | None, max_length: int, steps: int, cache_dir: str) -> dict:
    """``packed_over_padded``: tokens/s of one segment-RM training step (forward + backward + Adam) packed over
    right-padded, on the same real HH-RLHF pairs (the shipped file; n-gram segments, whose layout does not change
    the cost). First checks that both give the same loss and gradient norm on the same weights; then times
    ``steps`` steps of each, interleaved (padded, packed, padded, ...), after one warm-up step of each."""
    from megaseg.checkpoint.sft import load_sft_scalar_head_model
    from megaseg.config import load_config
    from megaseg.models.pipeline import forward_backward
    from megaseg.parallel import destroy_parallel, initialize_parallel
    from megaseg.training.common.optimizer import setup_training
    from megaseg.training.reward_model.batches import collate_step
    from megaseg.training.reward_model.data import load_reward_model_data
    from megaseg.training.reward_model.loss import PairMetrics, segment_preference_loss, zero_statistics

    overrides = [f"rm.train_top_layers={top_layers}" if top_layers else "rm.train_top_layers=null",
                 "data.train_path=shipped:hh_rlhf_harmless/pairs.jsonl", f"data.max_samples={pairs}",
                 f"data.max_length={max_length}", f"data.max_prompt_length={max_length // 2}",
                 "data.shuffle=false", "segmentation.mode=ngram", "segmentation.ngram_size=8",
                 f"segmentation.cache_dir={cache_dir}"]
    if model_yaml is None:
        overrides += ["model.vocab_size=49152", "model.random_init=true"]
    if tokenizer is not None:
        overrides.append(f"model.tokenizer={tokenizer}")
    config = load_config(model_yaml, overrides)
    ctx = initialize_parallel(config.parallel, config.seed)
    try:
        data = load_reward_model_data(config, ctx)
        setup = setup_training(load_sft_scalar_head_model(config, "train-rm"), config.rm.optimizer,
                               2 * steps + 3, config.rm.train_top_layers)
        batches = {packing: collate_step(data.train, micro_batch, data.pad_id, packing=packing)
                   for packing in (False, True)}
        loss_fn = partial(segment_preference_loss, aggregation="mean")

        def step(packing: bool, update: bool = True) -> tuple[float, PairMetrics, float]:
            start = time.perf_counter()
            setup.zero_grads()
            outputs = forward_backward(setup.model, batches[packing], loss_fn)
            grad_norm = float(sum(float(p.main_grad.float().pow(2).sum()) if hasattr(p, "main_grad") and
                                  p.main_grad is not None else 0.0 for p in setup.model.parameters()
                                  if p.requires_grad) ** 0.5)
            if update:
                setup.step()
            metrics = PairMetrics.from_statistics(sum((o["stats"] for o in outputs), zero_statistics()))
            return time.perf_counter() - start, metrics, grad_norm

        # Same weights, no update: both paths must compute the same step.
        (_, padded, padded_norm), (_, packed, packed_norm) = step(False, update=False), step(True, update=False)
        if abs(padded.loss - packed.loss) > 1e-4 * max(1.0, abs(padded.loss)) or \
                abs(padded_norm - packed_norm) > 1e-3 * max(1.0, padded_norm):
            raise SystemExit(f"packed and padded steps differ: loss {packed.loss} vs {padded.loss}, grad norm "
                             f"{packed_norm} vs {padded_norm}")
        times: dict[bool, list[float]] = {False: [], True: []}
        for index in range(steps + 1):
            for packing in (False, True):
                seconds, _, _ = step(packing)
                if index:  # the first of each is a warm-up
                    times[packing].append(seconds)
        padded_s, packed_s = statistics.median(times[False]), statistics.median(times[True])
        real_tokens = sum(item.num_tokens for item in data.train)
        padded_tokens = sum(batch.input_ids.numel() for batch in batches[False])
        return {"packed_over_padded": round(padded_s / packed_s, 3), "loss_padded": padded.loss,
                "loss_packed": packed.loss, "grad_norm_padded": padded_norm, "grad_norm_packed": packed_norm,
                "real_tokens": real_tokens, "padded_tokens": padded_tokens,
                "packed_tokens": sum(batch.packing.packed_length for batch in batches[True]),
                "padded_tokens_per_s": round(real_tokens / padded_s, 1),
                "packed_tokens_per_s": round(real_tokens / packed_s, 1),
                "padded_step_s": [round(t, 3) for t in times[False]],
                "packed_step_s": [round(t, 3) for t in times[True]], "pairs": len(data.train),
                "micro_batch_pairs": micro_batch, "max_length": max_length, "top_layers": top_layers,
                "model": config.model.name, "threads": torch.get_num_threads()}
    finally:
        destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--top-layers", type=int, default=4, help="train only the top N layers + head (0: all)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after the warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cache-dir", default="/tmp/megaseg-bench-cache")
    parser.add_argument("--packing-compare", action="store_true",
                        help="measure packed_over_padded instead (--pairs pairs, 192 tokens at most, --rounds steps)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's table of one megaseg and one transformers step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.packing_compare:
        import tempfile

        checkpoints = bench_checkpoints(args.model, args.cache_dir)
        with tempfile.TemporaryDirectory() as cache_dir:
            print(json.dumps(measure_packed_over_padded(
                str(checkpoints.model_yaml), tokenizer=None, pairs=args.pairs, micro_batch=args.micro_batch,
                top_layers=args.top_layers or None, max_length=192, steps=args.rounds, cache_dir=cache_dir)),
                flush=True)
        return
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
