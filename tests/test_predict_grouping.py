"""3-D grouping of per-slice detections on constructed boxes (values worked out by hand)."""

import numpy as np
import pytest

from elixir_d2.inference.grouping import group_detections


def test_two_lesions_across_slices():
    # Lesion A on slices 3, 4, 5 (drifting right by 2 px per slice); lesion B on slices 4, 5 far
    # away; a lone detection on slice 9 at A's position (a gap of 4 slices: not linked).
    slices = [3, 4, 5, 4, 5, 9]
    boxes = np.array(
        [
            # A: IoU(3,4) = 360/440, IoU(4,5) = ...
            [10, 10, 30, 30],
            [12, 10, 32, 30],
            [14, 10, 34, 36],
            [60, 60, 70, 70],
            [61, 60, 71, 70],  # B
            [10, 10, 30, 30],  # C
        ],
        dtype=float,
    )
    scores = [0.6, 0.9, 0.5, 0.7, 0.4, 0.8]
    found = group_detections(slices, boxes, scores, spacing=(0.5, 0.8), slice_interval=2.5)
    assert [f.members for f in found] == [[0, 1, 2], [5], [3, 4]]  # best score first: 0.9, 0.8, 0.7
    a, c, b = found
    assert (a.slice_first, a.slice_last, a.num_slices) == (3, 5, 3)
    assert a.extent_mm == pytest.approx(3 * 2.5)
    # Longest side in mm: slice 5 box is 20 px wide (10 mm) and 26 px high (20.8 mm).
    assert a.largest_diameter_mm == pytest.approx(26 * 0.8)
    # Short axis: the other side of that same slice-5 box (RECIST: both axes on one slice), not
    # the shortest side over the slices (slice 3's and 4's 20 px height, 16 mm).
    assert a.short_axis_mm == pytest.approx(20 * 0.5)
    assert (a.best_score, a.best_slice, a.best_box) == (0.9, 4, [12, 10, 32, 30])
    assert (b.slice_first, b.slice_last, b.largest_diameter_mm) == (4, 5, pytest.approx(8.0))
    assert (c.slice_first, c.slice_last, c.extent_mm) == (9, 9, pytest.approx(2.5))
    assert [f.finding_id for f in found] == [0, 1, 2]


def test_iou_threshold_and_gap():
    # IoU of the two boxes = 50 / 150 = 0.333
    slices, boxes, scores = [0, 2], [[0, 0, 10, 10], [5, 0, 15, 10]], [0.5, 0.6]
    assert len(group_detections(slices, boxes, scores, (1, 1), 1.0)) == 2  # slices 2 apart
    assert len(group_detections(slices, boxes, scores, (1, 1), 1.0, max_gap=2)) == 1
    assert (
        len(group_detections(slices, boxes, scores, (1, 1), 1.0, iou_thresh=0.34, max_gap=2)) == 2
    )


def test_chain_links_boxes_that_do_not_overlap_directly():
    # 0-1 and 1-2 overlap (IoU 1/3 each); 0 and 2 are disjoint but one finding through slice 1.
    slices = [0, 1, 2]
    boxes = [[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10]]
    found = group_detections(slices, boxes, [0.1, 0.2, 0.3], (1, 1), 1.0)
    assert len(found) == 1 and found[0].members == [0, 1, 2] and found[0].best_slice == 2


def test_same_slice_detections_stay_apart_without_a_link():
    found = group_detections([1, 1], [[0, 0, 10, 10], [2, 2, 12, 12]], [0.5, 0.4], (1, 1), 1.0)
    assert [f.members for f in found] == [[0], [1]]


def test_empty_and_bad_input():
    assert group_detections([], np.zeros((0, 4)), [], (1, 1), 1.0) == []
    with pytest.raises(ValueError, match="lengths differ"):
        group_detections([0, 1], [[0, 0, 1, 1]], [0.5, 0.5], (1, 1), 1.0)
    with pytest.raises(ValueError, match="max_gap"):
        group_detections([0], [[0, 0, 1, 1]], [0.5], (1, 1), 1.0, max_gap=0)
