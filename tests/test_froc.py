"""compute_froc against hand-computed cases, a brute-force reference and properties
(docs/design.md, Evaluation protocol)."""

import importlib.util
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elixir_d2.evaluation.froc import compute_froc, sensitivity_at

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
    ys = (
        np.array([best[f] for f in sorted(best)], dtype=float) / n_gt
        if n_gt
        else np.zeros(len(best))
    )
    return {f: float(np.interp(f, xs, ys)) for f in fps}, xs, ys


# ---------------------------------------------------------------- hand-computed cases
def test_one_box_hits_two_lesions():
    # IoU 100/110 and 110/120 with two nested lesions: both are hit by the one box.
    r = compute_froc(
        [B([0, 0, 10, 11])], [S(0.9)], [B([0, 0, 10, 10], [0, 0, 10, 12])], fps=(0.5, 1)
    )
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
    r = compute_froc(
        [B([50, 50, 60, 60], [0, 0, 10, 10])], [S(0.5, 0.5)], [B([0, 0, 10, 10])], fps=(0.5,)
    )
    np.testing.assert_array_equal(r["sens_curve"], [0.0, 1.0])
    assert r["sensitivity"][0.5] == 0.5


def test_fp_point_beyond_the_curve_takes_the_last_sensitivity():
    r = compute_froc(
        [B([50, 50, 60, 60], [0, 0, 10, 10])], [S(0.9, 0.8)], [B([0, 0, 10, 10], [30, 30, 40, 40])]
    )
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
        (dict(convention="3dce"), r"convention must be one of .*'3dce'"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    args = dict(pred_boxes=[B([0, 0, 1, 1])], pred_scores=[S(0.5)], gt_boxes=[B([0, 0, 1, 1])])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_froc(**args)


# ---------------------------------------------------------------- conventions
@pytest.mark.parametrize("criterion", ["iou", "iobb"])
def test_plus_one_pixel_areas_turn_a_miss_into_a_hit(criterion):
    # Lesion [0,0,10,10], detection [0,0,10,21] (it contains the lesion, so IoU = IoBB).
    # continuous: intersection 10 x 10 = 100, detection 10 x 21 = 210 = union: 100/210 < 0.5.
    # deeplesion: 11 x 11 = 121 pixels, detection 11 x 22 = 242 = union: 121/242 = 0.5, a hit.
    args = ([B([0, 0, 10, 21])], [S(0.9)], [B([0, 0, 10, 10])])
    cont = compute_froc(*args, fps=(1,), criterion=criterion)
    dl = compute_froc(*args, fps=(1,), criterion=criterion, convention="deeplesion")
    assert (cont["num_hits"], cont["num_fp"], cont["sensitivity"]) == (0, 1, {1.0: 0.0})
    assert (dl["num_hits"], dl["num_fp"], dl["sensitivity"]) == (1, 0, {1.0: 1.0})
    assert cont["convention"] == "continuous" and dl["convention"] == "deeplesion"


def _three_images_fp_then_hit():
    """3 images, one lesion each; ranking FP .9, hit .8, FP .7, hit .6, FP .5, hit .4."""
    lesion, far = [0, 0, 10, 10], [50, 50, 60, 60]
    return ([B(far, lesion)] * 3, [S(0.9, 0.8), S(0.7, 0.6), S(0.5, 0.4)], [B(lesion)] * 3)


def test_step_reading_differs_from_interpolation_at_half_fp_with_odd_images():
    # Curve, 3 images: (0, 0), (1/3, 1/3), (2/3, 2/3), (1, 1) (point k: hits before FP k+1).
    # continuous, linear between points: f=0.25 -> 0.25; f=0.5 -> midway between 1/3 and 2/3 = 0.5.
    # deeplesion, point floor(3f): f=0.25 -> point 0 = 0; f=0.5 -> point 1 = 1/3. By hand on
    # MULAN's per-detection curve (FP/img, sens): (1/3, 0) (1/3, 1/3) (2/3, 1/3) (2/3, 2/3) (1, 2/3)
    # (1, 1): at 0.5 the last point at or below is (1/3, 1/3) and the next (2/3, 1/3) is level,
    # so 1/3; at f=1, the curve's end, its last value 1 (at 0.25 their interp1d raises: below
    # its first FP value 1/3). Past the end (f=2) both give the last sensitivity, 1.
    fps = (0.0, 0.25, 0.5, 1.0, 2.0)
    cont = compute_froc(*_three_images_fp_then_hit(), fps=fps)
    dl = compute_froc(*_three_images_fp_then_hit(), fps=fps, convention="deeplesion")
    np.testing.assert_allclose(dl["sens_curve"], [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(dl["sens_curve"], cont["sens_curve"])  # same counting
    assert cont["sensitivity"] == pytest.approx(dict(zip(fps, [0, 0.25, 0.5, 1, 1])))
    assert dl["sensitivity"] == pytest.approx(dict(zip(fps, [0, 0, 1 / 3, 1, 1])))
    assert sensitivity_at(dl, 0.5) == pytest.approx(1 / 3)
    assert sensitivity_at(cont, 0.5) == pytest.approx(0.5)


def test_step_reading_at_exact_fp_counts_and_zero():
    # 2 images: hit .95 (image 0's lesion), FP .9, hit .8 (image 1's), FP .7. Curve (0, .5),
    # (.5, 1), (1, 1). At f = 0 and f = 0.5 = 1 FP / 2 images the step takes the point itself:
    # MULAN's per-detection curve (0, .5) (.5, .5) (.5, 1) (1, 1) has, at f = 0.5, (.5, 1) as the
    # last point at or below f. At f = 0.25 the step stays at point 0: 0.5 (continuous: 0.75).
    lesion, far = [0, 0, 10, 10], [50, 50, 60, 60]
    args = ([B(lesion, far), B(lesion, far)], [S(0.95, 0.9), S(0.8, 0.7)], [B(lesion)] * 2)
    dl = compute_froc(*args, fps=(0.0, 0.25, 0.5), convention="deeplesion")
    assert dl["sensitivity"] == {0.0: 0.5, 0.25: 0.5, 0.5: 1.0}
    assert compute_froc(*args, fps=(0.25,))["sensitivity"] == {0.25: 0.75}


# The DeepLesion authors' algorithm, from a reading of CADLab's 3DCE rcnn/utils/evaluation.py and
# MULAN's DeepLesion/detection_eval.py, one detection at a time, sharing nothing with froc.py.
def _authors_overlap(d, g, criterion):
    iw = max(min(d[2], g[2]) - max(d[0], g[0]) + 1.0, 0.0)
    ih = max(min(d[3], g[3]) - max(d[1], g[1]) + 1.0, 0.0)
    inter = iw * ih
    area_d = (d[2] - d[0] + 1.0) * (d[3] - d[1] + 1.0)
    if criterion == "iobb":  # not in their code: the same pixel count over the detection's area
        return inter / area_d
    return inter / (area_d + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - inter)


def authors_froc(pred_boxes, pred_scores, gt_boxes, criterion, threshold=0.5):
    """Their FROC(): one curve point (FPs / images, hits / lesions) after every detection."""
    n_img = len(pred_boxes)
    dets = sorted(
        (
            (float(s), i, list(b))
            for i in range(n_img)
            for b, s in zip(pred_boxes[i], pred_scores[i])
        ),
        key=lambda t: -t[0],
    )
    hit = [[False] * len(g) for g in gt_boxes]
    n_hits = n_miss = 0
    tps, fps = [], []
    for _, i, box in dets:
        ov = [_authors_overlap(box, g, criterion) for g in gt_boxes[i]]
        if len(ov) == 0 or max(ov) < threshold:
            n_miss += 1
        else:
            for j, o in enumerate(ov):
                if o >= threshold and not hit[i][j]:
                    hit[i][j] = True
                    n_hits += 1
        tps.append(n_hits)
        fps.append(n_miss)
    n_gt = sum(len(g) for g in gt_boxes)
    return [t / n_gt for t in tps], [f / n_img for f in fps]


def mulan_sens_at_fp(sens, fp_per_img, avg_fp):
    """MULAN's sens_at_FP: past the last FP value, the last sensitivity; otherwise scipy's
    interp1d(fp_per_img, sens) (SciPy >= 1.6 keeps equal x values in order, and its linear path
    is np.interp, which takes the last of equal x values at or below avg_fp, then the line to
    the next point); below the first x value interp1d raises."""
    if avg_fp > fp_per_img[-1]:
        return sens[-1]
    if avg_fp < fp_per_img[0]:
        raise ValueError(f"{avg_fp} is below the interpolation range")
    j = 0
    for k, x in enumerate(fp_per_img):
        if x <= avg_fp:
            j = k
    if j == len(fp_per_img) - 1 or fp_per_img[j] == avg_fp:
        return sens[j]
    x0, x1, y0, y1 = fp_per_img[j], fp_per_img[j + 1], sens[j], sens[j + 1]
    return y0 + (y1 - y0) * (avg_fp - x0) / (x1 - x0)


def _random_case(seed, n_img=201):
    """Small lesions (+1 pixel matters), detections jittered around them or anywhere, distinct
    scores; some images without lesions. 201 images: 0.5 FPs/image is between two FP counts."""
    rng = np.random.default_rng(seed)
    boxes, scores, gts = [], [], []
    for _ in range(n_img):
        gt = []
        for _ in range(rng.integers(0, 3)):
            x, y = rng.integers(0, 200, size=2)
            w, h = rng.integers(2, 25, size=2)
            gt.append([x, y, x + w, y + h])
        dets = []
        for _ in range(rng.integers(0, 10)):
            if gt and rng.random() < 0.5:
                g = np.array(gt[rng.integers(len(gt))], dtype=float)
                d = g + rng.normal(0, 0.15 * (g[2] - g[0] + g[3] - g[1]) / 2, size=4)
            else:
                x, y = rng.uniform(0, 200, size=2)
                d = np.array([x, y, x + rng.uniform(2, 25), y + rng.uniform(2, 25)])
            d = np.round(d, 1)
            dets.append([min(d[0], d[2]), min(d[1], d[3]), max(d[0], d[2]), max(d[1], d[3])])
        gts.append(B(*gt))
        boxes.append(B(*dets))
    total = sum(len(b) for b in boxes)
    distinct = iter(rng.permutation(total) / total)
    scores = [S(*[next(distinct) for _ in b]) for b in boxes]
    return boxes, scores, gts


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("criterion", ["iou", "iobb"])
def test_deeplesion_mode_equals_the_authors_algorithm(seed, criterion):
    fps = (0.125, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 100.0)
    boxes, scores, gts = _random_case(seed)
    sens, fp_per_img = authors_froc(boxes, scores, gts, criterion)
    assert fp_per_img[0] <= fps[0] and fp_per_img[-1] < fps[-1]  # in range, and past the end
    dl = compute_froc(boxes, scores, gts, fps=fps, criterion=criterion, convention="deeplesion")
    for f in fps:
        assert dl["sensitivity"][f] == pytest.approx(
            mulan_sens_at_fp(sens, fp_per_img, f), abs=1e-12
        ), f
    assert dl["num_hits"] == round(sens[-1] * dl["num_gt"])
    assert dl["num_fp"] == round(fp_per_img[-1] * len(gts))
    # The case tells the conventions apart (else the equality above would prove little).
    cont = compute_froc(boxes, scores, gts, fps=fps, criterion=criterion)
    assert cont["num_hits"] != dl["num_hits"]
    assert any(cont["sensitivity"][f] != dl["sensitivity"][f] for f in fps)


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
        b = compute_froc(
            [boxes[i] for i in perm],
            [scores[i] for i in perm],
            [gts[i] for i in perm],
            fps=FPS,
            criterion=criterion,
        )
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
@given(
    _dataset.flatmap(
        lambda d: st.tuples(
            st.just(d),
            st.lists(
                st.integers(0, 2),
                min_size=sum(len(g) for _, g in d),
                max_size=sum(len(g) for _, g in d),
            ),
        )
    )
)
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
        "froc_speed", os.path.join(REPO, "projects", "benchmarks", "froc_speed.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    medians = module.main(["--images", "200", "--runs", "1"])
    assert set(medians) == {"iou", "iobb"}
    assert "froc_speed: 200 images x 100 detections" in capsys.readouterr().out
