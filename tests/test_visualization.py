"""elixir_d2.visualization on constructed inputs: pixel colours, blends, edge choice, weights."""

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from elixir_d2.visualization import (
    DET_COLOR,
    GT_COLOR,
    draw_alpha_heatmap,
    draw_confidence_map,
    draw_detections,
    draw_relation_graph,
    plot_froc,
    window_for_display,
)


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_window_for_display():
    hu = np.array([[-500.0, -175.0, 50.0, 275.0, 900.0]])
    # (-175, 275) -> 0..255: 50 HU -> 225 / 450 * 255 = 127.5 -> 128
    np.testing.assert_array_equal(window_for_display(hu), [[0, 0, 128, 255, 255]])


def test_detections_and_ground_truth_colours(tmp_path):
    grey = np.full((60, 80), 90, np.uint8)
    det = [[10, 20, 30, 40]]  # continuous XYXY: columns 10..29, rows 20..39
    gt = [[50, 35, 70, 55]]
    out = draw_detections(
        grey, det, scores=[0.87], labels=["liver"], gt_boxes=gt, path=str(tmp_path / "o.png")
    )
    assert out.shape == (60, 80, 3)
    for x, y in [(10, 30), (29, 30), (20, 39)]:  # left, right, bottom edges of the detection
        assert tuple(out[y, x]) == DET_COLOR
    for x, y in [(50, 45), (69, 45), (60, 35), (60, 54)]:  # all four edges of the ground truth
        assert tuple(out[y, x]) == GT_COLOR
    assert tuple(out[30, 20]) == (90, 90, 90)  # inside the box: the slice
    assert tuple(out[30, 9]) == (90, 90, 90) and tuple(out[30, 30]) == (90, 90, 90)  # just outside
    # The score label is drawn above the box, in the detection colour.
    above = out[9:20, 10:40]
    assert (above == DET_COLOR).all(axis=-1).any()
    np.testing.assert_array_equal(_png(tmp_path / "o.png"), out)


def test_detection_drawn_over_ground_truth():
    out = draw_detections(np.zeros((20, 20), np.uint8), [[2, 2, 12, 12]], gt_boxes=[[2, 2, 12, 12]])
    assert tuple(out[7, 2]) == DET_COLOR


def test_draw_detections_rejects_hu():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(np.zeros((8, 8), np.float32), [[1, 1, 4, 4]])


def test_confidence_map_blend_and_truncation(tmp_path):
    grey = np.full((8, 8), 100, np.uint8)
    p = np.array([[0.9, 0.2], [0.6, 0.4]])  # each cell covers a 4 x 4 quadrant
    out = draw_confidence_map(grey, {"p3": p}, str(tmp_path / "c.png"), eps=0.5, alpha=0.4)
    jet = colormaps["jet"]
    expect_hot = np.round(0.6 * 100 + 0.4 * np.asarray(jet(0.9)[:3]) * 255)
    expect_mid = np.round(0.6 * 100 + 0.4 * np.asarray(jet(0.6)[:3]) * 255)
    # p = 0.4 <= eps: truncated, plain slice
    np.testing.assert_array_equal(out[6, 6], [100, 100, 100])
    np.testing.assert_array_equal(out[2, 6], [100, 100, 100])  # p = 0.2
    np.testing.assert_array_equal(out[5, 1], expect_mid)  # p = 0.6
    np.testing.assert_array_equal(out[3, 3], expect_hot)  # p = 0.9 (away from the level label)


def test_confidence_map_one_panel_per_level():
    grey = np.zeros((10, 12), np.uint8)
    out = draw_confidence_map(
        grey, {"p2": np.ones((4, 4)), "p3": np.zeros((2, 2)), "p4": np.ones((1, 1))}
    )
    assert out.shape == (10, 36, 3)
    with pytest.raises(ValueError, match="2-D"):
        draw_confidence_map(grey, np.ones((2, 2, 2)))


def test_relation_graph_edges_and_thickness(tmp_path):
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30], [20, 20, 30, 30]], float)
    e = np.array(
        [
            [0.10, 0.60, 0.20, 0.10],
            [0.20, 0.10, 0.30, 0.40],
            [0.30, 0.10, 0.50, 0.10],
            [0.05, 0.05, 0.10, 0.80],
        ]
    )
    # Symmetric weights (E + E^T) / 2: (0,1) 0.40, (0,2) 0.25, (0,3) 0.075, (1,2) 0.20, (1,3) 0.225,
    # (2,3) 0.10
    edges = draw_relation_graph(
        np.zeros((32, 32), np.uint8),
        boxes,
        e,
        str(tmp_path / "g.png"),
        max_edges=3,
        max_linewidth=4.0,
    )
    assert [(i, j) for i, j, _, _ in edges] == [(0, 1), (0, 2), (1, 3)]
    np.testing.assert_allclose([w for _, _, w, _ in edges], [0.40, 0.25, 0.225])
    np.testing.assert_allclose(
        [lw for _, _, _, lw in edges], [4.0, 4.0 * 0.25 / 0.40, 4.0 * 0.225 / 0.40]
    )
    assert _png(tmp_path / "g.png").shape[2] == 3


def test_relation_graph_keeps_top_scoring_nodes(tmp_path):
    boxes = np.array([[0, 0, 4, 4], [5, 5, 9, 9], [10, 10, 14, 14]], float)
    e = np.full((3, 3), 1 / 3)
    e[0, 2] = e[2, 0] = 0.9  # strongest edge, but node 0 scores lowest
    edges = draw_relation_graph(
        np.zeros((16, 16), np.uint8),
        boxes,
        e,
        str(tmp_path / "g.png"),
        scores=[0.1, 0.8, 0.9],
        max_nodes=2,
    )
    assert [(i, j) for i, j, _, _ in edges] == [(1, 2)]
    with pytest.raises(ValueError, match="3 x 3"):
        draw_relation_graph(np.zeros((16, 16), np.uint8), boxes, np.eye(2), str(tmp_path / "x.png"))


def test_alpha_heatmap_softmax_and_labels(tmp_path):
    ops = ["none", "skip_connect", "conv_1x1"]
    alpha = np.array([[0.0, 1.0, 2.0]] * 14)  # B = 4 branches: 2 + 3 + 4 + 5 edges
    weights = np.array([[0.2, 0.3, 0.5]] * 5)  # already a distribution: drawn as is
    drawn = draw_alpha_heatmap({"normal": alpha, "reduce": weights}, ops, str(tmp_path / "a.png"))
    z = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(drawn["normal"], np.tile(z / z.sum(), (14, 1)))
    np.testing.assert_allclose(drawn["reduce"], weights)
    assert _png(tmp_path / "a.png").ndim == 3
    with pytest.raises(
        ValueError, match=r"alphas\['normal'\] has shape \(14, 3\); expected \(num_edges, 2\)"
    ):
        draw_alpha_heatmap({"normal": alpha}, ops[:2], str(tmp_path / "b.png"))


def test_alpha_edge_labels():
    from elixir_d2.visualization import _edge_labels

    labels = _edge_labels(14)
    assert (
        labels[:5] == ["b0<-s0", "b0<-s1", "b1<-s0", "b1<-s1", "b1<-n0"] and labels[-1] == "b3<-n2"
    )
    assert _edge_labels(4) == ["e0", "e1", "e2", "e3"]  # not a block's edge count


def test_plot_froc_is_available_here(tmp_path):
    plot_froc(
        {"IoU": (np.array([0.0, 1.0, 2.0]), np.array([0.5, 0.7, 0.8]))}, str(tmp_path / "froc.png")
    )
    assert _png(tmp_path / "froc.png").shape[0] > 100
