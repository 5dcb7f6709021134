"""Peak memory and time per rank: vocab-parallel entropy vs gathering the full vocabulary first (CPU, gloo).

    .venv/bin/python benchmarks/vocab_parallel.py [--positions 2048] [--vocab 128256] [--tp 2] [--chunk-size 256]

Both variants start from the same tensor-parallel shard ``[positions, vocab / tp]`` on every rank:
- vocab_parallel: ``megaseg.parallel.vocab_parallel_entropy(shard, tp_group)``;
- gathered: megatron's ``gather_from_tensor_model_parallel_region`` (all-gather, then concatenate along the
  vocabulary, as a megatron model with ``gather_output=True`` would) followed by the dense
  ``megaseg.algorithms.entropy.token_entropy``.

Memory method: each variant runs in its own freshly spawned ranks. After the shard is created (and touched), one
small warm-up call has done the imports and lazy initialisation, and every rank has passed a barrier, a rank reads its resident set size (VmRSS) as the baseline, resets the kernel's
resident high-water mark (``echo 5 > /proc/self/clear_refs`` zeroes VmHWM to the current RSS), runs the variant
``--repeats`` times, and reads VmHWM. ``peak extra = VmHWM - baseline``: every byte the operation made resident
(work buffers, gathered logits, communication buffers, allocator slack), and nothing from imports or the inputs.
Time: wall-clock per call, median over the repeats, 1 intra-op thread per rank (2 ranks share 2 cores).
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import sys
from pathlib import Path

# The script's own folder (sys.path[0]) holds kernels.py, which would shadow the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from megaseg.parallel.spawn import run_distributed  # noqa: E402

MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _entropy_vocab_parallel(shard, tp_group, chunk_size):
    from megaseg.parallel import vocab_parallel_entropy

    return vocab_parallel_entropy(shard, tp_group, chunk_size=chunk_size)


def _entropy_gathered(shard, tp_group, chunk_size):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megaseg.algorithms.entropy import token_entropy

    full_logits = gather_from_tensor_model_parallel_region(shard, group=tp_group)
    return token_entropy(full_logits, chunk_size=chunk_size)


VARIANTS = {"vocab_parallel": _entropy_vocab_parallel, "gathered": _entropy_gathered}


def _measure_rank(rank, world_size, variant, positions, vocab, chunk_size, repeats, dtype_name):
    import torch.distributed as dist

    from megaseg.config.parallel import ParallelConfig
    from megaseg.parallel import initialize_parallel

    context = initialize_parallel(ParallelConfig(tensor_model_parallel_size=world_size), seed=0)
    local_vocab = vocab // world_size
    generator = torch.Generator().manual_seed(1000 + context.tp_rank)
    shard = (torch.randn(positions, local_vocab, generator=generator) * 3.0).to(getattr(torch, dtype_name))
    operation = VARIANTS[variant]
    with torch.no_grad():
        # A warm-up call outside the measurement: module imports and one-time lazy initialisation are not the op's.
        operation(shard[: min(positions, 8)].contiguous(), context.tp_group, chunk_size)
        dist.barrier()
        baseline_kib = _status_kib("VmRSS")
        _reset_high_water_mark()
        seconds = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            entropy = operation(shard, context.tp_group, chunk_size)
            seconds.append(time.perf_counter() - start)
            del entropy
        peak_kib = _status_kib("VmHWM")
        entropy = operation(shard, context.tp_group, chunk_size)
    return {
        "rank": rank,
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_extra_mib": (peak_kib - baseline_kib) / 1024,
        "median_seconds": statistics.median(seconds),
        "entropy": entropy,
    }


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2048, help="batch x sequence positions (default 1 x 2048)")
    parser.add_argument("--vocab", type=int, default=128256, help="full vocabulary size (Llama-3: 128256)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks to spawn")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk, both variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="logits dtype")
    args = parser.parse_args()
    if args.vocab % args.tp:
        parser.error(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")
    return args


def main() -> None:
    args = _parse_args()
    per_variant = {}
    for variant in VARIANTS:
        ranks = run_distributed(
            _measure_rank, args.tp, variant, args.positions, args.vocab, args.chunk_size, args.repeats, args.dtype,
            timeout=600, threads_per_rank=1,
        )
        per_variant[variant] = ranks
        for rank in ranks:
            print(f"{variant:>14} rank {rank['rank']}: peak extra {rank['peak_extra_mib']:8.1f} MiB over a "
                  f"{rank['baseline_rss_mib']:.0f} MiB baseline, {rank['median_seconds']:.3f} s per call")
    max_difference = max(
        float((a["entropy"] - b["entropy"]).abs().max())
        for a in per_variant["vocab_parallel"] for b in per_variant["gathered"]
    )
    element_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    full_logits_mib = args.positions * args.vocab * element_bytes / MIB
    chunk_mib = args.chunk_size * (args.vocab // args.tp) * 4 / MIB
    vp_peak = max(r["peak_extra_mib"] for r in per_variant["vocab_parallel"])
    gathered_peak = max(r["peak_extra_mib"] for r in per_variant["gathered"])
    result = {
        "benchmark": "vocab_parallel_entropy",
        "device": "cpu",
        "tp": args.tp,
        "positions": args.positions,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "memory_method": "per rank, fresh processes: VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS "
        "with the input shard resident",
        "vocab_parallel_peak_extra_mib": [round(r["peak_extra_mib"], 1) for r in per_variant["vocab_parallel"]],
        "gathered_peak_extra_mib": [round(r["peak_extra_mib"], 1) for r in per_variant["gathered"]],
        "full_logits_mib": round(full_logits_mib, 1),
        "fp32_chunk_buffer_mib": round(chunk_mib, 1),
        "vocab_parallel_seconds": [round(r["median_seconds"], 3) for r in per_variant["vocab_parallel"]],
        "gathered_seconds": [round(r["median_seconds"], 3) for r in per_variant["gathered"]],
        "memory_ratio_gathered_over_vocab_parallel": round(gathered_peak / max(vp_peak, 1e-9), 2),
        "target_met_vs_measured_gather": vp_peak <= gathered_peak / args.tp + chunk_mib,
        # The smallest any gather could need is the full logits themselves, without megatron's concatenation copy.
        "target_met_vs_minimal_gather": vp_peak <= full_logits_mib / args.tp + chunk_mib,
        "max_abs_entropy_difference": max_difference,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
