"""Benchmark of the local spec's core attention: megatron's DotProductAttention (baddbmm + masked softmax + bmm) vs
megaseg's SDPAttention (torch's fused scaled_dot_product_attention), inside a SmolLM2-135M-shaped decoder (hidden 576,
9 heads in 3 query groups, ffn 1536) cut to --layers layers, random weights, on random token ids.

    .venv/bin/python benchmarks/attention.py [--layers 4] [--batch 4] [--seq 512] [--rounds 3] [--threads N]
        [--profile]

Both models hold the same weights; the script first checks that they give the same logits and gradients, then times
forward + backward of each in interleaved rounds (best of each round's 2 runs) and reports tokens per second and
the speed-up. ``--profile`` first prints torch.profiler's operator table of one step of each (the unfused chain's
baddbmm / masked softmax / bmm against one scaled_dot_product_attention). The last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# The script's own folder (sys.path[0]) holds kernels.py, which would shadow the `kernels` package transformers probes for.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT

from benchmarks.bench_models import profile_table  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megaseg.config import load_config
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import destroy_parallel, initialize_parallel

    config = load_config(None, [f"model.num_layers={args.layers}", "model.hidden_size=576",
                                "model.num_attention_heads=9", "model.num_query_groups=3",
                                "model.ffn_hidden_size=1536", "model.vocab_size=49152",
                                f"model.max_position_embeddings={args.seq}"])
    initialize_parallel(config.parallel, seed=1)
    try:
        fused = build_gpt_model(config.model, config.parallel)
        # The same model with megatron's attention put back (core attention holds no weights).
        unfused = build_gpt_model(config.model, config.parallel)
        unfused.load_state_dict(fused.state_dict())
        for layer in unfused.decoder.layers:
            attention = layer.self_attention.core_attention
            layer.self_attention.core_attention = DotProductAttention(
                attention.config, attention.layer_number, attention.attn_mask_type, attention.attention_type)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.model.vocab_size, (args.batch, args.seq), generator=generator)
        positions = torch.arange(args.seq).expand(args.batch, args.seq).contiguous()

        def step(model):
            model.zero_grad(set_to_none=True)
            logits = model(ids, positions, None)
            logits.float().logsumexp(-1).mean().backward()
            return logits.detach(), model.decoder.layers[0].self_attention.linear_qkv.weight.grad.clone()

        (fused_logits, fused_grad), (unfused_logits, unfused_grad) = step(fused), step(unfused)
        logits_diff = float((fused_logits - unfused_logits).abs().max())
        grad_diff = float((fused_grad - unfused_grad).abs().max() / unfused_grad.abs().max())
        if logits_diff > 1e-3 or grad_diff > 1e-3:
            raise SystemExit(f"the two attentions disagree: logits {logits_diff:.2e}, relative qkv grad {grad_diff:.2e}")
        if args.profile:
            for name, model in (("sdpa", fused), ("unfused (megatron DotProductAttention)", unfused)):
                print(f"torch.profiler, one forward + backward, {name}:\n" + profile_table(lambda: step(model), 15),
                      flush=True)
        times = {"sdpa": [], "unfused": []}
        for _ in range(args.rounds):
            for name, model in (("sdpa", fused), ("unfused", unfused)):
                best = float("inf")
                for _ in range(2):
                    start = time.perf_counter()
                    step(model)
                    best = min(best, time.perf_counter() - start)
                times[name].append(best)
        tokens = args.batch * args.seq
        sdpa, plain = min(times["sdpa"]), min(times["unfused"])
        return {"layers": args.layers, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                "max_abs_logit_diff": logits_diff, "relative_qkv_grad_diff": grad_diff,
                "sdpa_s": round(sdpa, 3), "unfused_s": round(plain, 3),
                "sdpa_tokens_per_s": round(tokens / sdpa, 1), "unfused_tokens_per_s": round(tokens / plain, 1),
                "sdpa_speedup": round(plain / sdpa, 3), "all_round_times": times}
    finally:
        destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one step of each")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
