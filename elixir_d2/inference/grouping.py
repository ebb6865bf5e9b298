"""Group per-slice detections into 3-D findings.

Two detections belong to the same finding when they lie on different slices at most
``max_gap`` slice numbers apart (1: adjacent slices only) and their boxes overlap with IoU >=
``iou_thresh``; findings are the connected components of that relation (a lesion seen on slices
5, 6, 7 links 5-6 and 6-7 even if the 5 and 7 boxes do not overlap).

A finding reports its slice extent, the largest diameter (the longest box side in mm over its
slices: the box of a lesion spans its long RECIST axis when that axis lies along x or y, and a
slanted axis is longer than any side), the short axis (the shorter side, in mm, of the box whose
longer side gives the largest diameter: both axes measured on one slice, as RECIST does), its best
score and where that score was found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..boxes import box_overlap
from ..union_find import UnionFind

__all__ = ["Finding", "group_detections"]


@dataclass
class Finding:
    finding_id: int
    slice_first: int
    slice_last: int
    num_slices: int  # slices holding at least one member detection
    extent_mm: float  # (slice_last - slice_first + 1) * slice interval
    largest_diameter_mm: float
    short_axis_mm: float  # shorter side of the box giving largest_diameter_mm
    best_score: float
    best_slice: int
    best_box: List[float]  # XYXY pixels on best_slice
    members: List[int]  # indices into the detections passed in

    def to_dict(self) -> Dict:
        return asdict(self)


def group_detections(
    slices: Sequence[int],
    boxes: np.ndarray,
    scores: Sequence[float],
    spacing: Tuple[float, float],
    slice_interval: float,
    iou_thresh: float = 0.3,
    max_gap: int = 1,
) -> List[Finding]:
    """Connected components of "overlapping boxes on nearby slices", best score first.

    Args:
        slices: slice number of each detection.
        boxes: (N, 4) XYXY pixels.
        scores: (N,) detection scores.
        spacing: (x, y) pixel spacing in mm.
        slice_interval: mm between consecutive slice numbers.
        iou_thresh: least IoU linking two detections.
        max_gap: largest slice-number difference linking two detections (>= 1).
    """
    if max_gap < 1:
        raise ValueError(f"max_gap must be >= 1, got {max_gap}")
    slices = np.asarray(slices, dtype=np.int64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(slices) == len(boxes) == len(scores):
        raise ValueError(
            f"{len(slices)} slices, {len(boxes)} boxes, {len(scores)} scores: lengths differ"
        )
    n = len(slices)
    sets = UnionFind(n)
    by_slice: Dict[int, np.ndarray] = {
        int(s): np.flatnonzero(slices == s) for s in np.unique(slices)
    }
    for s, idx in by_slice.items():
        for gap in range(1, max_gap + 1):
            other = by_slice.get(s + gap)
            if other is None:
                continue
            linked = np.argwhere(box_overlap(boxes[idx][:, None], boxes[other][None]) >= iou_thresh)
            for a, b in linked:
                sets.union(int(idx[a]), int(other[b]))
    groups: Dict[int, List[int]] = {}
    for i in range(n):
        groups.setdefault(sets.find(i), []).append(i)

    sx, sy = spacing
    findings = []
    for members in groups.values():
        m = np.asarray(members)
        best = int(m[np.argmax(scores[m])])  # first of equal scores
        w_mm, h_mm = (boxes[m, 2] - boxes[m, 0]) * sx, (boxes[m, 3] - boxes[m, 1]) * sy
        side_mm = np.maximum(w_mm, h_mm)
        widest = int(np.argmax(side_mm))  # first of equal diameters
        first, last = int(slices[m].min()), int(slices[m].max())
        findings.append(
            Finding(
                finding_id=-1,
                slice_first=first,
                slice_last=last,
                num_slices=len(np.unique(slices[m])),
                extent_mm=float((last - first + 1) * slice_interval),
                largest_diameter_mm=float(side_mm[widest]),
                short_axis_mm=float(min(w_mm[widest], h_mm[widest])),
                best_score=float(scores[best]),
                best_slice=int(slices[best]),
                best_box=[float(v) for v in boxes[best]],
                members=sorted(int(i) for i in m),
            )
        )
    findings.sort(key=lambda f: (-f.best_score, f.slice_first, f.best_box))
    for k, f in enumerate(findings):
        f.finding_id = k
    return findings
