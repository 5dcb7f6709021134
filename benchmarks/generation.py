"""Tokens/s of rollouts: megaseg's KV-cache sampler (megaseg.generation) vs Hugging Face transformers' ``generate``.

    .venv/bin/python benchmarks/generation.py --model smollm2 [--batch-size 8] [--max-new-tokens 128] [--repeats 3]
        [--threads 1] [--cache-dir /tmp/megaseg-bench-cache] [--full-forward] [--profile]
    .venv/bin/python benchmarks/generation.py --model tiny --max-new-tokens 8 --repeats 1     # smoke mode, seconds

Models (benchmarks/bench_models.py): ``smollm2`` is SmolLM2-135M-Instruct (the packaged GGUF, converted to HF and
megatron into ``--cache-dir`` on first use); ``tiny`` a random 2-layer Llama over SmolLM2's tokenizer (smoke mode).
Both sides load the same weights: transformers the HF directory (fp32, ``attn_implementation="sdpa"``), megaseg its
megatron conversion.

Prompts: the first turns of the first ``--batch-size`` MT-Bench questions shipped in megaseg/resources/data/prompts,
rendered with the model's chat template, left-padded into one batch. Decoding is greedy on both sides with the
model's stop tokens, so both must generate exactly the same tokens: checked first, on the untimed warm-up calls
(``same_tokens``; a row that differs is reported with the first differing position, and the figures are then not a
comparison of equal work).

Method: one process (TP=1, PP=1, ``--threads`` intra-op threads), one untimed warm-up call per side, then
``--repeats`` rounds, each timing megaseg then transformers back to back (interleaved, so a change in the machine's
load hits both). tokens/s = generated response tokens (stop tokens included) / the median seconds of that side;
``megaseg_over_hf`` = the median over rounds of hf_seconds / megaseg_seconds (the tokens/s ratio, target >= 1.0).
``--full-forward`` also times megaseg's no-cache loop (a whole forward per step; slow); ``--profile`` prints
torch.profiler's top operators of one call of each side. The CPU may be shared with other work: compare the two sides
within one run, not across runs. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# Python puts this script's folder first on sys.path, where kernels.py would shadow the `kernels` package that
# transformers probes for at import; the siblings are imported as `benchmarks.*` from the repository root instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.bench_models import BenchCheckpoints, bench_checkpoints, load_hf_causal_lm, profile_table  # noqa: E402

from megaseg.parallel.spawn import run_distributed  # noqa: E402


def mt_bench_prompts(checkpoints: BenchCheckpoints, batch_size: int):
    """(TokenizedPrompts of the first ``batch_size`` MT-Bench first turns, stop token ids, pad id)."""
    from megaseg.data.encoding import TokenizedPrompt
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.tokenizer import load_tokenizer, padding_token_id
    from megaseg.evaluation.benchmarks import load_questions

    tokenizer = load_tokenizer(checkpoints.hf_dir)
    renderer = ChatTemplateRenderer(tokenizer, checkpoints.model_config().eos_token_ids)
    questions, source = load_questions("mt_bench", None, max_prompts=batch_size)
    prompts = [TokenizedPrompt(id=q.key, source=source,
                               prompt_ids=renderer.prompt_ids([{"role": "user", "content": q.turns[0]}]))
               for q in questions]
    return prompts, tuple(renderer.stop_token_ids), padding_token_id(tokenizer)


def hf_responses(sequences: torch.Tensor, prompt_width: int, stop_ids: tuple[int, ...]) -> list[list[int]]:
    """Each row of transformers' output ``[B, prompt_width + n]`` cut after its first stop token (included),
    the layout of megaseg's ``GenerationOutput.response_token_ids``."""
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
        rows.append(row if stop is None else row[:stop + 1])
    return rows


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[dict]:
    """Per differing row: its index and the first position where the two token lists differ."""
    differences = []
    for row, (x, y) in enumerate(zip(a, b)):
        if x != y:
            position = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            differences.append({"row": row, "position": position, "megaseg_len": len(x), "hf_len": len(y)})
    return differences


def _measure(rank, world_size, checkpoints: BenchCheckpoints, prompts, stop_ids, pad_id, max_new_tokens: int,
             repeats: int, full_forward: bool, profile: bool):
    from transformers import GenerationConfig

    from megaseg.config.parallel import ParallelConfig
    from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
    from megaseg.data.batch import collate_prompts
    from megaseg.generation import SamplingSettings, generate
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    ctx = initialize_parallel(ParallelConfig(), seed=1234)
    model = build_gpt_model(checkpoints.model_config(), ParallelConfig())
    load_model_checkpoint(model, checkpoints.megatron_dir)
    hf_model = load_hf_causal_lm(checkpoints, "sdpa")
    batch = collate_prompts(prompts, pad_id)
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids), greedy=True)
    hf_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                                 pad_token_id=pad_id, bos_token_id=None)

    def megaseg_call(backend="kv_cache"):
        output = generate(model, batch, greedy, ctx, pad_token_id=pad_id, backend=backend)
        return output.response_token_ids()

    def hf_call():
        with torch.no_grad():
            sequences = hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                                          generation_config=hf_config)
        return hf_responses(sequences, batch.input_ids.shape[1], tuple(stop_ids))

    # Warm-up and the equality check: same prompts, same greedy rule, so the same tokens.
    megaseg_tokens, hf_tokens = megaseg_call(), hf_call()
    differences = first_difference(megaseg_tokens, hf_tokens)
    num_tokens = sum(len(row) for row in megaseg_tokens)
    print(f"same tokens: {not differences} ({num_tokens} response tokens; differing rows {differences})", flush=True)
    seconds = {"megaseg": [], "hf": []}
    for _ in range(repeats):
        for name, call in (("megaseg", megaseg_call), ("hf", hf_call)):
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
        print(f"round: megaseg {seconds['megaseg'][-1]:.3f} s, transformers {seconds['hf'][-1]:.3f} s", flush=True)
    results = {name: {"seconds": [round(s, 4) for s in values], "median_s": round(statistics.median(values), 4),
                      "tokens_per_s": round(num_tokens / statistics.median(values), 1)}
               for name, values in seconds.items()}
    results["hf"]["tokens"] = sum(len(row) for row in hf_tokens)
    results["megaseg"]["tokens"] = num_tokens
    results["same_tokens"] = not differences
    results["differing_rows"] = differences
    results["megaseg_over_hf"] = round(statistics.median(h / m for h, m in zip(seconds["hf"], seconds["megaseg"])), 3)
    results["first_greedy_response"] = megaseg_tokens[0]
    if full_forward:
        start = time.perf_counter()
        full_tokens = megaseg_call("full_forward")
        full_seconds = time.perf_counter() - start
        results["full_forward"] = {"seconds": round(full_seconds, 4),
                                   "tokens_per_s": round(num_tokens / full_seconds, 1),
                                   "same_tokens_as_kv_cache": full_tokens == megaseg_tokens}
    if profile:
        print("torch.profiler, one megaseg kv_cache call:\n" + profile_table(megaseg_call), flush=True)
        print("torch.profiler, one transformers generate call:\n" + profile_table(hf_call), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default="/tmp/megaseg-bench-cache")
    # One thread is steadier on a machine whose cores other jobs share.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-forward", action="store_true", help="also time megaseg's no-cache loop")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one call of each side")
    args = parser.parse_args()
    checkpoints = bench_checkpoints(args.model, args.cache_dir)
    prompts, stop_ids, pad_id = mt_bench_prompts(checkpoints, args.batch_size)
    prompt_lengths = [len(p.prompt_ids) for p in prompts]
    (results,) = run_distributed(_measure, 1, checkpoints, prompts, stop_ids, pad_id, args.max_new_tokens,
                                 args.repeats, args.full_forward, args.profile, timeout=3600.0,
                                 threads_per_rank=args.threads)
    from megaseg.data.tokenizer import load_tokenizer

    first_text = load_tokenizer(checkpoints.hf_dir).decode(results.pop("first_greedy_response"))
    summary = {"model": args.model, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "repeats": args.repeats, "threads": args.threads,
               "prompt_tokens_min_max": [min(prompt_lengths), max(prompt_lengths)], **results,
               "first_greedy_response_text": first_text}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
