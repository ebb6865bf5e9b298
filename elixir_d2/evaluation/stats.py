"""Intervals for detection-quality comparisons (docs/evaluation.md, Intervals).

Two sources of spread, two intervals:

* over training seeds: the paired per-seed difference of two models trained on the same seeds,
  with a Student-t interval (sample std, ddof 1) - what a rerun of the benchmark would move;
* over test patients, for single runs: a bootstrap that resamples patients (all key slices of a
  drawn patient, as often as drawn) and recomputes the FROC - what another test set of the same
  size would move. Two models are compared on the same resamples (paired).

Pure numpy and the standard library, like :mod:`.froc`.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, NamedTuple, Sequence, Tuple

import numpy as np

from .froc import MEAN_SENS_FPS, compute_froc

__all__ = [
    "t_quantile",
    "PairedInterval",
    "paired_interval",
    "bootstrap_mean_sensitivity",
    "percentile_interval",
]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast only below the mean; use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"df must be positive, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):  # bisection: the CDF is monotone, 200 halvings reach float precision
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class PairedInterval(NamedTuple):
    """Mean of the paired differences a - b, their sample std (ddof 1), count and interval."""

    mean: float
    std: float
    n: int
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def paired_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> PairedInterval:
    """Student-t interval of the mean of ``a[i] - b[i]`` (e.g. two models' metric on seed i)."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(
            f"paired values must be two 1-D sequences of one length, got shapes "
            f"{a_arr.shape} and {b_arr.shape}"
        )
    if len(a_arr) < 2:
        raise ValueError(f"an interval needs at least 2 pairs, got {len(a_arr)}")
    if not (np.isfinite(a_arr).all() and np.isfinite(b_arr).all()):
        raise ValueError("paired values must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    d = a_arr - b_arr
    n = len(d)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return PairedInterval(mean, std, n, mean - half, mean + half)


def bootstrap_mean_sensitivity(
    gt_boxes: Sequence[np.ndarray],
    patients: Sequence[int],
    predictions: Mapping[str, Tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    *,
    fps: Sequence[float] = MEAN_SENS_FPS,
    num_samples: int = 1000,
    seed: int = 0,
    criterion: str = "iou",
    convention: str = "continuous",
) -> Dict[str, np.ndarray]:
    """Mean sensitivity over ``fps`` of each model on ``num_samples`` resamples of the patients.

    Args:
        gt_boxes: per image, the lesions (n, 4) XYXY.
        patients: per image, its patient; the resampling unit.
        predictions: model name -> (per-image boxes, per-image scores), images in the order of
            ``gt_boxes``. Every model sees the same resamples, so differences are paired.

    Returns:
        model name -> (num_samples,) array of mean sensitivities in [0, 1].
    """
    n_img = len(gt_boxes)
    if len(patients) != n_img:
        raise ValueError(f"{len(patients)} patients for {n_img} images")
    for name, (boxes, scores) in predictions.items():
        if len(boxes) != n_img or len(scores) != n_img:
            raise ValueError(
                f"model {name!r}: {len(boxes)} box and {len(scores)} score lists for {n_img} images"
            )
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    ids, image_patient = np.unique(np.asarray(patients), return_inverse=True)
    images_of = [np.flatnonzero(image_patient == k) for k in range(len(ids))]
    rng = np.random.default_rng(seed)
    out = {name: np.empty(num_samples) for name in predictions}
    for s in range(num_samples):
        drawn = rng.integers(0, len(ids), size=len(ids))
        images = np.concatenate([images_of[k] for k in drawn])
        gt = [gt_boxes[i] for i in images]
        for name, (boxes, scores) in predictions.items():
            res = compute_froc(
                [boxes[i] for i in images],
                [scores[i] for i in images],
                gt,
                fps=fps,
                criterion=criterion,
                convention=convention,
            )
            out[name][s] = float(np.mean([res["sensitivity"][f] for f in fps]))
    return out


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> Tuple[float, float]:
    """The central ``confidence`` interval of bootstrap ``samples`` (percentile method)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(np.asarray(samples, dtype=np.float64), [tail, 100.0 - tail])
    return float(low), float(high)
