"""Benchmark of megaseg.algorithms: the vectorised segment-reward pipeline vs a per-sequence Python loop, and the peak
memory of token_entropy with and without chunking.

    .venv/bin/python benchmarks/algorithms.py [--batch 64] [--seq 2048] [--loop-rows 8] [--threads N] [--device cpu]

Pipeline (one PPO rollout batch, after the model forwards): entropy segmentation -> locations p -> mean segment reward
(the RM's e(x, y), logged) -> location normalizer -> even interpolation -> clamp -> KL penalty -> GAE -> whitening,
from right-padded [batch, seq] inputs to [batch, seq] advantages. Three vectorised paths are timed:
- trainer: the PPO trainer's own phases (megaseg.training.ppo.reward_shaping, as make_experience calls them): the
  segmentation rule on the padded rollout, everything after it on the unpadded response tokens;
- unpadded (``megaseg.algorithms.unpadded``): the response tokens of every row are listed end to end once (in slots
  aligned to 16), every step runs over those slots (per-segment steps over the K segments), the reward head output is
  read at the K segment ends straight from the padded tensor, the KL log-ratio is taken on the padded batch and
  gathered once, and the advantages are padded back at the end;
- padded: one ``SegmentLayout`` from the segment ends, segment rewards packed (segment t in column t) from the reward
  head output to the interpolation, every per-token step over the whole [batch, seq] grid.
All validate their inputs once, where they enter. ``speedup`` is the trainer's path.
The loop reference runs the same steps one sequence at a time with the plain-Python functions of
tests/algorithms/algo_reference.py; it is timed on ``--loop-rows`` evenly spaced rows and extrapolated linearly in the
number of response tokens (its cost is a fixed amount of Python work per token; the final whitening is one more pass
over the tokens), best of ``--loop-repeats`` runs. Each vectorised time is the best of ``--rounds`` interleaved rounds of
``--repeats`` runs after a warm-up, under ``torch.inference_mode`` (nothing here needs a gradient; the mode spares
every op autograd's bookkeeping) on torch's default threads (one per core: the loop cannot use more than one, the
tensor code can); the unpadded path is timed again with autograd on and on one thread. All are noisy on a shared
machine; the vectorised ones also depend on the state of
glibc's heap (a fresh process returns freed buffers to the kernel and faults them back in on the next call; a trainer
that has freed large buffers keeps them: ``*_page_faults_per_call`` counts the pages faulted back in), so compare
figures from runs made back to back.

Entropy memory: each measurement runs in a fresh subprocess that allocates bf16 logits [positions, vocab] in place
(no fp32 temporary), reads its current RSS, calls token_entropy, then reads the peak RSS (getrusage ru_maxrss).
Peak extra memory = peak RSS - RSS before the call. torch's CPU allocator hands buffers of this size (>= 32 MiB) to
glibc, which maps them with mmap and unmaps them on free, so RSS tracks the live fp32 work buffers; tracemalloc would
see none of them, and torch.profiler reports per-op allocations rather than a peak.

The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The script's own folder (sys.path[0]) holds kernels.py, which would shadow the `kernels` package transformers probes for.
sys.path[0] = ROOT
sys.path.insert(0, os.path.join(ROOT, "tests", "algorithms"))

import algo_reference as ref  # noqa: E402

from megaseg.algorithms import unpadded  # noqa: E402
from megaseg.algorithms.aggregation import aggregate_packed_rewards, packed_segment_rewards  # noqa: E402
from megaseg.algorithms.interpolation import packed_token_rewards  # noqa: E402
from megaseg.algorithms.normalizer import LocationNormalizer  # noqa: E402
from megaseg.algorithms.ppo import gae, kl_from_log_ratio, kl_penalized_rewards, masked_whiten  # noqa: E402
from megaseg.algorithms.segmentation import SegmentLayout, entropy_segment_ends  # noqa: E402

CUTOFF, KL_COEF, GAMMA, LAM, CLAMP = 1.75, 0.01, 1.0, 0.95, 10.0
# Paper's Phi-3-mini coefficients, valid down to p = 1/1024 (1024 generated tokens at most).
NORMALIZER = LocationNormalizer(
    w_mu=0.7668, b_mu=0.4705, w_sigma=0.2569, b_sigma=2.8339, p_min=1 / 1024,
    model="phi-3-mini", c_ent=CUTOFF, aggregation="mean", segmentation="entropy",
)  # fmt: skip


def make_rollout(batch: int, seq: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic right-padded rollout: prompt of 64..seq/2 tokens, response to the end or shorter, 80% with EOS."""
    gen = torch.Generator().manual_seed(seed)
    cols = torch.arange(seq)
    prompt = torch.randint(64, seq // 2, (batch, 1), generator=gen)
    length = torch.randint(1, seq, (batch, 1), generator=gen).clamp(max=seq - prompt)
    response = (cols >= prompt) & (cols < prompt + length)
    has_eos = torch.rand(batch, 1, generator=gen) < 0.8
    eos = has_eos & (cols == prompt + length - 1)
    # Exponential entropies with mean 1: about 17% of tokens exceed c_ent = 1.75 (segments of ~6 tokens).
    tensors = {
        "response_mask": response,
        "eos_mask": eos,
        "entropy": torch.empty(batch, seq).exponential_(1.0, generator=gen),
        "values": torch.randn(batch, seq, generator=gen),
        "critic": torch.randn(batch, seq, generator=gen),
        "logp": -torch.rand(batch, seq, generator=gen) * 3,
        "ref_logp": -torch.rand(batch, seq, generator=gen) * 3,
    }
    return {name: t.to(device) for name, t in tensors.items()}


def vectorised_pipeline(r: dict[str, torch.Tensor], validate_all: bool = False) -> torch.Tensor:
    """The padded path (the trainer's until it moved to the unpadded one): inputs validated once where they enter (segmentation checks the masks and entropies, the
    reward head output is checked at the segment ends); the derived ``ends`` and the contiguous response need no
    re-check downstream. The index products of the segmentation (``SegmentLayout``) are computed once and shared by
    the aggregation, locations, normalizer and interpolation; segment rewards stay packed (segment t in column t)
    from the reward head output to the interpolation. ``validate_all`` re-validates in every call instead."""
    response = r["response_mask"]
    ends = entropy_segment_ends(r["entropy"], response, r["eos_mask"], CUTOFF)
    layout = SegmentLayout.from_ends(ends, response, validate=validate_all)
    rewards = packed_segment_rewards(r["values"], layout, validate=True)
    aggregate_packed_rewards(rewards, layout.num_segments, "mean")  # e(x, y), logged by the trainer
    normalized = NORMALIZER.normalize_packed(rewards, layout.num_segments)  # locations p = (t + 1) / T
    dense = packed_token_rewards(normalized, layout, mode="even").clamp_(-CLAMP, CLAMP)
    rewards = kl_penalized_rewards(dense, r["logp"], r["ref_logp"], response, KL_COEF)
    advantages, _ = gae(rewards, r["critic"], response, GAMMA, LAM, contiguous=True, validate=validate_all)
    return masked_whiten(advantages, response)


def unpadded_pipeline(r: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same steps on the response tokens only (megaseg.algorithms.unpadded): masks validated once, the inputs
    unpadded once, the advantages padded back to [batch, seq] at the end."""
    responses = unpadded.UnpaddedResponses.from_masks(r["response_mask"], r["eos_mask"])
    ends = unpadded.entropy_segment_ends(responses.unpad(r["entropy"]), responses, CUTOFF)
    segments = unpadded.UnpaddedSegments.from_ends(ends, responses, validate=False)  # entropy ends: T >= 1 always
    rewards = segments.at_ends(r["values"])  # read at the K ends straight from the padded head output
    segments.mean(rewards)  # e(x, y), logged by the trainer
    normalized = unpadded.normalize(NORMALIZER, rewards, segments)
    dense = segments.token_rewards(normalized, "even").clamp_(-CLAMP, CLAMP)
    kl = kl_from_log_ratio(responses.unpad(r["logp"] - r["ref_logp"]), "k1")  # one gather instead of two
    rewards = dense.add_(kl, alpha=-KL_COEF)
    advantages, _ = unpadded.gae(rewards, responses.unpad(r["critic"]), responses, GAMMA, LAM)
    return responses.pad(unpadded.whiten(advantages, responses))


_TRAINER_SEQUENCES: dict[int, object] = {}


def _sequence_batch(r: dict[str, torch.Tensor]):
    """The rollout as the trainer holds it (a SequenceBatch), built once per rollout: the reward phases read only its
    response and EOS masks."""
    from megaseg.data.batch import SequenceBatch

    key = id(r["response_mask"])
    if key not in _TRAINER_SEQUENCES:
        response = r["response_mask"]
        zeros = torch.zeros(response.shape, dtype=torch.long, device=response.device)
        _TRAINER_SEQUENCES[key] = SequenceBatch(zeros, response.clone(), response, r["eos_mask"], zeros)
    return _TRAINER_SEQUENCES[key]


@functools.lru_cache(maxsize=1)
def _trainer_plan():
    """The reward plan of a segment-PPO run at c_ent = CUTOFF (built once, outside the timed calls)."""
    from megaseg.config.segmentation import SegmentationConfig
    from megaseg.training.ppo.reward_plan import RewardPlan

    return RewardPlan(granularity="segment", segmentation=SegmentationConfig(mode="entropy", entropy_cutoff=CUTOFF),
                      sequence_level=False, aggregation="mean", interpolation="even", normalizer_kind="location")


def trainer_pipeline(r: dict[str, torch.Tensor]) -> torch.Tensor:
    """The PPO trainer's own reward phases (megaseg.training.ppo.reward_shaping, called as make_experience calls
    them): entropy segmentation on the padded rollout, then scoring, normalizer, even interpolation + clamp, KL, GAE
    and whitening on the unpadded response tokens, padded back at the end."""
    from megaseg.training.ppo import reward_shaping as shaping

    plan = _trainer_plan()
    sequences = _sequence_batch(r)
    ends = shaping.cut_segments(plan, sequences, r["entropy"])
    scored = shaping.score_segments(plan, lambda _sequences, _ends: r["values"], sequences, ends)
    shaped = shaping.shape_rewards(NORMALIZER, scored, r["logp"], r["ref_logp"], interpolation="even", clip=CLAMP,
                                   kl_coef=KL_COEF, estimator="k1")
    advantages, _ = shaping.compute_advantages(shaped.rewards, r["critic"], scored.responses, gamma=GAMMA, lam=LAM,
                                               whiten=True, parallel_ctx=None)
    return scored.responses.pad(advantages)


def loop_pipeline(r: dict[str, list], rows: list[int]) -> list[list[float]]:
    """Same steps, one sequence at a time, plain Python (algo_reference) plus a Python whitening pass."""
    import math

    out = []
    for b in rows:
        response, eos = r["response_mask"][b], r["eos_mask"][b]
        segments = ref.segments_of("entropy", response, eos, entropy=r["entropy"][b], cutoff=CUTOFF)
        seg_rewards = ref.segment_rewards(r["values"][b], segments)
        sum(seg_rewards) / len(seg_rewards)  # e(x, y)
        normalized = []
        for t, reward in enumerate(seg_rewards):
            log_p = math.log(max((t + 1) / len(segments), NORMALIZER.p_min) + 1e-10)
            mean = NORMALIZER.w_mu * log_p + NORMALIZER.b_mu
            std = NORMALIZER.w_sigma * log_p + NORMALIZER.b_sigma
            normalized.append((reward - mean) / std)
        dense = ref.interpolate(normalized, segments, len(response), "even")
        rewards = [
            (min(max(d, -CLAMP), CLAMP) - KL_COEF * ref.kl_estimate(lp, rl, "k1")) if m else 0.0
            for d, lp, rl, m in zip(dense, r["logp"][b], r["ref_logp"][b], response)
        ]
        advantages, _ = ref.gae_row(rewards, r["critic"][b], response, GAMMA, LAM)
        out.append(advantages)
    valid = [a for b, row in zip(rows, out) for a, m in zip(row, r["response_mask"][b]) if m]  # whitening
    mean = sum(valid) / len(valid)
    scale = 1.0 / math.sqrt(sum((a - mean) ** 2 for a in valid) / len(valid) + 1e-8)
    return [[(a - mean) * scale if m else 0.0 for a, m in zip(row, r["response_mask"][b])] for b, row in zip(rows, out)]


def time_pipelines(
    batch: int, seq: int, loop_rows: int, device: str, repeats: int, loop_repeats: int, rounds: int
) -> dict:
    rollout = make_rollout(batch, seq, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def best_time(pipeline, autograd: bool = False) -> tuple[float, int]:
        """(best time, median minor page faults per call: fresh memory the heap had handed back to the kernel).

        Under ``torch.inference_mode`` unless ``autograd``: rewards and advantages never need a gradient, and the
        mode spares every op autograd's bookkeeping."""
        with torch.inference_mode(not autograd):
            pipeline(rollout)  # warm-up (lazy init, allocator)
            times, faults = [], []
            for _ in range(repeats):
                faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                sync()
                start = time.perf_counter()
                pipeline(rollout)
                sync()
                times.append(time.perf_counter() - start)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
        return min(times), sorted(faults)[len(faults) // 2]

    # Interleaved rounds, so that a burst of load from a neighbour hits all three paths alike.
    timings = {"trainer": [], "unpadded": [], "padded": [], "padded_validate_everywhere": []}
    paths = {
        "trainer": trainer_pipeline,
        "unpadded": unpadded_pipeline,
        "padded": vectorised_pipeline,
        "padded_validate_everywhere": lambda r: vectorised_pipeline(r, validate_all=True),
    }
    for _ in range(rounds):
        for name, pipeline in paths.items():
            timings[name].append(best_time(pipeline))
    (trainer_time, _), (unpadded_time, unpadded_faults), (vec_time, vec_faults), (vec_time_all, _) = (
        min(timings[name]) for name in paths
    )
    # The unpadded path with autograd's dispatch on (outside inference mode), and on one thread (a machine whose other
    # cores are busy).
    unpadded_autograd_on = min(best_time(unpadded_pipeline, autograd=True)[0] for _ in range(rounds))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    unpadded_one_thread = min(best_time(unpadded_pipeline)[0] for _ in range(rounds))
    torch.set_num_threads(threads)

    rows = torch.linspace(0, batch - 1, loop_rows).round().long().unique().tolist()
    # Best of ``loop_repeats`` like the vectorised side: one sample of a ~10 ms Python loop on a shared machine is
    # as likely to time a neighbour's burst as the loop.
    loop_subset = loop_compute_only = float("inf")
    for _ in range(loop_repeats):
        start = time.perf_counter()
        # A Python loop needs Python numbers: reading the timed rows out of the tensors is part of its cost.
        as_lists = {name: dict(zip(rows, t[rows].cpu().tolist())) for name, t in rollout.items()}
        converted = time.perf_counter()
        loop_out = loop_pipeline(as_lists, rows)
        done = time.perf_counter()
        loop_subset = min(loop_subset, done - start)
        loop_compute_only = min(loop_compute_only, done - converted)
    tokens = int(rollout["response_mask"].sum())
    subset_tokens = int(rollout["response_mask"][rows].sum())
    loop_time = loop_subset * tokens / subset_tokens
    loop_time_compute_only = loop_compute_only * tokens / subset_tokens

    # Agreement on the subset (whitening statistics depend on the row set, so compare on the same rows).
    sub = {name: t[rows] for name, t in rollout.items()}
    loop_tensor = torch.tensor(loop_out, dtype=torch.float64)
    diff = (vectorised_pipeline(sub).double().cpu() - loop_tensor).abs().max().item()
    diff_unpadded = (unpadded_pipeline(sub).double().cpu() - loop_tensor).abs().max().item()
    diff_trainer = (trainer_pipeline(sub).double().cpu() - loop_tensor).abs().max().item()
    ends = entropy_segment_ends(rollout["entropy"], rollout["response_mask"], rollout["eos_mask"], CUTOFF)
    segments = int(ends.sum())
    return {
        "pipeline_batch": batch,
        "pipeline_seq": seq,
        "pipeline_device": device,
        "response_tokens": tokens,
        "segments": segments,
        "torch_threads": threads,
        "trainer_s": round(trainer_time, 5),
        "unpadded_s": round(unpadded_time, 5),
        "unpadded_page_faults_per_call": unpadded_faults,
        "padded_s": round(vec_time, 5),
        "padded_validate_everywhere_s": round(vec_time_all, 5),
        "padded_page_faults_per_call": vec_faults,
        "loop_rows_timed": len(rows),
        "loop_repeats": loop_repeats,
        "loop_tokens_timed": subset_tokens,
        "loop_subset_s": round(loop_subset, 4),
        "loop_extrapolated_s": round(loop_time, 4),
        "loop_extrapolated_without_tolist_s": round(loop_time_compute_only, 4),
        "speedup": round(loop_time / trainer_time, 1),
        "speedup_unpadded": round(loop_time / unpadded_time, 1),
        "unpadded_one_thread_s": round(unpadded_one_thread, 5),
        "speedup_one_thread": round(loop_time / unpadded_one_thread, 1),
        "unpadded_autograd_on_s": round(unpadded_autograd_on, 5),
        "speedup_autograd_on": round(loop_time / unpadded_autograd_on, 1),
        "speedup_vs_loop_without_tolist": round(loop_time_compute_only / unpadded_time, 1),
        "speedup_padded": round(loop_time / vec_time, 1),
        "speedup_padded_validate_everywhere": round(loop_time / vec_time_all, 1),
        "max_abs_diff_vs_loop": diff_trainer,
        "max_abs_diff_vs_loop_unpadded": diff_unpadded,
        "max_abs_diff_vs_loop_padded": diff,
    }


_MEMORY_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from megaseg.algorithms.entropy import token_entropy
torch.set_num_threads(2)
positions, vocab, chunk = {positions}, {vocab}, {chunk}
torch.manual_seed(0)
logits = torch.empty(positions, vocab, dtype=torch.bfloat16).normal_()  # in place: no fp32 temporary
token_entropy(logits[:2], chunk_size=1)  # warm-up: page in the kernels' code before measuring
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = token_entropy(logits, chunk_size=chunk)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = {{"extra": peak - before, "blind_spot": max(0, peak_before - before), "mean_entropy": out.mean().item()}}
print(json.dumps(result))
"""


def entropy_memory(positions: int, vocab: int, chunk: int) -> dict:
    code = _MEMORY_CHILD.format(root=ROOT, positions=positions, vocab=vocab, chunk=chunk)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["subprocess_s"] = round(elapsed, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--loop-rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--rounds", type=int, default=5,
        help="interleaved rounds of --repeats timed runs per vectorised path; more rounds spread the samples over "
        "more time, so that a neighbour's burst on a shared machine is less likely to hit all of them",
    )  # fmt: skip
    parser.add_argument("--loop-repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads for the vectorised paths (default: torch's own, one per core); the unpadded path is "
        "also timed on one thread",
    )  # fmt: skip
    parser.add_argument("--positions", type=int, default=2 * 1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    figures = time_pipelines(
        args.batch, args.seq, args.loop_rows, args.device, args.repeats, args.loop_repeats, args.rounds
    )
    print(
        f"pipeline {args.batch}x{args.seq} on {args.device} ({figures['torch_threads']} thread(s)): unpadded "
        f"{figures['unpadded_s'] * 1e3:.2f} ms ({figures['unpadded_one_thread_s'] * 1e3:.2f} ms on one), padded {figures['padded_s'] * 1e3:.2f} ms "
        f"({figures['padded_validate_everywhere_s'] * 1e3:.2f} ms validating in every function), "
        f"loop {figures['loop_extrapolated_s']:.3f} s (timed on {figures['loop_rows_timed']} rows = "
        f"{figures['loop_tokens_timed']} tokens, extrapolated linearly to {figures['response_tokens']} tokens) -> "
        f"{figures['speedup']}x the trainer's path, {figures['speedup_unpadded']}x unpadded "
        f"({figures['speedup_one_thread']}x on one thread), "
        f"{figures['speedup_padded']}x padded; max |diff| vs loop "
        f"{figures['max_abs_diff_vs_loop']:.2e}"
    )

    chunk_bytes = args.chunk * args.vocab * 4
    chunked = entropy_memory(args.positions, args.vocab, args.chunk)
    whole = entropy_memory(args.positions, args.vocab, args.positions)
    figures.update(
        {
            "entropy_positions": args.positions,
            "entropy_vocab": args.vocab,
            "entropy_chunk": args.chunk,
            "entropy_chunk_fp32_mib": round(chunk_bytes / 2**20, 1),
            "entropy_chunked_peak_mib": round(chunked["extra"] / 2**20, 1),
            "entropy_chunked_peak_in_chunks": round(chunked["extra"] / chunk_bytes, 2),
            "entropy_unchunked_peak_mib": round(whole["extra"] / 2**20, 1),
            "entropy_unchunked_peak_in_chunks": round(whole["extra"] / chunk_bytes, 2),
            "entropy_rss_blind_spot_mib": round(max(chunked["blind_spot"], whole["blind_spot"]) / 2**20, 1),
            "entropy_same_result": abs(chunked["mean_entropy"] - whole["mean_entropy"]) < 1e-6,
        }
    )
    print(
        f"token_entropy {args.positions}x{args.vocab} bf16: chunk {args.chunk} "
        f"({figures['entropy_chunk_fp32_mib']} MiB fp32) peak extra {figures['entropy_chunked_peak_mib']} MiB = "
        f"{figures['entropy_chunked_peak_in_chunks']} chunks; unchunked {figures['entropy_unchunked_peak_mib']} MiB"
    )
    figures["targets_met"] = figures["speedup"] >= 50 and figures["entropy_chunked_peak_in_chunks"] <= 2.0
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
