"""Intervals for comparisons (elixir_d2/evaluation/stats.py), against printed t tables and
resampling outcomes enumerated by hand."""

import math

import numpy as np
import pytest

from elixir_d2.evaluation.stats import (
    bootstrap_mean_sensitivity,
    paired_interval,
    percentile_interval,
    t_quantile,
)


# Two-sided 95% (p = 0.975) and one-sided 95% critical values from a printed Student-t table.
@pytest.mark.parametrize(
    "p, df, want",
    [
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 4, 2.776),
        (0.975, 5, 2.571),
        (0.975, 9, 2.262),
        (0.975, 30, 2.042),
        (0.95, 10, 1.812),
        (0.995, 3, 5.841),
        (0.975, 1e7, 1.960),
    ],
)
def test_t_quantile_matches_the_table(p, df, want):
    assert t_quantile(p, df) == pytest.approx(want, abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-want, abs=6e-4)


def test_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be"):
        t_quantile(0.9, 0)


def test_paired_interval_by_hand():
    # d = [2, 3, 2, 3, 3]: mean 2.6, sample variance 1.2 / 4 = 0.3, t(0.975, 4) = 2.7764
    res = paired_interval([3, 5, 4, 6, 7], [1, 2, 2, 3, 4])
    half = 2.7764 * math.sqrt(0.3) / math.sqrt(5)
    assert res.n == 5
    assert res.mean == pytest.approx(2.6)
    assert res.std == pytest.approx(math.sqrt(0.3))
    assert (res.low, res.high) == (
        pytest.approx(2.6 - half, abs=1e-4),
        pytest.approx(2.6 + half, abs=1e-4),
    )
    assert res.excludes_zero


def test_paired_interval_across_zero_and_errors():
    res = paired_interval([1.0, -1.0, 2.0], [0.0, 0.0, 0.0])  # mean 2/3, std sqrt(7/3)
    assert res.low < 0 < res.high and not res.excludes_zero
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([1.0], [0.0])
    with pytest.raises(ValueError, match="one length"):
        paired_interval([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        paired_interval([1.0, float("nan")], [0.0, 0.0])


def _box(x, y, s=10.0):
    return np.array([[x, y, x + s, y + s]])


NONE = np.zeros((0, 4))


def test_bootstrap_resamples_patients_not_images():
    # Patient 7 has two key slices, one lesion found and one missed; patient 9 one slice, found.
    # No false positives, so the sensitivity is the same at every FP rate. Drawing 2 patients:
    # {7, 7} -> 2/4, {9, 9} -> 2/2, {7, 9} either order -> 2/3. Resampling images instead could
    # draw the missed slice twice (0).
    gt = [_box(0, 0), _box(50, 50), _box(20, 20)]
    boxes = [_box(0, 0), NONE, _box(20, 20)]
    scores = [np.array([0.9]), np.zeros(0), np.array([0.8])]
    out = bootstrap_mean_sensitivity(
        gt, [7, 7, 9], {"m": (boxes, scores)}, num_samples=4000, seed=1
    )
    s = out["m"]
    assert s.shape == (4000,)
    assert set(np.round(s, 6)) <= {0.5, round(2 / 3, 6), 1.0}
    for value, prob in ((0.5, 0.25), (1.0, 0.25), (2 / 3, 0.5)):
        assert abs(np.mean(np.isclose(s, value)) - prob) < 0.03
    low, high = percentile_interval(s)
    assert (low, high) == (0.5, 1.0)


def test_bootstrap_pairs_models_on_the_same_resamples():
    gt = [_box(0, 0), _box(50, 50), _box(20, 20), _box(70, 70)]
    good = ([_box(0, 0), _box(50, 50), _box(20, 20), _box(70, 70)], [np.array([0.9])] * 4)
    half = (
        [_box(0, 0), NONE, _box(20, 20), NONE],
        [np.array([0.9]), np.zeros(0), np.array([0.9]), np.zeros(0)],
    )
    out = bootstrap_mean_sensitivity(
        gt, [1, 2, 3, 4], {"good": good, "same": good, "half": half}, num_samples=300, seed=0
    )
    assert np.array_equal(out["good"], out["same"])
    assert (out["good"] == 1.0).all()
    # "half" finds the lesions of patients 1 and 3 only: per resample, the share of draws of them
    assert set(np.round(out["half"], 6)) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert 0.4 < out["half"].mean() < 0.6


def test_bootstrap_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="patients"):
        bootstrap_mean_sensitivity([_box(0, 0)], [1, 2], {})
    with pytest.raises(ValueError, match="model 'm'"):
        bootstrap_mean_sensitivity([_box(0, 0)], [1], {"m": ([], [])})
