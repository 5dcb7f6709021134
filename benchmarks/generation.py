"""Tokens/s of rollouts: megaseg.generation with megatron's KV cache vs the no-cache loop (full forward per step).

    .venv/bin/python benchmarks/generation.py [--model tiny|smollm2] [--batch-size 8] [--max-new-tokens 64]
                                              [--repeats 3] [--cache-dir /tmp/megaseg-bench-cache]

Models:
- ``tiny``: the test model (2 layers, hidden 64, 4 heads, vocab 128), random weights, random prompts of 16-48 tokens.
- ``smollm2``: SmolLM2-135M-Instruct with its real weights (the packaged GGUF, converted GGUF -> HF -> megatron
  into ``--cache-dir`` on first use), MT-Bench first turns rendered with its chat template, its stop tokens.

Method: one process (TP=1, PP=1, ``--threads`` intra-op threads), greedy decoding so both backends generate exactly
the same tokens (checked: ``same_tokens``), one untimed warm-up call per backend, then ``--repeats`` timed calls; the
median wall time counts. tokens/s = generated response tokens (stop tokens included) / median seconds. A last KV-cache
run samples with the paper's rollout settings (temperature 1, top-p 1). The CPU is shared with other work: compare
backends within one run, not across runs. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from megaseg.parallel.spawn import run_distributed

MT_BENCH = Path("/work/shared/data/prompts/mt_bench_question.jsonl")


def _tiny_setup(batch_size: int):
    from megaseg.config.model import ModelConfig
    from megaseg.data.encoding import TokenizedPrompt

    model_cfg = dataclasses.replace(ModelConfig(), init_method_std=0.3)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (batch_size,), generator=generator).tolist()
    prompts = [TokenizedPrompt(id=f"random-{i}", source="benchmark",
                               prompt_ids=tuple(torch.randint(1, 127, (n,), generator=generator).tolist()))
               for i, n in enumerate(lengths)]
    return model_cfg, None, prompts, (127,), 0, None


def _smollm2_setup(batch_size: int, cache_dir: str):
    from megaseg.conversion.gguf_to_hf import ensure_smollm2_hf
    from megaseg.conversion.hf_architectures import model_config_from_hf
    from megaseg.conversion.hf_to_megatron import convert_hf_to_megatron
    from megaseg.data.encoding import TokenizedPrompt
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.tokenizer import load_tokenizer, padding_token_id

    hf_dir = ensure_smollm2_hf(cache_dir)
    ckpt_dir = Path(cache_dir) / "SmolLM2-135M-Instruct-megatron"
    if not ckpt_dir.is_dir():
        convert_hf_to_megatron(hf_dir, ckpt_dir)
    model_cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    tokenizer = load_tokenizer(hf_dir)
    renderer = ChatTemplateRenderer(tokenizer, model_cfg.eos_token_ids)
    questions = [json.loads(line) for line in MT_BENCH.read_text().splitlines()[:batch_size]]
    prompts = [TokenizedPrompt(id=str(q["question_id"]), source=str(MT_BENCH),
                               prompt_ids=renderer.prompt_ids([{"role": "user", "content": q["turns"][0]}]))
               for q in questions]
    return model_cfg, str(ckpt_dir), prompts, renderer.stop_token_ids, padding_token_id(tokenizer), str(hf_dir)


def _timed(call, repeats: int):
    call()  # warm-up: lazy initialisation, allocator
    seconds, output = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        output = call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), output


def _measure(rank, world_size, setup, max_new_tokens, repeats):
    from megaseg.config.parallel import ParallelConfig
    from megaseg.data.batch import collate_prompts
    from megaseg.generation import SamplingSettings, generate
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    model_cfg, ckpt_dir, prompts, stop_ids, pad_id, _ = setup
    ctx = initialize_parallel(ParallelConfig(), seed=1234)
    model = build_gpt_model(model_cfg, ParallelConfig())
    if ckpt_dir is not None:
        from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
        load_model_checkpoint(model, Path(ckpt_dir))
    batch = collate_prompts(prompts, pad_id)
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids), greedy=True)
    sampling = dataclasses.replace(greedy, greedy=False, temperature=1.0, top_p=1.0)
    results, responses = {}, {}
    for name, backend, settings in (("kv_cache", "kv_cache", greedy), ("full_forward", "full_forward", greedy),
                                    ("kv_cache_sampling", "kv_cache", sampling)):
        def call():
            return generate(model, batch, settings, ctx, pad_token_id=pad_id, backend=backend,
                            generator=torch.Generator().manual_seed(7))
        seconds, output = _timed(call, repeats)
        tokens = output.num_generated_tokens
        results[name] = {"seconds": round(seconds, 4), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
        responses[name] = output.response_token_ids()
        print(f"{name:>18}: {tokens} tokens in {seconds:.3f} s = {tokens / seconds:.1f} tokens/s", flush=True)
    results["same_tokens"] = responses["kv_cache"] == responses["full_forward"]
    results["first_greedy_response"] = responses["kv_cache"][0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default="/tmp/megaseg-bench-cache")
    # One thread is steadier on a machine whose cores other jobs share.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.model == "tiny":
        setup = _tiny_setup(args.batch_size)
    else:
        setup = _smollm2_setup(args.batch_size, args.cache_dir)
    prompt_lengths = [len(p.prompt_ids) for p in setup[2]]
    (results,) = run_distributed(_measure, 1, setup, args.max_new_tokens, args.repeats, timeout=3600.0,
                                 threads_per_rank=args.threads)
    summary = {"model": args.model, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "repeats": args.repeats, "threads": args.threads,
               "prompt_tokens_min_max": [min(prompt_lengths), max(prompt_lengths)],
               **{key: results[key] for key in ("kv_cache", "full_forward", "kv_cache_sampling", "same_tokens")},
               "kv_cache_speedup": round(results["full_forward"]["seconds"] / results["kv_cache"]["seconds"], 2)}
    if setup[5] is not None:
        from megaseg.data.tokenizer import load_tokenizer
        summary["first_greedy_response_text"] = load_tokenizer(setup[5]).decode(results["first_greedy_response"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
