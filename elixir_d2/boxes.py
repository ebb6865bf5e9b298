"""Overlap of XYXY boxes in numpy, for FROC matching (evaluation/froc.py) and for linking
detections across slices (inference/grouping.py).

Continuous coordinates by default: a box's area is (x2 - x1) * (y2 - y1). ``plus_one=True`` counts
pixels inclusively instead, as the DeepLesion authors' evaluation code does: widths and heights of
the boxes and of their intersection are (x2 - x1 + 1) and (y2 - y1 + 1).
"""

from __future__ import annotations

import numpy as np

__all__ = ["OVERLAP_CRITERIA", "box_overlap"]

OVERLAP_CRITERIA = ("iou", "iobb")


def box_overlap(
    a: np.ndarray, b: np.ndarray, criterion: str = "iou", *, plus_one: bool = False
) -> np.ndarray:
    """Overlap of the XYXY boxes ``a`` (..., 4) and ``b`` (..., 4), broadcast over the leading axes.

    Row-aligned pairs: ``a`` (P, 4) and ``b`` (P, 4) give (P,); every pair: ``a[:, None]`` and
    ``b[None]`` give (len(a), len(b)). ``iou``: intersection over union; ``iobb``: intersection over
    the area of the ``a`` box (the detection). ``plus_one``: inclusive pixel counts (module
    docstring), so boxes that share an edge already intersect. A zero denominator (degenerate
    boxes) gives 0, not NaN.
    """
    if criterion not in OVERLAP_CRITERIA:
        raise ValueError(f"criterion must be one of {OVERLAP_CRITERIA}, got {criterion!r}")
    one = 1.0 if plus_one else 0.0
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + one
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + one
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area_a = (a[..., 2] - a[..., 0] + one) * (a[..., 3] - a[..., 1] + one)
    if criterion == "iou":
        area_b = (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)
        denom = area_a + area_b - inter
    else:
        denom = np.broadcast_to(area_a, inter.shape)
    out = np.zeros_like(inter)
    np.divide(inter, denom, out=out, where=denom > 0)
    return out
