"""Milliseconds per KV-cache decode step: megaseg's inlined decode layer, megatron's own TransformerLayer, and
transformers' forward with its DynamicCache, interleaved step by step in one process.

    .venv/bin/python benchmarks/decode_step.py --model smollm2 [--batch-size 8] [--extra-columns 60] [--steps 10]
        [--rounds 16] [--threads 1] [--cache-dir /tmp/megaseg-bench-cache]
    .venv/bin/python benchmarks/decode_step.py --model tiny --batch-size 3 --rounds 1 --steps 2     # smoke mode

Why besides benchmarks/generation.py: a whole generate call takes ~15 s, and on a shared host the machine's speed
drifts by more than 10% over that time, which hides a few-percent difference between implementations. Here the
three sides alternate every ``--steps`` decode steps (a few hundred milliseconds), so drift hits them alike.

Setup: the first ``--batch-size`` MT-Bench prompts (as benchmarks/generation.py renders them), followed by
``--extra-columns`` random tokens as if already generated; both stacks prefill prompt + extra columns into their
KV caches, then time one decode step at the next column repeatedly (megaseg rewrites the same cache column,
transformers crops its cache back by one after each step). megatron's layer is forced per layer for the
``megatron_layer`` side (the inlined step's support flag turned off), so both megaseg sides run the same weights
and the same cache.

Checked first: the inlined step's logits equal megatron's layer's bitwise (``same_logits_megatron_layer``), and
transformers' logits agree with megaseg's (``max_abs_logit_difference_hf``, same greedy tokens: ``same_argmax_hf``).
Figures: the median milliseconds per step of each side, ``megatron_layer_over_inlined`` and ``hf_over_megaseg``
(medians over rounds of the per-round time ratios; > 1 means megaseg's inlined step is faster). The last line of
output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# As in generation.py: the siblings are imported as `benchmarks.*` from the repository root (benchmarks/kernels.py
# would otherwise shadow the `kernels` package that transformers probes for).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.bench_models import BenchCheckpoints, bench_checkpoints, load_hf_causal_lm  # noqa: E402
from benchmarks.generation import mt_bench_prompts  # noqa: E402

from megaseg.parallel.spawn import run_distributed  # noqa: E402


def _measure(rank, world_size, checkpoints: BenchCheckpoints, prompts, pad_id, extra_columns: int, steps: int,
             rounds: int):
    from megaseg.config.parallel import ParallelConfig
    from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
    from megaseg.data.batch import collate_prompts
    from megaseg.generation.kv_cache import StaticKVCache
    from megaseg.generation.sampler import attention_mask
    from megaseg.generation.token_buffer import TokenBuffer
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=1234)
    model = build_gpt_model(checkpoints.model_config(), ParallelConfig())
    load_model_checkpoint(model, checkpoints.megatron_dir)
    model.eval()
    hf_model = load_hf_causal_lm(checkpoints, "sdpa")
    batch = collate_prompts(prompts, pad_id)
    rows, prompt_width = batch.input_ids.shape
    buffer = TokenBuffer.from_prompts(batch, extra_columns + 1, (), pad_id, align_prompt_ends=True)
    cached = buffer.first_column_to_predict() + extra_columns  # columns in the cache before the timed step
    generated = torch.randint(1, 1000, (rows, extra_columns + 1), generator=torch.Generator().manual_seed(0))
    buffer.tokens[:, prompt_width:prompt_width + extra_columns + 1] = generated
    layers = list(model.decoder.layers)

    with torch.no_grad():
        cache = StaticKVCache(model, rows, buffer.width)
        model(buffer.tokens[:, :cached], buffer.positions(0, cached), attention_mask(buffer, 0, cached),
              **cache.forward_kwargs(0))
        cache.prefill_done()
        step_tokens = buffer.tokens[:, cached:cached + 1]
        step_positions, step_mask = buffer.positions(cached, 1), attention_mask(buffer, cached, cached + 1)

        def megaseg_step():
            return model(step_tokens, step_positions, step_mask, **cache.forward_kwargs(cached))[:, -1].float()

        inlined = megaseg_step()
        # Each layer's support verdict (decode_layer.py keeps it per instance); False sends a call to megatron's layer.
        supported = [layer.__dict__["_inlined_supported"] for layer in layers]

        def megatron_layer_step():
            for layer in layers:
                layer.__dict__["_inlined_supported"] = False
            try:
                return megaseg_step()
            finally:
                for layer, verdict in zip(layers, supported):
                    layer.__dict__["_inlined_supported"] = verdict

        hf_mask = torch.cat([batch.attention_mask.long(), torch.ones(rows, extra_columns + 1, dtype=torch.long)], 1)
        hf_positions = (hf_mask.cumsum(-1) - 1).clamp(min=0)
        hf_tokens = torch.cat([batch.input_ids, generated], 1)
        prefill = hf_model(input_ids=hf_tokens[:, :-1], attention_mask=hf_mask[:, :-1],
                           position_ids=hf_positions[:, :-1], use_cache=True)
        hf_cache = prefill.past_key_values

        def hf_step():
            logits = hf_model(input_ids=hf_tokens[:, -1:], attention_mask=hf_mask, position_ids=hf_positions[:, -1:],
                              past_key_values=hf_cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            hf_cache.crop(-1)
            return logits

        reference, hf_logits = megatron_layer_step(), hf_step()
        calls = {"megaseg_inlined": megaseg_step, "megaseg_megatron_layer": megatron_layer_step, "hf": hf_step}
        for call in calls.values():  # warm-up
            call()
        milliseconds = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(steps):
                    call()
                milliseconds[name].append((time.perf_counter() - start) / steps * 1000)

    def ratio(numerator: str, denominator: str) -> float:
        return round(statistics.median(a / b for a, b in zip(milliseconds[numerator], milliseconds[denominator])), 3)

    return {
        "cached_columns": cached, "rows": rows, "inlined_layers": sum(bool(verdict) for verdict in supported),
        "same_logits_megatron_layer": bool(torch.equal(inlined, reference)),
        "max_abs_logit_difference_hf": float((inlined - hf_logits).abs().max()),
        "same_argmax_hf": bool(torch.equal(inlined.argmax(-1), hf_logits.argmax(-1))),
        "ms_per_step": {name: round(statistics.median(values), 2) for name, values in milliseconds.items()},
        "megatron_layer_over_inlined": ratio("megaseg_megatron_layer", "megaseg_inlined"),
        "hf_over_megaseg": ratio("hf", "megaseg_inlined"),
        "hf_over_megatron_layer": ratio("hf", "megaseg_megatron_layer"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--extra-columns", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--cache-dir", default="/tmp/megaseg-bench-cache")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    checkpoints = bench_checkpoints(args.model, args.cache_dir)
    prompts, _, pad_id = mt_bench_prompts(checkpoints, args.batch_size)
    (results,) = run_distributed(_measure, 1, checkpoints, prompts, pad_id, args.extra_columns, args.steps,
                                 args.rounds, timeout=3600.0, threads_per_rank=args.threads)
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "threads": args.threads,
                      "steps": args.steps, "rounds": args.rounds, **results}))


if __name__ == "__main__":
    main()
