"""Pure tensor math of the method: entropy, segmentation, aggregation, normalizers, interpolation, PPO/DPO losses.

Imports torch (numpy/scikit-learn for the normalizer fit) only; never megatron, torch.distributed or config objects.
Every function works on right-padded ``[batch, seq]`` tensors and is vectorised over tokens and segments.

Modules: ``entropy``, ``segmentation`` (+ index helpers and ``SegmentLayout`` in ``segments``), ``aggregation``,
``normalizer`` (+ regression in ``location_fit``), ``interpolation``, ``ppo`` (+ GAE in ``advantages``), ``dpo``,
``validation``, ``masking`` (NaN-safe zeroing and mask reductions that stay fast on CPU).

A pipeline that runs several phases on one segmentation builds a ``SegmentLayout`` once and keeps segment rewards
packed (segment t in column t) from the reward head output to the interpolation: ``packed_segment_rewards`` ->
``aggregate_packed_rewards`` / ``Normalizer.normalize_packed`` -> ``packed_token_rewards``.
"""

from megaseg.algorithms.aggregation import (
    AGGREGATIONS,
    aggregate_packed_rewards,
    aggregate_segment_rewards,
    bradley_terry_loss,
    mean_segment_reward,
    packed_segment_rewards,
    padded_segment_positions,
    padded_segment_rewards,
)
from megaseg.algorithms.dpo import dpo_loss
from megaseg.algorithms.entropy import token_entropy, token_log_probs
from megaseg.algorithms.interpolation import INTERPOLATION_MODES, packed_token_rewards, token_rewards
from megaseg.algorithms.normalizer import (
    BanditNormalizer,
    GlobalNormalizer,
    IdentityNormalizer,
    LastSegmentNormalizer,
    LocationNormalizer,
    load_normalizer,
    normalizer_from_dict,
)
from megaseg.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from megaseg.algorithms.masking import zero_outside
from megaseg.algorithms.segmentation import (
    SEGMENTATION_MODES,
    SegmentLayout,
    bandit_segment_ends,
    entropy_segment_ends,
    ngram_segment_ends,
    segment_ends,
    segment_ids,
    segment_lengths,
    segment_positions,
    sentence_segment_ends,
    token_segment_ends,
)

__all__ = [
    "AGGREGATIONS",
    "INTERPOLATION_MODES",
    "SEGMENTATION_MODES",
    "AdaptiveKLController",
    "BanditNormalizer",
    "FixedKLController",
    "GlobalNormalizer",
    "IdentityNormalizer",
    "LastSegmentNormalizer",
    "LocationNormalizer",
    "SegmentLayout",
    "aggregate_packed_rewards",
    "aggregate_segment_rewards",
    "bandit_segment_ends",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy_segment_ends",
    "gae",
    "kl_penalty",
    "load_normalizer",
    "masked_mean",
    "masked_whiten",
    "mean_segment_reward",
    "ngram_segment_ends",
    "normalizer_from_dict",
    "packed_segment_rewards",
    "packed_token_rewards",
    "padded_segment_positions",
    "padded_segment_rewards",
    "policy_loss",
    "segment_ends",
    "segment_ids",
    "segment_lengths",
    "segment_positions",
    "sentence_segment_ends",
    "token_entropy",
    "token_log_probs",
    "token_rewards",
    "token_segment_ends",
    "value_loss",
    "zero_outside",
]
