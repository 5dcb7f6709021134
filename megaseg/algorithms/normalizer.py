"""Reward normalizers for PPO: the location-aware one (paper Sec. 2.3, App. F, H) and the Table 5 / bandit baselines.

All normalizers share one interface:

- ``Cls.fit(positions, rewards, **metadata)`` from flat 1-D calibration data (one entry per segment reward,
  p in (0, 1]); the metadata (model, c_ent, aggregation, segmentation) is optional and recorded when given;
- ``normalizer(rewards, positions)`` on torch tensors of any shape, typically ``[batch, seq]`` with p at segment ends
  and 0 elsewhere. Entries with ``positions <= 0`` are not segment rewards and come out as 0, so a raw head output at a
  non-end position can never leak into a sum downstream and p = 0 never reaches log(p). ``positions=None`` (scalar
  normalizers only) normalizes every entry, e.g. a ``[batch]`` tensor of sequence rewards;
- ``normalizer.normalize_packed(rewards, num_segments)`` on packed segment rewards (``SegmentLayout.pack``: segment
  t of a row in column t, p = (t + 1) / T), the same values without a per-entry position tensor;
- ``normalizer.normalize_segments(rewards, positions)`` on a list of segment rewards with their p (the unpadded
  layout), the same values without the masking (every entry is a segment reward);
- ``to_dict()`` / ``from_dict()`` JSON-able, with the metadata that ties a normalizer to the reward model it was
  calibrated on (model, c_ent, aggregation, segmentation), so PPO can refuse a mismatched one
  (``check_compatible``). ``normalizer_from_dict`` dispatches on the ``"kind"`` field.

Location normalizer domain: Std(p) = w_sigma log p + b_sigma is linear in log p, so with w_sigma > 0 it falls below 0
as p -> 0+. It is only trusted on the calibrated range [p_min, 1], p_min the smallest location seen in calibration
(1 / the largest segment count): fit and from_dict require Std > 0 at both ends of that range (hence on all of it), and
at apply time p is clamped into it, so a PPO response with more segments than any calibration response reuses the
statistics at p_min instead of extrapolating log p towards -inf.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from megaseg.algorithms.location_fit import (
    FIT_METHODS,
    LOG_EPS,
    as_float_array,
    checked_pairs,
    fit_line,
    location_table,
    log_location,
    r_squared,
)
from megaseg.algorithms.masking import zero_outside
from megaseg.algorithms.segments import packed_positions, packed_segment_mask
from megaseg.algorithms.validation import check_choice

METADATA_KEYS = ("model", "c_ent", "aggregation", "segmentation", "num_samples")


def segmentation_label(mode: str, ngram_size: int | None = None) -> str:
    """The ``segmentation`` a normalizer records: the mode name, with n for n-gram segments ("ngram-5"), whose
    reward statistics depend on n as much as entropy segments' do on c_ent."""
    return f"ngram-{ngram_size}" if mode == "ngram" else mode


def _require(data: dict[str, Any], keys: tuple[str, ...], kind: str) -> None:
    for key in keys:
        if key not in data:
            raise ValueError(f"normalizer dict (kind {kind!r}) is missing the key {key!r}")


def _finite_float(data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"normalizer field {key!r} must be a finite number, got {value!r}")
    return float(value)


class Normalizer:
    """Base class: metadata handling, the p <= 0 masking rule and JSON round trips."""

    kind: ClassVar[str] = ""
    param_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        model: str | None = None,
        c_ent: float | None = None,
        aggregation: str | None = None,
        segmentation: str | None = None,
        num_samples: int = 0,
    ):
        # The calibration metadata is optional (a normalizer fitted by hand on arrays); the CLI always records it.
        self.model = model
        self.c_ent = None if c_ent is None else float(c_ent)
        self.aggregation = aggregation
        self.segmentation = segmentation
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"normalizer field 'num_samples' must be a count >= 0, got {num_samples!r}")
        self.num_samples = num_samples

    def metadata(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in METADATA_KEYS}

    def params(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.param_keys}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.metadata(), **self.params()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        _require(data, ("kind", *METADATA_KEYS, *cls.param_keys), cls.kind)
        if data["kind"] != cls.kind:
            raise ValueError(f"normalizer dict has kind {data['kind']!r}, expected {cls.kind!r}")
        return cls._from_fields(data, {key: data[key] for key in METADATA_KEYS})

    @classmethod
    def _from_fields(cls, data: dict[str, Any], metadata: dict[str, Any]) -> Normalizer:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def check_compatible(
        self,
        *,
        model: str | None = None,
        c_ent: float | None = None,
        aggregation: str | None = None,
        segmentation: str | None = None,
    ) -> None:
        """Raise ValueError listing every given setting that differs from the calibration metadata."""
        wanted = {"model": model, "c_ent": c_ent, "aggregation": aggregation, "segmentation": segmentation}
        mismatched = []
        for key, value in wanted.items():
            if value is None:
                continue
            have = getattr(self, key)
            same = (have is not None and math.isclose(have, value)) if key == "c_ent" else have == value
            if not same:
                mismatched.append(f"{key}: normalizer has {have!r}, run uses {value!r}")
        if mismatched:
            raise ValueError(
                f"{self.kind} normalizer was calibrated for different settings ({'; '.join(mismatched)}); "
                "fit a normalizer for this reward model and segmentation"
            )

    def _normalize(self, rewards: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, rewards: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized rewards, same shape as ``rewards``, in at least fp32; 0 wherever ``positions <= 0``."""
        if positions is not None and positions.shape != rewards.shape:
            raise ValueError(
                f"positions has shape {tuple(positions.shape)} but rewards has shape {tuple(rewards.shape)}"
            )
        # bf16 head outputs are upcast: log p and the division need more than 8 mantissa bits.
        rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
        out = self._normalize(rewards, positions)
        if positions is None:
            return out
        return zero_outside(out, positions > 0)

    def normalize_segments(self, rewards: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``self(rewards, positions)`` for a list of segment rewards, each at its location p in (0, 1] (no entry is
        a non-segment one, so none is masked), in at least fp32."""
        if positions.shape != rewards.shape:
            raise ValueError(
                f"positions has shape {tuple(positions.shape)} but rewards has shape {tuple(rewards.shape)}"
            )
        return self._normalize(rewards.to(torch.promote_types(rewards.dtype, torch.float32)), positions)

    def normalize_packed(self, rewards: torch.Tensor, num_segments: torch.Tensor) -> torch.Tensor:
        """Normalized packed segment rewards, in at least fp32, 0 in the columns t >= T.

        Args:
            rewards: ``[batch, width]`` segment t of each row in column t, finite (0 in the columns t >= T, as
                ``SegmentLayout.pack`` leaves them); its location is p = (t + 1) / T.
            num_segments: ``[batch]`` or ``[batch, 1]`` T >= 1 of each row.

        The values of ``self(rewards, positions)`` with the packed positions; subclasses skip building them.
        """
        rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
        return self(rewards, packed_positions(num_segments, rewards.shape[1], rewards.dtype))


class LocationNormalizer(Normalizer):
    """r <- (r - Mean(p)) / Std(p), Mean/Std linear in log p (paper Eq. 6 / 11-12)."""

    kind = "location"
    param_keys = ("method", "w_mu", "b_mu", "w_sigma", "b_sigma", "p_min", "r2_mean", "r2_std", "table")

    def __init__(
        self,
        *,
        w_mu: float,
        b_mu: float,
        w_sigma: float,
        b_sigma: float,
        p_min: float,
        method: str = "huber",
        r2_mean: float | None = None,
        r2_std: float | None = None,
        table: dict[str, list] | None = None,
        **metadata: Any,
    ):
        super().__init__(**metadata)
        check_choice("fit method", method, FIT_METHODS)
        self.w_mu, self.b_mu = float(w_mu), float(b_mu)
        self.w_sigma, self.b_sigma = float(w_sigma), float(b_sigma)
        self.p_min = float(p_min)
        self.method = method
        # None for hand-entered coefficients (e.g. the paper's), which come without a fit quality.
        self.r2_mean = None if r2_mean is None else float(r2_mean)
        self.r2_std = None if r2_std is None else float(r2_std)
        self.table = table if table is not None else {"p": [], "mean": [], "std": [], "count": []}
        self._check_domain()

    def _check_domain(self) -> None:
        if not 0.0 < self.p_min <= 1.0:
            raise ValueError(f"p_min must be in (0, 1], got {self.p_min!r}")
        # Std is monotone in log p, so positivity at both ends of [p_min, 1] covers the whole range.
        low, high = self.std_at(self.p_min), self.std_at(1.0)
        if not (low > 0 and high > 0):
            raise ValueError(
                f"Std(p) = {self.w_sigma:.6g} * log(p) + {self.b_sigma:.6g} is not positive on the calibrated range "
                f"[{self.p_min:.6g}, 1]: Std(p_min) = {low:.6g}, Std(1) = {high:.6g}. The calibration set is too small "
                "or degenerate (e.g. a reward model that outputs constants); calibrate on more responses"
            )

    def mean_at(self, p: float) -> float:
        return self.w_mu * math.log(p + LOG_EPS) + self.b_mu

    def std_at(self, p: float) -> float:
        return self.w_sigma * math.log(p + LOG_EPS) + self.b_sigma

    @classmethod
    def fit(cls, positions, rewards, method: str = "huber", **metadata: Any) -> LocationNormalizer:
        """Calibrate from flat 1-D arrays/tensors of segment locations p and their rewards (``location_fit``).

        ``metadata``: model, c_ent, aggregation, segmentation (``num_samples`` is counted here).
        """
        check_choice("fit method", method, FIT_METHODS)
        p, r = checked_pairs(positions, rewards)
        table = location_table(p, r)
        if table.p.size < 2:
            raise ValueError(
                f"the location fit needs at least 2 distinct locations p, got {table.p.tolist()}: every calibration "
                "response has a single segment; use BanditNormalizer for one segment per response"
            )
        x = log_location(table.p)
        w_mu, b_mu = fit_line(x, table.mean, method)
        w_sigma, b_sigma = fit_line(x, table.std, method)
        return cls(
            w_mu=w_mu,
            b_mu=b_mu,
            w_sigma=w_sigma,
            b_sigma=b_sigma,
            p_min=table.p_min,
            method=method,
            r2_mean=r_squared(table.mean, w_mu * x + b_mu),
            r2_std=r_squared(table.std, w_sigma * x + b_sigma),
            table=table.to_dict(),
            num_samples=p.size,
            **metadata,
        )

    @classmethod
    def _from_fields(cls, data: dict[str, Any], metadata: dict[str, Any]) -> LocationNormalizer:
        numbers = {key: _finite_float(data, key) for key in ("w_mu", "b_mu", "w_sigma", "b_sigma", "p_min")}
        table = data["table"]
        if not isinstance(table, dict):
            raise ValueError(f"normalizer field 'table' must be a dict of lists, got {type(table).__name__}")
        _require(table, ("p", "mean", "std", "count"), "location table")
        return cls(
            **numbers,
            method=data["method"],
            r2_mean=data["r2_mean"],
            r2_std=data["r2_std"],
            table=table,
            **metadata,
        )

    def _normalize(self, rewards: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            raise ValueError("LocationNormalizer needs the segment locations p (positions) of the rewards")
        log_p = positions.to(rewards.dtype).clamp(min=self.p_min, max=1.0).add_(LOG_EPS).log_()
        centered = torch.sub(rewards, log_p, alpha=self.w_mu).sub_(self.b_mu)  # r - Mean(p)
        return centered.div_(log_p.mul_(self.w_sigma).add_(self.b_sigma))  # / Std(p)

    def normalize_packed(self, rewards: torch.Tensor, num_segments: torch.Tensor) -> torch.Tensor:
        """``Normalizer.normalize_packed`` with log p = log(t + 1) - log T: a log per column and one per row rather
        than one per entry (the log is the costliest op here).

        The clamp of p into [p_min, 1] is applied to log p (log is monotone). LOG_EPS, which ``__call__`` adds to p
        before the log, is left out: it shifts log p by at most LOG_EPS / p_min (< 1e-6 for any p_min > 1e-4), below
        the fp32 resolution of log p.
        """
        rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
        dtype, width = rewards.dtype, rewards.shape[1]
        log_rank = torch.arange(1, width + 1, device=rewards.device, dtype=dtype).log_()
        log_total = num_segments.reshape(-1, 1).to(dtype).log()
        log_p = (log_rank - log_total).clamp_(min=math.log(self.p_min + LOG_EPS), max=0.0)
        centered = torch.add(rewards, log_p, alpha=-self.w_mu).sub_(self.b_mu)  # r - Mean(p)
        std = log_p.mul_(self.w_sigma).add_(self.b_sigma)
        # Columns t >= T hold 0 and a finite (clamped) location, so the masking multiply is exact.
        return centered.div_(std).mul_(packed_segment_mask(num_segments, width, dtype))


class ScalarNormalizer(Normalizer):
    """r <- (r - mean) / std with one (mean, std) pair; subclasses differ only in which rewards they fit on."""

    param_keys = ("mean", "std")

    def __init__(self, *, mean: float, std: float, **metadata: Any):
        super().__init__(**metadata)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"{self.kind} normalizer needs a finite mean and a std > 0, got mean={mean}, std={std}")
        self.mean, self.std = float(mean), float(std)

    @staticmethod
    def _select(p: np.ndarray, r: np.ndarray) -> np.ndarray:
        """The calibration rewards this normalizer is fitted on."""
        return r

    @classmethod
    def fit(cls, positions, rewards, **metadata: Any) -> ScalarNormalizer:
        """Population mean/std (ddof=0) of the selected rewards (``positions`` may be None for the bandit kind)."""
        if positions is None:
            r = as_float_array("rewards", rewards)
            p = np.ones_like(r)
        else:
            p, r = checked_pairs(positions, rewards)
        selected = cls._select(p, r)
        if selected.size == 0:
            raise ValueError(f"no calibration rewards to fit the {cls.kind} normalizer on")
        return cls(mean=float(selected.mean()), std=float(selected.std()), num_samples=selected.size, **metadata)

    @classmethod
    def _from_fields(cls, data: dict[str, Any], metadata: dict[str, Any]) -> ScalarNormalizer:
        return cls(mean=_finite_float(data, "mean"), std=_finite_float(data, "std"), **metadata)

    def _normalize(self, rewards: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return (rewards - self.mean) / self.std

    def normalize_packed(self, rewards: torch.Tensor, num_segments: torch.Tensor) -> torch.Tensor:
        rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
        mask = packed_segment_mask(num_segments, rewards.shape[1], rewards.dtype)
        return ((rewards - self.mean) / self.std).mul_(mask)


class GlobalNormalizer(ScalarNormalizer):
    """Table 5 "global statistics of all": mean/std over every segment reward of the calibration set."""

    kind = "global"


class LastSegmentNormalizer(ScalarNormalizer):
    """Table 5 ablation: mean/std of the last segment reward (p = 1) of each calibration response."""

    kind = "last_segment"

    @staticmethod
    def _select(p: np.ndarray, r: np.ndarray) -> np.ndarray:
        return r[np.isclose(p, 1.0, rtol=0.0, atol=1e-6)]


class BanditNormalizer(ScalarNormalizer):
    """Classical bandit normalizer: mean/std of full-sequence rewards (one per response) of the calibration set."""

    kind = "bandit"


class IdentityNormalizer(Normalizer):
    """Table 5 "none": rewards pass through unchanged (still zeroed where positions <= 0)."""

    kind = "none"

    @classmethod
    def fit(cls, positions=None, rewards=None, **metadata: Any) -> IdentityNormalizer:
        num = 0 if rewards is None else as_float_array("rewards", rewards).size
        return cls(num_samples=num, **metadata)

    @classmethod
    def _from_fields(cls, data: dict[str, Any], metadata: dict[str, Any]) -> IdentityNormalizer:
        return cls(**metadata)

    def _normalize(self, rewards: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return rewards

    def normalize_packed(self, rewards: torch.Tensor, num_segments: torch.Tensor) -> torch.Tensor:
        rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
        return rewards * packed_segment_mask(num_segments, rewards.shape[1], rewards.dtype)


NORMALIZERS: dict[str, type[Normalizer]] = {
    cls.kind: cls
    for cls in (LocationNormalizer, GlobalNormalizer, LastSegmentNormalizer, BanditNormalizer, IdentityNormalizer)
}


def normalizer_from_dict(data: dict[str, Any]) -> Normalizer:
    """Rebuild any normalizer from ``to_dict`` output, dispatching on ``data["kind"]``."""
    if not isinstance(data, dict):
        raise ValueError(f"a normalizer must be loaded from a dict, got {type(data).__name__}")
    _require(data, ("kind",), "unknown")
    check_choice("normalizer kind", data["kind"], NORMALIZERS)
    return NORMALIZERS[data["kind"]].from_dict(data)


def load_normalizer(path: str | Path) -> Normalizer:
    """``normalizer_from_dict`` of a JSON file written by ``Normalizer.save``."""
    return normalizer_from_dict(json.loads(Path(path).read_text()))
