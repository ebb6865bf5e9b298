"""elixir_d2.boxes.box_overlap on boxes whose overlaps are worked out by hand."""

import numpy as np
import pytest

from elixir_d2.boxes import box_overlap


def test_every_pair_iou_by_hand():
    a = np.array([[0, 0, 10, 10]], dtype=np.float64)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float64)
    # overlap 5 x 10 = 50, union 150
    np.testing.assert_allclose(box_overlap(a[:, None], b[None]), [[50 / 150, 0.0, 1.0]])


def test_row_aligned_iou_and_iobb_by_hand():
    det = np.array([[0, 0, 10, 10], [0, 0, 4, 4], [3, 3, 3, 8]], dtype=np.float64)
    gt = np.array([[5, 0, 15, 10], [0, 0, 8, 8], [0, 0, 10, 10]], dtype=np.float64)
    # IoU: 50 / 150; 16 / 64 (det inside gt); a zero-width det overlaps nothing.
    np.testing.assert_allclose(box_overlap(det, gt, "iou"), [50 / 150, 16 / 64, 0.0])
    # IoBB, over the det's own area: 50 / 100; 16 / 16; the zero-area det gives 0, not NaN.
    np.testing.assert_allclose(box_overlap(det, gt, "iobb"), [0.5, 1.0, 0.0])


def test_unknown_criterion():
    with pytest.raises(ValueError, match="criterion must be one of"):
        box_overlap(np.zeros((1, 4)), np.zeros((1, 4)), "giou")


def test_plus_one_pixel_counts_by_hand():
    # Inclusive pixel counts: a box [x1, x2] spans x2 - x1 + 1 pixels, so does an intersection.
    det = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [3, 3, 3, 8]], dtype=np.float64)
    gt = np.array([[5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 10, 10]], dtype=np.float64)
    # 1: intersection 6 x 11 = 66, areas 11 x 11 = 121 each, union 176.
    # 2: boxes sharing the edge x = 10 intersect in one column: 1 x 11 = 11, union 231.
    # 3: a zero-width det is one pixel wide: 1 x 6 = 6 pixels, all inside the lesion.
    np.testing.assert_allclose(
        box_overlap(det, gt, "iou", plus_one=True), [66 / 176, 11 / 231, 6 / 121]
    )
    np.testing.assert_allclose(
        box_overlap(det, gt, "iobb", plus_one=True), [66 / 121, 11 / 121, 1.0]
    )
    # Continuous coordinates on the same pairs: 50 / 150 and 0 (a shared edge has no area).
    np.testing.assert_allclose(box_overlap(det, gt, "iou"), [50 / 150, 0.0, 0.0])
