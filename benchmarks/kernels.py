"""The Triton kernels of megaseg/kernels against the torch paths they replace: correctness everywhere, and on a CUDA
GPU each kernel's achieved memory bandwidth (bytes it must move / time) against the device's peak, and its speed-up.

    .venv/bin/python benchmarks/kernels.py [--quick]

Kernels, each through the same dispatch point the trainers call (``kernels_mode("triton")`` vs ``"torch"``):
- ``segment_reduce``: ``aggregate_segment_rewards`` (mean) of ``[batch, seq]`` reward-head outputs, forward + backward;
- ``vocab_entropy`` / ``vocab_log_probs``: ``vocab_parallel_entropy`` / ``vocab_parallel_log_probs`` on one
  ``[tokens, vocab_shard]`` bf16 shard (a 128k vocabulary at TP=2), forward, and ``vocab_log_probs_backward``;
- ``gae``: ``advantages.gae(contiguous=True)`` of ``[batch, seq]`` fp32 rollouts;
- ``masked_moments``: ``ppo.masked_moments`` of the advantages;
- ``reward_shaping``: the PPO experience maker's ``shape_rewards`` (location normalizer, even interpolation, clamp,
  k3 KL) on a scored ``[batch, seq]`` rollout: the fused kernel (with the pad / unpad around it) against the
  unpadded torch phases; its bytes count the kernel's own reads and writes.

Bytes are what the op must read and write at least (the logits once per pass, each per-token tensor once); time is
the median of CUDA-event-timed repeats after a warm-up. Peak bandwidth: the device's datasheet figure when its name
is known, else 2 x memory clock x bus width; a device-to-device copy's bandwidth is reported beside it.
On a CPU the kernels run in Triton's interpreter (set here before they are imported) on small inputs, and only their
agreement with the torch path is measured. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any megaseg kernel is defined
# The script's own folder (sys.path[0]) holds kernels.py, which would shadow the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from megaseg.algorithms.advantages import gae  # noqa: E402
from megaseg.algorithms.aggregation import aggregate_segment_rewards  # noqa: E402
from megaseg.algorithms.normalizer import LocationNormalizer  # noqa: E402
from megaseg.algorithms.ppo import masked_moments  # noqa: E402
from megaseg.config.segmentation import SegmentationConfig  # noqa: E402
from megaseg.data.batch import SequenceBatch  # noqa: E402
from megaseg.kernels import kernels_mode  # noqa: E402
from megaseg.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs  # noqa: E402
from megaseg.training.ppo.reward_plan import RewardPlan  # noqa: E402
from megaseg.training.ppo.reward_shaping import score_segments, shape_rewards  # noqa: E402

# Datasheet HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12,
                  "L4": 0.3e12, "A10": 0.6e12, "B200": 8.0e12, "GH200": 4.0e12}


def _peak_bandwidth() -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value, f"datasheet ({key})"
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8, "2 x memory clock x bus width"


def _time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _copy_bandwidth(device) -> float:
    source = torch.empty(2**28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / _time(lambda: target.copy_(source), 20)


def _cases(device, quick: bool, gpu: bool) -> dict:
    """name -> (run(mode) -> tensor, bytes moved)."""
    generator = torch.Generator().manual_seed(0)
    if gpu:
        batch, seq, tokens, vocab = (64, 2048, 4096, 64128) if not quick else (16, 2048, 1024, 64128)
    else:
        batch, seq, tokens, vocab = 3, 300, 6, 700
    response = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        response[b, seq // 4 + b % 7:seq - b % 13] = True
    ends = response & (torch.rand(batch, seq, generator=generator) < 0.2)
    ends[torch.arange(batch), seq - 1 - torch.arange(batch) % 13] = True
    response, ends = response.to(device), ends.to(device)
    values = torch.randn(batch, seq, generator=generator).to(device)
    rewards = torch.randn(batch, seq, generator=generator).to(device)
    logits = (torch.randn(tokens, vocab, generator=generator) * 3).to(torch.bfloat16).to(device)
    targets = torch.randint(0, 2 * vocab, (tokens,), generator=generator).to(device)  # half in this shard
    leaf = values.clone().requires_grad_(True)
    logits_leaf = logits.clone().requires_grad_(True)
    n = batch * seq

    def segment_reduce(mode):
        with kernels_mode(mode):
            scores = aggregate_segment_rewards(leaf, ends, "mean", validate=False)
        (grad,) = torch.autograd.grad(scores.sum(), leaf)
        return torch.cat([scores.detach(), grad.flatten()])

    def vocab_entropy(mode):
        with kernels_mode(mode), torch.no_grad():
            return vocab_parallel_entropy(logits, None)

    def vocab_log_probs(mode):
        with kernels_mode(mode), torch.no_grad():
            return vocab_parallel_log_probs(logits, targets, None, validate=False)

    def vocab_log_probs_backward(mode):
        with kernels_mode(mode):
            log_probs = vocab_parallel_log_probs(logits_leaf, targets, None, validate=False)
        (grad,) = torch.autograd.grad(log_probs.sum(), logits_leaf)
        return grad.float()

    def run_gae(mode):
        with kernels_mode(mode):
            return torch.cat(gae(rewards, values, response, 1.0, 0.95, contiguous=True, validate=False))

    def moments(mode):
        with kernels_mode(mode):
            return masked_moments(values, response)

    # A scored rollout as the experience maker has it (segment ends: the random ones, no EOS).
    plan = RewardPlan(granularity="segment", segmentation=SegmentationConfig(mode="entropy", entropy_cutoff=2.0),
                      sequence_level=False, aggregation="mean", interpolation="even", normalizer_kind="location")
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    rollout = SequenceBatch(ids, response.clone(), response, torch.zeros_like(response), ids)
    scored = score_segments(plan, lambda _sequences, _ends: values, rollout, ends)
    normalizer = LocationNormalizer(w_mu=0.7668, b_mu=0.4705, w_sigma=0.2569, b_sigma=2.8339, p_min=0.05)
    log_probs = -torch.rand(batch, seq, generator=generator).mul_(5).to(device)
    ref_log_probs = log_probs - torch.randn(batch, seq, generator=generator).mul_(0.1).to(device)

    def reward_shaping(mode):
        with kernels_mode(mode):
            shaped = shape_rewards(normalizer, scored, log_probs, ref_log_probs, interpolation="even", clip=10.0,
                                   kl_coef=0.05, estimator="k3")
        return torch.cat([shaped.normalized, shaped.token_rewards, shaped.kl, shaped.rewards])

    logits_bytes = logits.numel() * logits.element_size()
    return {
        "segment_reduce": (segment_reduce, n * (4 + 1) + n * (1 + 4)),  # forward reads ends+values, backward ends+grad
        "vocab_entropy": (vocab_entropy, logits_bytes),
        "vocab_log_probs": (vocab_log_probs, logits_bytes),
        # Forward read; backward read + write. The gradient is bf16: the two paths may round an entry 1 ulp apart.
        "vocab_log_probs_backward": (vocab_log_probs_backward, 3 * logits_bytes),
        "gae": (run_gae, n * (4 + 4 + 1 + 4 + 4)),
        "masked_moments": (moments, n * (4 + 1)),
        # Reads raw rewards, ends, mask and both log-probs, writes four fp32 outputs.
        "reward_shaping": (reward_shaping, n * (4 + 1 + 1 + 4 + 4 + 4 * 4)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller GPU inputs (the gpu_check script)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    summary = {"benchmark": "kernels", "device": torch.cuda.get_device_name() if gpu else "cpu",
               "measured": "bandwidth, speed-up and correctness" if gpu else
               "correctness only (no GPU: the kernels ran in Triton's interpreter; no timing is meaningful)"}
    if gpu:
        peak, source = _peak_bandwidth()
        summary.update(peak_bandwidth_bytes_per_s=peak, peak_source=source, copy_bandwidth_bytes_per_s=_copy_bandwidth(device))
    results = {}
    for name, (run, num_bytes) in _cases(device, args.quick, gpu).items():
        triton_out, torch_out = run("triton"), run("torch")
        error = float((triton_out.double() - torch_out.double()).abs().max())
        scale = float(torch_out.double().abs().max())
        # Relative tolerance: fp32 reductions in another order (1e-3 of the largest value), or one bf16 ulp.
        tolerance = (2 ** -7 if name == "vocab_log_probs_backward" else 1e-3) * max(scale, 1.0)
        entry = {"max_abs_diff_vs_torch": error, "max_abs_torch": scale, "ok": error <= tolerance}
        if gpu:
            triton_s, torch_s = _time(lambda: run("triton"), args.repeats), _time(lambda: run("torch"), args.repeats)
            entry.update(bytes=num_bytes, triton_s=triton_s, torch_s=torch_s, speedup_vs_torch=torch_s / triton_s,
                         bytes_per_s=num_bytes / triton_s, fraction_of_peak=num_bytes / triton_s / peak)
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    summary["kernels"] = results
    summary["all_ok"] = all(entry["ok"] for entry in results.values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
