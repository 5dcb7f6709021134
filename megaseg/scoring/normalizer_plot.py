"""A picture of a fitted normalizer for people: per-location mean and std of the calibration rewards, and the fit.

Two panels side by side, Mean(p) and Std(p), p on a log axis (the fit is linear in log p, so the curve is a straight
line there). Each dot is one distinct location p (rounded to 3 decimals), its area growing with the number of segment
rewards behind it; the fitted curve is drawn over the calibrated range [p_min, 1], with its equation and R^2 in the
legend and the panel title. Scalar normalizers (global / last / bandit) are drawn as horizontal lines.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global state, no display needed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from megaseg.algorithms.normalizer import LocationNormalizer, Normalizer, ScalarNormalizer
from megaseg.atomic_io import write_bytes_atomic

SCALAR_LABELS = {"global": "global mean/std of all segment rewards",
                 "last_segment": "mean/std of last-segment rewards",
                 "bandit": "mean/std of sequence rewards e(x, y)"}


def _r2_text(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _draw_panel(axes: Any, p: np.ndarray, values: np.ndarray, counts: np.ndarray, normalizer: Normalizer,
                which: str) -> None:
    sizes = 8 + 60 * counts / max(counts.max(), 1)
    axes.scatter(p, values, s=sizes, alpha=0.6, color="tab:blue", edgecolors="none",
                 label=f"calibration: {which} per location p (dot area ~ count)")
    if isinstance(normalizer, LocationNormalizer):
        grid = np.geomspace(normalizer.p_min, 1.0, 200)
        at = normalizer.mean_at if which == "mean" else normalizer.std_at
        slope, intercept = ((normalizer.w_mu, normalizer.b_mu) if which == "mean"
                            else (normalizer.w_sigma, normalizer.b_sigma))
        r2 = normalizer.r2_mean if which == "mean" else normalizer.r2_std
        axes.plot(grid, [at(x) for x in grid], color="tab:red", linewidth=2,
                  label=f"fit ({normalizer.method}): {slope:.4f} log p + {intercept:.4f}, R² = {_r2_text(r2)}")
        axes.set_title(f"{'Mean' if which == 'mean' else 'Std'}(p), R² = {_r2_text(r2)}")
    elif isinstance(normalizer, ScalarNormalizer):
        level = normalizer.mean if which == "mean" else normalizer.std
        axes.axhline(level, color="tab:red", linewidth=2,
                     label=f"{SCALAR_LABELS.get(normalizer.kind, normalizer.kind)}: {level:.4f}")
        axes.set_title(f"{which} of segment rewards by location ({normalizer.kind} normalizer)")
    else:
        axes.set_title(f"{which} of segment rewards by location (normalizer 'none': rewards used raw)")
    axes.set_xscale("log")
    # Plain-number ticks (0.05, 0.1, ..., 1) read better than powers of ten for a fraction.
    ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if t >= 0.8 * p.min()]
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.set_xticks([], minor=True)
    axes.set_xlabel("segment location p = (t + 1) / T  (log scale)")
    axes.set_ylabel(f"{which} of segment reward")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="best")


def plot_normalizer(path: str | os.PathLike, table: Mapping[str, list], normalizer: Normalizer, title: str) -> Path:
    """Write the PNG (atomically) and return its path.

    Args:
        table: per-location statistics ``{"p", "mean", "std", "count"}`` (``location_fit.LocationTable.to_dict``).
        title: the figure's heading (model, segmentation, number of rewards).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p, mean, std, count = (np.asarray(table[key], dtype=np.float64) for key in ("p", "mean", "std", "count"))
    figure = Figure(figsize=(13, 5), dpi=110)
    FigureCanvasAgg(figure)
    mean_axes, std_axes = figure.subplots(1, 2)
    _draw_panel(mean_axes, p, mean, count, normalizer, "mean")
    _draw_panel(std_axes, p, std, count, normalizer, "std")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return write_bytes_atomic(Path(path), lambda handle: figure.savefig(handle, format="png"))
