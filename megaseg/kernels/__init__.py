"""Triton kernels for the hot segment and vocabulary paths, each beside the torch reference it must match.

- ``segment_reduce``: ragged e(x, y) (mean / sum / min / last at the segment ends), forward and backward;
  reference ``megaseg.algorithms.aggregation``;
- ``vocab_partials``: one pass over a ``[tokens, vocab_shard]`` logits block giving the shard max, the softmax sums
  and the target logit, and the entropy / log-prob backward that recomputes probabilities instead of storing them;
  combined over the tensor-parallel group by ``megaseg.parallel.vocab_parallel``, whose chunked torch path is the
  reference;
- ``scan``: GAE as a segmented reverse scan (with the returns) and the masked whitening moments; references
  ``megaseg.algorithms.advantages.gae`` and ``megaseg.algorithms.ppo.masked_moments``;
- ``reward_shaping``: location normalization, interpolation, clamp and KL penalty per token in one kernel; reference
  the PPO experience maker's phases in ``megaseg.training.ppo.reward_shaping`` (not yet dispatched to: the experience
  maker times those phases one by one).

Tested on CPU in Triton's interpreter against the torch references and per-sequence loops (tests/kernels), and
compiled there for sm_90 with Triton's ptxas; timed on a GPU by benchmarks/kernels.py.

``dispatch`` chooses between them and torch (config ``kernels: auto | triton | torch``). It never imports Triton: the
kernel modules are imported only when a dispatch point runs a kernel, so that ``TRITON_INTERPRET`` (read when a kernel
is defined) can still be set for CPU runs, and so that megaseg runs without Triton installed.
"""
from megaseg.kernels.dispatch import KERNEL_CHOICES, kernels_mode, select_kernels, selected_kernels, use_triton

__all__ = ["KERNEL_CHOICES", "kernels_mode", "select_kernels", "selected_kernels", "use_triton"]
