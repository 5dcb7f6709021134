"""Benchmark of one train-rm optimizer step (forward + backward of chosen and rejected in one batch, segment BT loss,
megatron Adam step) in one process, on random token ids.

    .venv/bin/python benchmarks/rm_training.py [--model-yaml runs/quickstart/models/SmolLM2-135M-Instruct-megatron/megaseg_model.yaml]
        [--top-layers 4] [--pairs 4] [--micro-batch 4] [--seq 192] [--steps 4] [--threads N]

Without --model-yaml it times the tiny test model (2 layers, hidden 64, SmolLM2's vocabulary). With a converted
model's megaseg_model.yaml it loads those weights (the SFT initialisation train-rm uses). Segments are fixed 8-token
n-grams of the second half of each row (the "response"); their layout does not change the cost of a step.
Reported: tokens per second (2 x pairs x seq tokens per step) of the median step after one warm-up step, and the
median step time. Both depend heavily on what else runs on the machine: compare numbers made back to back.

The last printed line is one JSON object with all figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _micro_batch(pairs: int, seq: int, vocab: int, generator: torch.Generator):
    from megaseg.training.reward_model.batches import RewardMicroBatch

    rows = 2 * pairs
    response = torch.zeros(rows, seq, dtype=torch.bool)
    response[:, seq // 2:] = True
    ends = torch.zeros_like(response)
    ends[:, seq // 2 + 7::8] = True
    ends[:, -1] = True
    return RewardMicroBatch(input_ids=torch.randint(0, vocab, (rows, seq), generator=generator),
                            position_ids=torch.arange(seq).expand(rows, seq).contiguous(), response_mask=response,
                            segment_ends=ends, num_pairs=pairs, num_tokens=rows * seq)


def run(args: argparse.Namespace) -> dict:
    from megaseg.config import load_config
    from megaseg.models.pipeline import forward_backward
    from megaseg.parallel import destroy_parallel, initialize_parallel
    from megaseg.checkpoint.sft import load_sft_scalar_head_model
    from megaseg.training.common.optimizer import setup_training
    from megaseg.training.reward_model.loss import segment_preference_loss

    overrides = [f"rm.train_top_layers={args.top_layers}" if args.top_layers else "rm.train_top_layers=null"]
    if args.model_yaml is None:
        overrides += ["model.vocab_size=49152", "model.random_init=true"]
    config = load_config(args.model_yaml, overrides)
    initialize_parallel(config.parallel, config.seed)
    try:
        if args.pairs % args.micro_batch:
            raise SystemExit(f"--pairs {args.pairs} must be a multiple of --micro-batch {args.micro_batch}")
        num_micro_batches = args.pairs // args.micro_batch
        # The LR schedule spans the warm-up step and the timed ones.
        setup = setup_training(load_sft_scalar_head_model(config, "train-rm"), config.rm.optimizer, args.steps + 1,
                               config.rm.train_top_layers)
        generator = torch.Generator().manual_seed(0)
        micro_batches = [_micro_batch(args.micro_batch, args.seq, config.model.vocab_size, generator)
                         for _ in range(num_micro_batches)]
        loss_fn = partial(segment_preference_loss, aggregation="mean")
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            setup.zero_grads()
            forward_backward(setup.model, micro_batches, loss_fn)
            setup.step()
            times.append(time.perf_counter() - start)
        step_seconds = statistics.median(times[1:])
        tokens = 2 * args.pairs * args.seq
        return {"model": config.model.name, "num_layers": config.model.num_layers, "top_layers": args.top_layers,
                "pairs_per_step": args.pairs, "micro_batch_pairs": args.micro_batch, "seq": args.seq,
                "threads": torch.get_num_threads(), "warmup_step_s": round(times[0], 3),
                "median_step_s": round(step_seconds, 3), "tokens_per_s": round(tokens / step_seconds, 1),
                "pairs_per_s": round(args.pairs / step_seconds, 3)}
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
    parser.add_argument("--model-yaml", help="a converted model's megaseg_model.yaml (default: the tiny test model)")
    parser.add_argument("--top-layers", type=int, default=None, help="train only the top N layers + head")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward pass")
    parser.add_argument("--seq", type=int, default=192, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--packing-compare", action="store_true",
                        help="measure packed_over_padded on real HH-RLHF pairs (--pairs of them, --seq as max length)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --packing-compare without --model-yaml")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.packing_compare:
        import tempfile

        with tempfile.TemporaryDirectory() as cache_dir:
            print(json.dumps(measure_packed_over_padded(
                args.model_yaml, tokenizer=args.tokenizer, pairs=args.pairs, micro_batch=args.micro_batch,
                top_layers=args.top_layers, max_length=args.seq, steps=args.steps, cache_dir=cache_dir)), flush=True)
        return
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
