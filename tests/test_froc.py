"""compute_froc against hand-computed cases, a brute-force reference and properties
(docs/design.md, Evaluation protocol)."""
import importlib.util
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elixir_d2.evaluation.froc import compute_froc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def B(*boxes):
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def S(*scores):
    return np.array(scores, dtype=np.float64)


# ---------------------------------------------------------------- brute-force reference
def _overlap(d, g, criterion):
    iw = min(d[2], g[2]) - max(d[0], g[0])
    ih = min(d[3], g[3]) - max(d[1], g[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_d = (d[2] - d[0]) * (d[3] - d[1])
    denom = area_d + (g[2] - g[0]) * (g[3] - g[1]) - inter if criterion == "iou" else area_d
    return inter / denom if denom > 0 else 0.0


def reference_froc(pred_boxes, pred_scores, gt_boxes, fps, criterion="iou", threshold=0.5):
    """The protocol's words, one detection at a time, in plain Python."""
    n_img = len(gt_boxes)
    n_gt = sum(len(g) for g in gt_boxes)
    dets = [(float(s), i, j) for i in range(n_img) for j, s in enumerate(pred_scores[i])]
    dets = sorted(dets, key=lambda t: -t[0])  # Python's sort is stable
    hit = [[False] * len(g) for g in gt_boxes]
    n_hits = n_fp = 0
    points = [(0.0, 0)]  # (FP count, hits) after each detection, starting before any
    for _, i, j in dets:
        ov = [_overlap(pred_boxes[i][j], g, criterion) for g in gt_boxes[i]]
        if not ov or max(ov) < threshold:
            n_fp += 1
        else:
            for k, o in enumerate(ov):
                if o >= threshold and not hit[i][k]:
                    hit[i][k] = True
                    n_hits += 1
        points.append((n_fp, n_hits))
    best = {}
    for f, h in points:  # repeated FP values: keep the highest sensitivity
        best[f] = max(best.get(f, 0), h)
    xs = np.array(sorted(best), dtype=float) / max(n_img, 1)
    ys = (np.array([best[f] for f in sorted(best)], dtype=float) / n_gt if n_gt
          else np.zeros(len(best)))
    return {f: float(np.interp(f, xs, ys)) for f in fps}, xs, ys


# ---------------------------------------------------------------- hand-computed cases
def test_one_box_hits_two_lesions():
    # IoU 100/110 and 110/120 with two nested lesions: both are hit by the one box.
    r = compute_froc([B([0, 0, 10, 11])], [S(0.9)], [B([0, 0, 10, 10], [0, 0, 10, 12])],
                     fps=(0.5, 1))
    assert r["num_hits"] == 2 and r["num_fp"] == 0
    assert r["sensitivity"] == {0.5: 1.0, 1.0: 1.0}


def test_iobb_hits_two_lesions_where_iou_misses():
    # det [6,0,14,10] lies inside two side-by-side lesions: IoBB 1.0 with both, IoU 80/200 = 0.4.
    args = ([B([6, 0, 14, 10])], [S(0.9)], [B([0, 0, 20, 10], [10, 0, 30, 10])])
    iobb = compute_froc(*args, fps=(1,), criterion="iobb")
    iou = compute_froc(*args, fps=(1,), criterion="iou")
    assert iobb["num_hits"] == 2 and iobb["sensitivity"][1] == 1.0
    assert iou["num_fp"] == 1 and iou["sensitivity"][1] == 0.0
    np.testing.assert_array_equal(iou["fp_per_image"], [0.0, 1.0])
    np.testing.assert_array_equal(iou["sens_curve"], [0.0, 0.0])


def test_duplicate_hit_is_neither_hit_nor_fp():
    # image 0: hit a (0.9), duplicate on a (0.8), FP (0.6); image 1: hit b (0.7).
    r = compute_froc(
        [B([0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]), B([0, 0, 10, 10])],
        [S(0.9, 0.8, 0.6), S(0.7)],
        [B([0, 0, 10, 10]), B([0, 0, 10, 10])],
        fps=(0.25, 0.5),
    )
    assert r["num_fp"] == 1 and r["num_hits"] == 2
    # Were the duplicate an FP, the curve would be (0, .5), (.5, 1) and sens@0.25 = 0.75.
    np.testing.assert_array_equal(r["fp_per_image"], [0.0, 0.5])
    np.testing.assert_array_equal(r["sens_curve"], [1.0, 1.0])
    assert r["sensitivity"] == {0.25: 1.0, 0.5: 1.0}


def test_images_without_lesions_count_in_the_fp_denominator():
    # image 0: FP (0.9), hit (0.5); image 1 has no lesion: FP (0.7). 2 images -> FP step 0.5.
    r = compute_froc(
        [B([50, 50, 60, 60], [0, 0, 10, 10]), B([0, 0, 10, 10])],
        [S(0.9, 0.5), S(0.7)],
        [B([0, 0, 10, 10]), np.zeros((0, 4))],
        fps=(0.5, 0.75, 1),
    )
    assert r["num_images"] == 2
    np.testing.assert_array_equal(r["fp_per_image"], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(r["sens_curve"], [0.0, 0.0, 1.0])
    assert r["sensitivity"] == {0.5: 0.0, 0.75: 0.5, 1.0: 1.0}


def test_score_ties_keep_input_order():
    fp_img = (B([50, 50, 60, 60]), S(0.5), B([0, 0, 10, 10]))
    hit_img = (B([0, 0, 10, 10]), S(0.5), B([0, 0, 10, 10]))
    for imgs, expected in (([fp_img, hit_img], 0.25), ([hit_img, fp_img], 0.5)):
        r = compute_froc(*[list(x) for x in zip(*imgs)], fps=(0.25,))
        # FP first: curve (0, 0), (.5, .5); hit first: (0, .5), (.5, .5).
        assert r["sensitivity"][0.25] == expected
    # Ties inside one image: the earlier detection is ranked first too.
    r = compute_froc([B([50, 50, 60, 60], [0, 0, 10, 10])], [S(0.5, 0.5)], [B([0, 0, 10, 10])],
                     fps=(0.5,))
    np.testing.assert_array_equal(r["sens_curve"], [0.0, 1.0])
    assert r["sensitivity"][0.5] == 0.5


def test_fp_point_beyond_the_curve_takes_the_last_sensitivity():
    r = compute_froc([B([50, 50, 60, 60], [0, 0, 10, 10])], [S(0.9, 0.8)],
                     [B([0, 0, 10, 10], [30, 30, 40, 40])])
    assert r["max_fp_per_image"] == 1.0
    assert r["sensitivity"][0.5] == 0.25  # halfway between (0, 0) and (1, 0.5)
    assert r["sensitivity"][8.0] == 0.5 and r["sensitivity"][1.0] == 0.5


def test_overlap_exactly_at_threshold_is_a_hit():
    r = compute_froc([B([0, 0, 10, 10])], [S(0.3)], [B([0, 0, 10, 20])], fps=(1,))  # IoU 100/200
    assert r["num_hits"] == 1 and r["sensitivity"][1] == 1.0
    r = compute_froc([B([0, 0, 10, 10])], [S(0.3)], [B([0, 0, 10, 20])], fps=(1,), threshold=0.51)
    assert r["num_fp"] == 1 and r["sensitivity"][1] == 0.0


def test_zero_results():
    r = compute_froc([], [], [])
    assert r["num_images"] == 0 and all(v == 0.0 for v in r["sensitivity"].values())
    np.testing.assert_array_equal(r["fp_per_image"], [0.0])
    r = compute_froc([B([0, 0, 1, 1])], [S(0.5)], [np.zeros((0, 4))], fps=(1,))  # no lesion at all
    assert r["sensitivity"] == {1.0: 0.0} and r["num_fp"] == 1
    r = compute_froc([np.zeros((0, 4)), []], [np.zeros(0), []], [B([0, 0, 1, 1]), []], fps=(1,))
    assert r["sensitivity"] == {1.0: 0.0} and r["num_gt"] == 1 and r["num_detections"] == 0


def test_groups_count_their_lesions_on_the_overall_fp_axis():
    # small lesion hit before the first FP, large one only after it; one image.
    r = compute_froc(
        [B([0, 0, 4, 4], [90, 90, 99, 99], [20, 20, 60, 60])],
        [S(0.9, 0.8, 0.7)],
        [B([0, 0, 4, 4], [20, 20, 60, 60])],
        fps=(0.5, 1),
        gt_groups=[np.array([0, 2])],
    )
    assert r["group_num_gt"] == {0: 1, 2: 1}
    assert r["group_sensitivity"][0] == {0.5: 1.0, 1.0: 1.0}
    assert r["group_sensitivity"][2] == {0.5: 0.5, 1.0: 1.0}
    assert r["sensitivity"] == {0.5: 0.75, 1.0: 1.0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pred_boxes=[B([0, 0, np.nan, 1])]), r"pred_boxes\[0\]\[0\].*not finite"),
        (dict(gt_boxes=[B([0, 0, 1, 1], [5, 5, 2, 9])]), r"gt_boxes\[0\]\[1\].*inverted"),
        (dict(pred_scores=[S(0.1, 0.2)]), r"pred_scores\[0\]"),
        (dict(pred_scores=[S(np.nan)]), r"pred_scores\[0\]\[0\] is NaN"),
        (dict(pred_boxes=[np.zeros((1, 5))]), r"pred_boxes\[0\].*shape"),
        (dict(pred_boxes=[B([0, 0, 1, 1])] * 2), r"one entry per image"),
        (dict(criterion="dice"), r"criterion"),
        (dict(threshold=0.0), r"threshold"),
        (dict(fps=(-1,)), r"fps"),
        (dict(gt_groups=[np.array([0, 1])]), r"gt_groups\[0\]"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    args = dict(pred_boxes=[B([0, 0, 1, 1])], pred_scores=[S(0.5)], gt_boxes=[B([0, 0, 1, 1])])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_froc(**args)


# ---------------------------------------------------------------- properties
_coord = st.integers(0, 20)
_box = st.tuples(_coord, _coord, st.integers(0, 12), st.integers(0, 12)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)
_gt_box = st.tuples(_coord, _coord, st.integers(1, 12), st.integers(1, 12)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)
_image = st.tuples(
    st.lists(st.tuples(_box, st.integers(0, 5)), max_size=6),  # few score values: many ties
    st.lists(_gt_box, max_size=3),
)
_dataset = st.lists(_image, max_size=6)
FPS = (0.0, 0.125, 0.5, 1, 2, 3, 4, 6, 8, 20)


def _arrays(dataset):
    boxes = [B(*[d[0] for d in dets]) for dets, _ in dataset]
    scores = [S(*[d[1] for d in dets]) for dets, _ in dataset]
    gts = [B(*g) for _, g in dataset]
    return boxes, scores, gts


@settings(max_examples=150, deadline=None)
@given(_dataset, st.sampled_from(["iou", "iobb"]), st.sampled_from([0.3, 0.5, 0.7]))
def test_matches_brute_force_reference(dataset, criterion, threshold):
    boxes, scores, gts = _arrays(dataset)
    r = compute_froc(boxes, scores, gts, fps=FPS, criterion=criterion, threshold=threshold)
    ref, xs, ys = reference_froc(boxes, scores, gts, FPS, criterion, threshold)
    np.testing.assert_allclose(r["fp_per_image"], xs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r["sens_curve"], ys, rtol=0, atol=1e-12)
    for f in FPS:
        assert math.isclose(r["sensitivity"][f], ref[f], abs_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(_dataset, st.sampled_from(["iou", "iobb"]))
def test_sensitivity_in_unit_interval_and_non_decreasing(dataset, criterion):
    r = compute_froc(*_arrays(dataset), fps=FPS, criterion=criterion)
    values = [r["sensitivity"][f] for f in FPS]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))


@settings(max_examples=100, deadline=None)
@given(_dataset, st.randoms(use_true_random=False))
def test_invariant_to_image_order(dataset, rnd):
    boxes, scores, gts = _arrays(dataset)
    # Distinct scores (ties are broken by input order by design, so they would legitimately move).
    total = sum(len(s) for s in scores)
    distinct = rnd.sample(range(10 * total + 1), total)
    it = iter(distinct)
    scores = [S(*[next(it) for _ in s]) for s in scores]
    perm = list(range(len(gts)))
    rnd.shuffle(perm)
    for criterion in ("iou", "iobb"):
        a = compute_froc(boxes, scores, gts, fps=FPS, criterion=criterion)
        b = compute_froc([boxes[i] for i in perm], [scores[i] for i in perm],
                         [gts[i] for i in perm], fps=FPS, criterion=criterion)
        assert a["sensitivity"] == b["sensitivity"]
        np.testing.assert_array_equal(a["sens_curve"], b["sens_curve"])


@settings(max_examples=100, deadline=None)
@given(_dataset)
def test_iobb_at_least_iou(dataset):
    args = _arrays(dataset)
    iou = compute_froc(*args, fps=FPS, criterion="iou")["sensitivity"]
    iobb = compute_froc(*args, fps=FPS, criterion="iobb")["sensitivity"]
    assert all(iobb[f] >= iou[f] - 1e-12 for f in FPS)


@settings(max_examples=60, deadline=None)
@given(_dataset.flatmap(lambda d: st.tuples(st.just(d), st.lists(
    st.integers(0, 2), min_size=sum(len(g) for _, g in d), max_size=sum(len(g) for _, g in d)))))
def test_groups_add_up_to_the_overall_sensitivity(data):
    dataset, flat_groups = data
    boxes, scores, gts = _arrays(dataset)
    it = iter(flat_groups)
    groups = [np.array([next(it) for _ in g], dtype=np.int64) for g in gts]
    r = compute_froc(boxes, scores, gts, fps=FPS, gt_groups=groups)
    for f in FPS:
        total = sum(r["group_num_gt"][g] * r["group_sensitivity"][g][f] for g in r["group_num_gt"])
        assert math.isclose(total, r["num_gt"] * r["sensitivity"][f], abs_tol=1e-9)


def test_speed_benchmark_script_runs(capsys):
    # The real timing (5,000 x 100, <= 2 s) is the benchmark's job; here only that it works.
    spec = importlib.util.spec_from_file_location(
        "froc_speed", os.path.join(REPO, "projects", "benchmarks", "froc_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    medians = module.main(["--images", "200", "--runs", "1"])
    assert set(medians) == {"iou", "iobb"}
    assert "froc_speed: 200 images x 100 detections" in capsys.readouterr().out
