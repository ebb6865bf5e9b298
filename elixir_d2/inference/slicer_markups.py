"""3D Slicer markups (``.mrk.json``) of a case's findings and detections, as ROI boxes in the
volume's physical LPS coordinates (mm), so that Slicer draws them over the NIfTI volume or DICOM
series it loads.

``findings.mrk.json`` holds one ROI per 3-D finding: in-plane, the best-scoring box on its key
slice; through-plane, the finding's slices (``slice_first`` .. ``slice_last``).
``detections.mrk.json`` holds one ROI per detection kept by the score threshold, one slice thick.
ROI axes are the volume's index axes after the LPS reorientation (:mod:`.orientation`): the
identity but for oblique scans, whose boxes Slicer then shows rotated with the scan.

DeepLesion PNG folders carry no patient geometry: their markups use a nominal frame (the centre of
pixel (0, 0) of slice number 0 at the origin, axes along L, P, S); Slicer shows them over the PNGs
only when those are loaded with that same spacing and origin.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from .grouping import Finding
from .outputs import write_json
from .volume_io import CTVolume

__all__ = [
    "MARKUPS_SCHEMA",
    "FINDINGS_FILE",
    "DETECTIONS_FILE",
    "roi",
    "finding_rois",
    "detection_rois",
    "write_case_markups",
]

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
    "Markups/Resources/Schema/markups-schema-v1.0.3.json#"
)
FINDINGS_FILE, DETECTIONS_FILE = "findings.mrk.json", "detections.mrk.json"
_FINDING_COLOR, _DETECTION_COLOR = [1.0, 0.0, 0.0], [1.0, 0.6, 0.0]


def _frame(vol: CTVolume) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, direction, spacing) mapping a continuous voxel index (x, y, slice number) to LPS
    mm: ``origin + direction @ (index * spacing)``."""
    origin = np.zeros(3) if vol.origin is None else np.asarray(vol.origin, dtype=np.float64)
    direction = (
        np.eye(3)
        if vol.direction is None
        else np.asarray(vol.direction, dtype=np.float64).reshape(3, 3)
    )
    spacing = np.array([vol.spacing[0], vol.spacing[1], vol.slice_interval], dtype=np.float64)
    return origin, direction, spacing


def roi(
    vol: CTVolume,
    box: Sequence[float],
    first: int,
    last: int,
    name: str,
    description: str,
    color: List[float],
) -> Dict:
    """An ROI markup over XYXY ``box`` (continuous pixels: pixel i spans [i, i + 1)) on slice
    numbers ``first`` .. ``last``."""
    origin, direction, spacing = _frame(vol)
    x1, y1, x2, y2 = (float(v) for v in box)
    # Continuous pixel x is voxel index x - 0.5; slice n spans index n - 0.5 .. n + 0.5.
    centre_index = np.array([(x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5, (first + last) / 2])
    centre = origin + direction @ (centre_index * spacing)
    size = np.array([x2 - x1, y2 - y1, last - first + 1]) * spacing
    orientation = [float(v) for v in direction.reshape(-1)]  # row-major: columns are the axes
    position = [float(v) for v in centre]
    return {
        "type": "ROI",
        "name": name,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": True,
        "roiType": "Box",
        "center": position,
        "size": [float(v) for v in size],
        "orientation": orientation,
        "insideOut": False,
        "controlPoints": [
            {
                "id": "1",
                "label": name,
                "description": description,
                "position": position,
                "orientation": orientation,
                "selected": True,
                "locked": True,
                "visibility": True,
                "positionStatus": "defined",
            }
        ],
        "display": {
            "visibility": True,
            "opacity": 1.0,
            "color": color,
            "selectedColor": color,
            "propertiesLabelVisibility": True,
            "pointLabelsVisibility": False,
        },
    }


def finding_rois(vol: CTVolume, findings: Sequence[Finding]) -> List[Dict]:
    """One ROI per finding: its key-slice box across its slices, named with its score."""
    return [
        roi(
            vol,
            f.best_box,
            f.slice_first,
            f.slice_last,
            f"finding {f.finding_id} score {f.best_score:.3f}",
            f"slices {f.slice_first}-{f.slice_last}, key slice {f.best_slice}, largest "
            f"diameter {f.largest_diameter_mm:.1f} mm",
            _FINDING_COLOR,
        )
        for f in findings
    ]


def detection_rois(vol: CTVolume, detections: Sequence[Dict]) -> List[Dict]:
    """One ROI per detection row (:func:`.outputs.detection_rows`), one slice thick."""
    out = []
    for i, d in enumerate(detections):
        n = int(d["slice_index"])
        out.append(
            roi(
                vol,
                [d["x1"], d["y1"], d["x2"], d["y2"]],
                n,
                n,
                f"detection {i} score {d['score']:.3f}",
                f"slice {n}, finding {d['finding_id']}",
                _DETECTION_COLOR,
            )
        )
    return out


def write_case_markups(
    case_dir: str, vol: CTVolume, findings: Sequence[Finding], detections: Sequence[Dict]
) -> None:
    """``findings.mrk.json`` and ``detections.mrk.json`` into ``case_dir`` (written, renamed)."""
    for file, rois in (
        (FINDINGS_FILE, finding_rois(vol, findings)),
        (DETECTIONS_FILE, detection_rois(vol, detections)),
    ):
        write_json(f"{case_dir}/{file}", {"@schema": MARKUPS_SCHEMA, "markups": rois})
