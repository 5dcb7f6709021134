"""The regression behind the location-aware normalizer (paper Sec. 2.3, Appendix F), in numpy/scikit-learn.

Recipe (docs/method.md): group segment rewards by their location p rounded to 3 decimals, as the paper's released
code does (its string key ``f"{p:.3f}"``: correct rounding of the stored binary value, so 1/80 = 0.0125, stored just
above the half, groups as 0.013 where ``np.round`` would give 0.012), take the population mean and std (ddof=0) of
each group, and fit Mean(p) = w_mu log(p) + b_mu and Std(p) = w_sigma log(p) +
b_sigma with one unweighted point per distinct p. The regressor is x = log(p + 1e-10), as in the released code; for
p >= 0.001 that differs from log(p) by less than 1e-7.

Locations that round to 0.000 (p < 0.0005, i.e. responses with more than 2000 segments) would enter the fit at
log(1e-10) = -23, a leverage point far from every real location. They are dropped with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FIT_METHODS = ("huber", "ols")
LOG_EPS = 1e-10
ROUND_DECIMALS = 3
HUBER_EPSILON = 1.35


def as_float_array(name: str, values) -> np.ndarray:
    """1-D float64 numpy copy of a list, numpy array or torch tensor (any device)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per segment), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(array)))} NaN or inf entries")
    return array


def checked_pairs(positions, rewards) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D (positions, rewards) of equal length with every p in (0, 1]."""
    p = as_float_array("positions", positions)
    r = as_float_array("rewards", rewards)
    if p.shape != r.shape:
        raise ValueError(f"positions has {p.shape[0]} entries but rewards has {r.shape[0]}; one p per reward")
    if p.size == 0:
        raise ValueError("no calibration samples: positions and rewards are empty")
    outside = (p <= 0) | (p > 1)
    if outside.any():
        raise ValueError(
            f"positions must lie in (0, 1] (p = (t + 1) / T); {int(outside.sum())} do not, "
            f"e.g. {p[outside][:5].tolist()}"
        )
    return p, r


@dataclass(frozen=True)
class LocationTable:
    """Per-location statistics, one row per distinct rounded p (ascending), and the smallest raw p kept."""

    p: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    p_min: float

    def to_dict(self) -> dict[str, list]:
        return {
            "p": self.p.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "count": [int(c) for c in self.count],
        }


def rounded_locations(positions: np.ndarray) -> np.ndarray:
    """p rounded to ``ROUND_DECIMALS`` the way ``f"{p:.3f}"`` rounds (the module docstring), as floats."""
    # Locations are t / T fractions: few distinct values, so each is formatted once.
    distinct, inverse = np.unique(positions, return_inverse=True)
    keys = np.array([float(f"{value:.{ROUND_DECIMALS}f}") for value in distinct.tolist()], dtype=np.float64)
    return keys[inverse.reshape(-1)]


def location_table(positions: np.ndarray, rewards: np.ndarray) -> LocationTable:
    """Group rewards by p rounded to 3 decimals; population mean and std per group."""
    keys = rounded_locations(positions)
    dropped = keys <= 0
    if dropped.any():
        warnings.warn(
            f"dropping {int(dropped.sum())} segment rewards whose location p < 0.0005 rounds to 0 "
            "(responses with more than 2000 segments); log(0 + 1e-10) would dominate the fit",
            stacklevel=3,
        )
        keys, positions, rewards = keys[~dropped], positions[~dropped], rewards[~dropped]
    if keys.size == 0:
        raise ValueError("no calibration samples left after dropping locations that round to 0")
    p, inverse, count = np.unique(keys, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=rewards) / count
    var = np.bincount(inverse, weights=(rewards - mean[inverse]) ** 2) / count
    return LocationTable(p=p, mean=mean, std=np.sqrt(var), count=count, p_min=float(positions.min()))


def log_location(p: np.ndarray) -> np.ndarray:
    return np.log(p + LOG_EPS)


def fit_line(x: np.ndarray, y: np.ndarray, method: str) -> tuple[float, float]:
    """(slope, intercept) of y ~ x by Huber regression (scikit-learn, epsilon 1.35) or ordinary least squares."""
    if method == "huber":
        from sklearn.linear_model import HuberRegressor

        # scikit-learn's ConvergenceWarning (lbfgs hit max_iter) is left visible on purpose: the caller should see it.
        model = HuberRegressor(epsilon=HUBER_EPSILON).fit(x[:, None], y)
        return float(model.coef_[0]), float(model.intercept_)
    if method == "ols":
        x_centered = x - x.mean()
        slope = float(np.dot(x_centered, y - y.mean()) / np.dot(x_centered, x_centered))
        return slope, float(y.mean() - slope * x.mean())
    raise ValueError(f"fit method {method!r} is not supported; choose one of {list(FIT_METHODS)}")


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination of a fit; 1.0 for a constant y fitted exactly, 0.0 for a constant y missed."""
    residual = float(np.sum((y - predicted) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total
