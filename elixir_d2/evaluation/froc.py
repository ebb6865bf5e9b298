"""FROC (sensitivity at false positives per image) for lesion detection (docs/design.md,
Evaluation protocol).

Pure numpy: no detectron2 or torch import, so the protocol can be checked on its own.

Protocol (every image's detections and lesions at once):

* All detections of all images are ranked by score, descending; the sort is stable, so ties keep
  the input order (image order, then the order inside an image).
* Walking down the ranking, a detection whose best overlap with the ground truths of its image is
  below ``threshold`` is a false positive (FP); an image without ground truth makes every one of
  its detections an FP. Otherwise every ground truth of that image with overlap >= ``threshold``
  that is not yet hit becomes hit (one box may hit several lesions); a detection that only
  overlaps already-hit lesions is neither a hit nor an FP.
* Curve: the point (0, sensitivity before the first FP), then for each number k of FPs the point
  (k / num_images, hits / num_gt). The curve is recorded after every detection and, where several
  points share an FP value, the highest sensitivity is kept: the point for k FPs therefore holds
  every hit ranked before the (k+1)-th FP, i.e. the sensitivity at the loosest score threshold
  that still gives k FPs (the usual FROC operating point, and the value MULAN's ``sens_at_FP``
  reads at k FPs; 3DCE's generally reads the hits before the k-th FP there).
* ``num_images`` is the number of images passed, images without ground truth included.
* No ground truth at all: every sensitivity is 0.0 (a zero result, not an error). No image at
  all: the curve is the single point (0, 0) and every sensitivity is 0.0.

Two conventions (``convention``; docs/evaluation.md, FROC conventions) differ in two places only:

* ``"continuous"`` (default): box areas in continuous coordinates, (x2 - x1) * (y2 - y1); the
  sensitivity at f FPs per image is ``np.interp(f, fp_per_image, sens_curve)``, linear between
  the curve's points; beyond its last point, the last sensitivity.
* ``"deeplesion"``: what the DeepLesion authors' code (CADLab: 3DCE's
  ``rcnn/utils/evaluation.py``, MULAN's ``DeepLesion/detection_eval.py``) computes. Overlaps count
  pixels inclusively, (x2 - x1 + 1) * (y2 - y1 + 1), the intersection too (:mod:`..boxes`; their
  code has IoU only, the same count is applied to IoBB). The sensitivity at f is MULAN's reading:
  a step, the curve's point for floor(f * num_images) FPs (the hits ranked before the next FP);
  from the curve's last point on, its last sensitivity. Where their code raises or gives NaN (f
  below the first FP value it recorded, no detection, no lesion) this one gives the step's value
  or 0.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..boxes import OVERLAP_CRITERIA as CRITERIA
from ..boxes import box_overlap

PAPER_FPS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
# FP points whose mean sensitivity the lesion-detection literature reports (3DCE, ElixirNet).
MEAN_SENS_FPS = (0.5, 1.0, 2.0, 4.0)
# How boxes are measured and the curve is read (module docstring).
CONVENTIONS = ("continuous", "deeplesion")

__all__ = [
    "compute_froc",
    "sensitivity_at",
    "PAPER_FPS",
    "MEAN_SENS_FPS",
    "CRITERIA",
    "CONVENTIONS",
    "check_convention",
]


def check_convention(convention: str, what: str = "convention") -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`, else a ValueError naming it as
    ``what`` (e.g. the config key it came from)."""
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise ValueError(f"{what} must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def _as_boxes(a, what: str, i: int) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}[{i}] is not numeric: {e}") from None
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what}[{i}] must have shape (n, 4) XYXY, got {arr.shape}")
    return arr


def _as_vector(a, what: str, i: int, n: int, dtype) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}[{i}] is not numeric: {e}") from None
    if arr.size == 0:
        arr = arr.reshape(0)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{what}[{i}] has shape {arr.shape}, expected ({n},): one per box of image {i}"
        )
    return arr


def _check_boxes(boxes: np.ndarray, offsets: np.ndarray, what: str) -> None:
    """Raise a ValueError naming the first image / box that is NaN, infinite or inverted."""
    bad = ~np.isfinite(boxes).all(axis=1)
    reason = "is not finite"
    if not bad.any():
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        reason = "is inverted (x2 < x1 or y2 < y1)"
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        img = int(np.searchsorted(offsets, row, side="right") - 1)
        raise ValueError(f"{what}[{img}][{row - offsets[img]}] = {boxes[row].tolist()} {reason}")


def _concat(arrays: Sequence[np.ndarray], width: Optional[int], dtype) -> np.ndarray:
    if arrays:
        return np.concatenate(arrays, axis=0)
    return np.zeros((0, width) if width else (0,), dtype=dtype)


class _FrocInputs(NamedTuple):
    """Validated inputs, every image's rows concatenated in image order."""

    fps: List[float]
    convention: str
    num_images: int
    det: np.ndarray  # (D, 4) float64
    scores: np.ndarray  # (D,) float64
    gt: np.ndarray  # (G, 4) float64
    n_det: np.ndarray  # (num_images,) int64: detections per image
    n_gt: np.ndarray  # (num_images,) int64: lesions per image
    gt_off: np.ndarray  # (num_images + 1,): image i's lesions are gt[gt_off[i]:gt_off[i + 1]]
    groups: Optional[np.ndarray]  # (G,) int64 group id per lesion, or None


def _check_froc_inputs(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    fps: Sequence[float],
    criterion: str,
    threshold: float,
    gt_groups: Optional[Sequence[np.ndarray]],
    convention: str,
) -> _FrocInputs:
    """:func:`compute_froc`'s arguments checked and concatenated; raises its ValueErrors, the
    first problem found (arguments, then per image, then per box) being the one reported."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    check_convention(convention)
    if not (np.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    fps = [float(f) for f in fps]
    if any(not np.isfinite(f) or f < 0 for f in fps):
        raise ValueError(f"fps must be finite and >= 0, got {fps}")
    n_img = len(gt_boxes)
    if len(pred_boxes) != n_img or len(pred_scores) != n_img:
        raise ValueError(
            f"one entry per image expected: pred_boxes has {len(pred_boxes)}, "
            f"pred_scores {len(pred_scores)}, gt_boxes {n_img}"
        )
    if gt_groups is not None and len(gt_groups) != n_img:
        raise ValueError(f"gt_groups has {len(gt_groups)} entries for {n_img} images")

    dets = [_as_boxes(b, "pred_boxes", i) for i, b in enumerate(pred_boxes)]
    scores = [
        _as_vector(s, "pred_scores", i, len(d), np.float64)
        for i, (s, d) in enumerate(zip(pred_scores, dets))
    ]
    gts = [_as_boxes(b, "gt_boxes", i) for i, b in enumerate(gt_boxes)]
    n_det = np.array([len(d) for d in dets], dtype=np.int64)
    n_gt = np.array([len(g) for g in gts], dtype=np.int64)
    det_off = np.concatenate([[0], np.cumsum(n_det)])
    gt_off = np.concatenate([[0], np.cumsum(n_gt)])
    det_all = _concat(dets, 4, np.float64)
    gt_all = _concat(gts, 4, np.float64)
    score_all = _concat(scores, None, np.float64)
    _check_boxes(det_all, det_off, "pred_boxes")
    _check_boxes(gt_all, gt_off, "gt_boxes")
    if np.isnan(score_all).any():
        row = int(np.flatnonzero(np.isnan(score_all))[0])
        img = int(np.searchsorted(det_off, row, side="right") - 1)
        raise ValueError(f"pred_scores[{img}][{row - det_off[img]}] is NaN")
    group_all = None
    if gt_groups is not None:
        group_all = _concat(
            [
                _as_vector(g, "gt_groups", i, len(b), np.int64)
                for i, (g, b) in enumerate(zip(gt_groups, gts))
            ],
            None,
            np.int64,
        )
    return _FrocInputs(
        fps, convention, n_img, det_all, score_all, gt_all, n_det, n_gt, gt_off, group_all
    )


def _match(
    inp: _FrocInputs, rank_of: np.ndarray, criterion: str, threshold: float
) -> Tuple[np.ndarray, np.ndarray]:
    """(is_fp per detection, hit_rank per lesion): the ranking position of the first detection
    that hits the lesion, or D where none does."""
    D, G = len(inp.det), len(inp.gt)
    # Every (detection, lesion of the same image) pair, grouped by detection.
    det_img = np.repeat(np.arange(inp.num_images, dtype=np.int64), inp.n_det)
    k_per_det = inp.n_gt[det_img] if D else np.zeros(0, dtype=np.int64)
    pair_start = np.concatenate([[0], np.cumsum(k_per_det)])
    P = int(pair_start[-1])
    pair_det = np.repeat(np.arange(D, dtype=np.int64), k_per_det)
    within = np.arange(P, dtype=np.int64) - pair_start[pair_det]  # lesion index in its image
    pair_gt = inp.gt_off[det_img][pair_det] + within
    overlap = box_overlap(
        inp.det[pair_det], inp.gt[pair_gt], criterion, plus_one=inp.convention == "deeplesion"
    )
    is_match = overlap >= threshold

    # FP: no lesion in the image, or best overlap below the threshold.
    is_fp = np.ones(D, dtype=bool)
    has_pairs = k_per_det > 0
    if P:
        best = np.maximum.reduceat(overlap, pair_start[:-1][has_pairs])
        is_fp[has_pairs] = best < threshold
    # A lesion is hit by the first-ranked detection overlapping it enough; whether that
    # detection also hit other lesions does not matter, hence no sequential loop is needed.
    hit_rank = np.full(G, D, dtype=np.int64)
    np.minimum.at(hit_rank, pair_gt[is_match], rank_of[pair_det[is_match]])
    return is_fp, hit_rank


def _sens_curve(hit_ranks: np.ndarray, num_gt: int, fp_ranks: np.ndarray) -> np.ndarray:
    """Sensitivity at each curve point, over ``num_gt`` lesions of which those hit were hit at
    ranking positions ``hit_ranks``; ``fp_ranks``: the FPs' positions, increasing."""
    ranks = np.sort(hit_ranks)
    # Point k: lesions hit before the (k+1)-th FP; last point: all hits.
    hits = np.append(np.searchsorted(ranks, fp_ranks, side="left"), len(ranks))
    sens = hits / num_gt if num_gt else np.zeros(len(fp_ranks) + 1)
    return sens.astype(np.float64)


def _read_one(sens: np.ndarray, fp_axis: np.ndarray, f: float, convention: str) -> float:
    """Sensitivity at ``f`` FPs per image on the curve, by ``convention``'s rule."""
    if convention == "continuous":
        return float(np.interp(f, fp_axis, sens))
    # MULAN interpolates linearly over one point per detection. The point that follows the last
    # one at a given FP value is an FP, which adds no hit, so each segment between two FP values
    # is flat: the reading is the last point whose FP value is <= f. fp_axis holds the same
    # k / num_images floats as their fp_per_img, so f = k / num_images lands on the same side.
    k = int(np.searchsorted(fp_axis, f, side="right")) - 1  # >= 0: f >= 0 = fp_axis[0]
    return float(sens[k])


def _read(
    sens: np.ndarray, fp_axis: np.ndarray, fps: Sequence[float], convention: str
) -> Dict[float, float]:
    """Sensitivity at each of ``fps`` (module docstring's rule for ``convention``)."""
    return {f: _read_one(sens, fp_axis, f, convention) for f in fps}


def compute_froc(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    fps: Sequence[float] = PAPER_FPS,
    criterion: str = "iou",
    threshold: float = 0.5,
    *,
    gt_groups: Optional[Sequence[np.ndarray]] = None,
    convention: str = "continuous",
) -> Dict[str, object]:
    """FROC of detections against lesions, by the protocol of this module's docstring.

    Args:
        pred_boxes: per image, detections (n_i, 4) XYXY in pixels.
        pred_scores: per image, scores (n_i,).
        gt_boxes: per image, lesions (m_i, 4) XYXY in pixels; (0, 4) for an image without any.
        fps: FP-per-image points to read the sensitivity at.
        criterion: ``"iou"`` or ``"iobb"`` (intersection over the detected box's area).
        threshold: overlap at or above which a detection hits a lesion.
        gt_groups: optional, per image, an int group id per lesion (m_i,); negative ids belong to
            no group. For each group the sensitivity counts only the group's lesions while the FP
            axis stays the overall one (all FPs of all images), so a group's value at f is the
            fraction of its lesions found at the score threshold where the overall FP rate is f.
        convention: ``"continuous"`` or ``"deeplesion"`` (the DeepLesion authors' pixel counts
            and step reading of the curve; module docstring).

    Returns:
        dict with ``sensitivity`` {fp: float in [0, 1]}, ``fp_per_image`` and ``sens_curve`` (the
        curve, 1-D float arrays of equal length), ``num_images``, ``num_gt``, ``num_detections``,
        ``num_hits`` (lesions hit by some detection), ``num_fp``, ``max_fp_per_image`` (last
        curve point), ``criterion``, ``threshold``, ``convention``; with ``gt_groups`` also
        ``group_sensitivity`` {group: {fp: float}}, ``group_sens_curve`` {group: array} and
        ``group_num_gt`` {group: int}.

    Raises:
        ValueError: on mismatched lengths, wrong shapes, non-finite or inverted boxes, NaN
            scores, negative or non-finite FP points, an unknown criterion or convention or a
            threshold outside (0, 1].
    """
    inp = _check_froc_inputs(
        pred_boxes, pred_scores, gt_boxes, fps, criterion, threshold, gt_groups, convention
    )
    D, G = len(inp.det), len(inp.gt)
    # Stable descending rank of every detection; rank_of[d] is d's position in the ranking.
    order = np.argsort(-inp.scores, kind="stable")
    rank_of = np.empty(D, dtype=np.int64)
    rank_of[order] = np.arange(D, dtype=np.int64)
    is_fp, hit_rank = _match(inp, rank_of, criterion, threshold)
    is_hit = hit_rank < D

    fp_ranks = np.flatnonzero(is_fp[order])  # ranking positions of the FPs, increasing
    num_fp = len(fp_ranks)
    fp_axis = np.arange(num_fp + 1, dtype=np.float64) / max(inp.num_images, 1)
    sens_curve = _sens_curve(hit_rank[is_hit], G, fp_ranks)
    out: Dict[str, object] = {
        "sensitivity": _read(sens_curve, fp_axis, inp.fps, convention),
        "fp_per_image": fp_axis,
        "sens_curve": sens_curve,
        "num_images": inp.num_images,
        "num_gt": G,
        "num_detections": D,
        "num_hits": int(is_hit.sum()),
        "num_fp": num_fp,
        "max_fp_per_image": float(fp_axis[-1]),
        "criterion": criterion,
        "threshold": float(threshold),
        "convention": convention,
    }
    if inp.groups is not None:
        groups = sorted(int(g) for g in np.unique(inp.groups[inp.groups >= 0]))
        out["group_sensitivity"], out["group_sens_curve"], out["group_num_gt"] = {}, {}, {}
        for g in groups:
            in_g = inp.groups == g
            n_g = int(in_g.sum())
            sens_g = _sens_curve(hit_rank[is_hit & in_g], n_g, fp_ranks)
            out["group_sensitivity"][g] = _read(sens_g, fp_axis, inp.fps, convention)
            out["group_sens_curve"][g] = sens_g
            out["group_num_gt"][g] = n_g
    return out


def sensitivity_at(result: Mapping[str, object], fp: float) -> float:
    """Sensitivity of a :func:`compute_froc` result at ``fp`` FPs per image, read by the
    result's convention."""
    convention = check_convention(result.get("convention", "continuous"))
    return _read_one(
        np.asarray(result["sens_curve"]), np.asarray(result["fp_per_image"]), float(fp), convention
    )
