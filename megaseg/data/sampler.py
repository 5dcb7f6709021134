"""A deterministic, resumable order over a dataset, sharded across data-parallel ranks.

Epoch e visits a permutation of the dataset drawn from (seed, e) alone, so every rank computes the same global order
without communicating, and a restart reproduces it. Global position k of an epoch goes to rank k % dp_size: a global
batch of G = dp_size * m consecutive positions gives every rank m samples, and the ranks' shards of an epoch are
disjoint and together cover it.

The position is counted in GLOBAL samples and advanced by the trainer (`advance(global_batch_size)` after each step),
not by iteration: a data loader that prefetches ahead must not move the resume point. Because the position is global,
a run may resume with a different dp_size as long as the position is a multiple of it.

When dp_size does not divide the dataset size: drop_last=True (default) leaves out the last `n % dp_size` samples of
each epoch's permutation (different ones every epoch); drop_last=False repeats the first samples of the permutation
to fill the last round, like torch's DistributedSampler.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerState:
    epoch: int
    consumed_in_epoch: int   # global samples (all ranks) consumed in this epoch
    seed: int
    num_samples: int         # dataset size, to refuse resuming on different data
    shuffle: bool
    drop_last: bool


class ResumableShardedSampler:
    def __init__(self, num_samples: int, *, seed: int, dp_rank: int, dp_size: int, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples={num_samples} must be > 0")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if drop_last and num_samples < dp_size:
            raise ValueError(f"num_samples={num_samples} < dp_size={dp_size}: with drop_last every rank would get "
                             "nothing; use more data or drop_last=False")
        self.num_samples = num_samples
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed_in_epoch = 0

    @property
    def samples_per_epoch(self) -> int:
        """Global samples in one epoch (a multiple of dp_size)."""
        if self.drop_last:
            return self.num_samples - self.num_samples % self.dp_size
        return -(-self.num_samples // self.dp_size) * self.dp_size

    def global_order(self, epoch: int) -> list[int]:
        """The dataset indices of `epoch`, in visiting order, for all ranks together ([samples_per_epoch])."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:
            return order[:self.samples_per_epoch]
        padding = self.samples_per_epoch - self.num_samples
        return order + (order * (padding // self.num_samples + 1))[:padding]

    def __iter__(self) -> Iterator[int]:
        """This rank's indices from the current position to the end of the current epoch."""
        order = self.global_order(self.epoch)
        return iter(order[self.consumed_in_epoch + self.dp_rank::self.dp_size])

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.consumed_in_epoch) // self.dp_size

    def next_global_batch(self, global_batch_size: int) -> list[int]:
        """This rank's indices of the next global batch (global_batch_size / dp_size of them), without advancing.

        The epoch-tail rule of every trainer: when fewer than a global batch remain in the epoch, the tail is skipped
        (advanced over) and the batch comes from the next epoch, so every step sees a whole global batch."""
        if global_batch_size % self.dp_size or not 0 < global_batch_size <= self.samples_per_epoch:
            raise ValueError(f"a global batch of {global_batch_size} must be a positive multiple of dp_size="
                             f"{self.dp_size} no larger than an epoch ({self.samples_per_epoch} samples)")
        left = self.samples_per_epoch - self.consumed_in_epoch
        if left < global_batch_size:
            self.advance(left)
        return list(iter(self))[:global_batch_size // self.dp_size]

    def advance(self, num_global_samples: int) -> None:
        """Record that all ranks together consumed `num_global_samples` more; at the epoch's end start the next."""
        if num_global_samples < 0 or num_global_samples % self.dp_size:
            raise ValueError(f"advance({num_global_samples}) must be a non-negative multiple of dp_size="
                             f"{self.dp_size} (every rank consumes the same number of samples)")
        position = self.consumed_in_epoch + num_global_samples
        if position > self.samples_per_epoch:
            raise ValueError(f"advance({num_global_samples}) from position {self.consumed_in_epoch} passes the end of "
                             f"epoch {self.epoch} ({self.samples_per_epoch} samples); advance to the end, then on")
        if position == self.samples_per_epoch:
            self.epoch, self.consumed_in_epoch = self.epoch + 1, 0
        else:
            self.consumed_in_epoch = position

    def state_dict(self) -> dict:
        return asdict(SamplerState(self.epoch, self.consumed_in_epoch, self.seed, self.num_samples, self.shuffle,
                                   self.drop_last))

    def load_state_dict(self, state: dict) -> None:
        saved = SamplerState(**state)
        mine = {"seed": self.seed, "num_samples": self.num_samples, "shuffle": self.shuffle,
                "drop_last": self.drop_last}
        different = {key: (getattr(saved, key), value) for key, value in mine.items() if getattr(saved, key) != value}
        if different:
            raise ValueError(f"the saved sampler state does not match this run (saved, now): {different}; resume "
                             "with the same data, seed and sampler settings")
        if saved.consumed_in_epoch % self.dp_size or saved.consumed_in_epoch > self.samples_per_epoch:
            raise ValueError(f"saved position {saved.consumed_in_epoch} of epoch {saved.epoch} is not a multiple of "
                             f"dp_size={self.dp_size} within {self.samples_per_epoch} samples; resume with a dp_size "
                             "that divides it")
        self.epoch, self.consumed_in_epoch = saved.epoch, saved.consumed_in_epoch
