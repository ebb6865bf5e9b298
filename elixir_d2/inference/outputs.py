"""Writers for inference results: per-slice detections (JSON, CSV), 3-D findings, COCO results.

Boxes are XYXY in the slice's native pixels (continuous coordinates) and in mm from the slice's
top-left corner (x by the x spacing, y by the y spacing). NIfTI / DICOM detections also carry
the LPS position (mm) of the box centre. Nothing from DICOM headers beyond geometry is written.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..atomic_io import atomic_write_text
from .grouping import Finding
from .predictor import VolumePrediction

__all__ = [
    "DETECTION_COLUMNS",
    "FINDING_COLUMNS",
    "detection_rows",
    "case_summary",
    "write_json",
    "write_csv",
    "CocoResults",
]

DETECTION_COLUMNS = (
    "case",
    "slice_index",
    "x1",
    "y1",
    "x2",
    "y2",
    "x1_mm",
    "y1_mm",
    "x2_mm",
    "y2_mm",
    "width_mm",
    "height_mm",
    "score",
    "class_id",
    "lesion_type",
    "finding_id",
    "center_lps_mm",
)
FINDING_COLUMNS = (
    "case",
    "finding_id",
    "slice_first",
    "slice_last",
    "num_slices",
    "extent_mm",
    "largest_diameter_mm",
    "best_score",
    "best_slice",
    "best_box",
    "num_detections",
    "short_axis_mm",
)


def _round(v: float, nd: int = 3) -> float:
    return float(round(float(v), nd))


def detection_rows(
    pred: VolumePrediction, finding_of: Optional[Dict[int, int]] = None
) -> List[Dict]:
    """One dict per detection (DETECTION_COLUMNS), in slice then score order.

    ``finding_of`` maps the running detection index (the order of this function's output) to a
    finding id; see :func:`elixir_d2.inference.grouping.group_detections`.
    """
    vol = pred.volume
    sx, sy = vol.spacing
    rows = []
    for sp in pred.slices:
        for k in range(len(sp.scores)):
            x1, y1, x2, y2 = (float(v) for v in sp.boxes[k])
            centre = vol.physical_point((x1 + x2) / 2, (y1 + y2) / 2, sp.slice_number)
            i = len(rows)
            rows.append(
                {
                    "case": vol.name,
                    "slice_index": int(sp.slice_number),
                    "x1": _round(x1, 2),
                    "y1": _round(y1, 2),
                    "x2": _round(x2, 2),
                    "y2": _round(y2, 2),
                    "x1_mm": _round(x1 * sx),
                    "y1_mm": _round(y1 * sy),
                    "x2_mm": _round(x2 * sx),
                    "y2_mm": _round(y2 * sy),
                    "width_mm": _round((x2 - x1) * sx),
                    "height_mm": _round((y2 - y1) * sy),
                    "score": _round(sp.scores[k], 5),
                    "class_id": int(sp.classes[k]),
                    "lesion_type": sp.type_names[k] if sp.type_names is not None else "",
                    "finding_id": (finding_of or {}).get(i, -1),
                    "center_lps_mm": None if centre is None else [_round(c) for c in centre],
                }
            )
    return rows


def flat_detections(pred: VolumePrediction):
    """(slices, boxes, scores) of every detection in :func:`detection_rows` order."""
    slices = [sp.slice_number for sp in pred.slices for _ in range(len(sp.scores))]
    boxes = [sp.boxes for sp in pred.slices if len(sp.scores)]
    scores = [sp.scores for sp in pred.slices if len(sp.scores)]
    return (
        np.asarray(slices, dtype=np.int64),
        np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        np.concatenate(scores) if scores else np.zeros(0),
    )


def finding_rows(case: str, findings: Sequence[Finding]) -> List[Dict]:
    return [
        {
            "case": case,
            "finding_id": f.finding_id,
            "slice_first": f.slice_first,
            "slice_last": f.slice_last,
            "num_slices": f.num_slices,
            "extent_mm": _round(f.extent_mm),
            "largest_diameter_mm": _round(f.largest_diameter_mm),
            "best_score": _round(f.best_score, 5),
            "best_slice": f.best_slice,
            "best_box": [_round(v, 2) for v in f.best_box],
            "num_detections": len(f.members),
            "short_axis_mm": _round(f.short_axis_mm),
        }
        for f in findings
    ]


def case_summary(
    pred: VolumePrediction, detections: List[Dict], findings: Sequence[Finding]
) -> Dict:
    """The per-case JSON document: geometry, what the model saw, detections and findings."""
    vol = pred.volume
    sizes = sorted({tuple(sp.input_size) for sp in pred.slices})
    return {
        "case": vol.name,
        "input_kind": vol.kind,
        "image_size": [vol.height, vol.width],
        "spacing_mm": [_round(v, 5) for v in vol.spacing],
        "slice_interval_mm": _round(vol.slice_interval, 5),
        "num_slices_read": len(vol.slice_numbers),
        "slices_predicted": [sp.slice_number for sp in pred.slices],
        "model_input_size": [list(s) for s in sizes],
        "fallback_slices": int(sum(sp.fallbacks for sp in pred.slices)),
        "warnings": list(vol.warnings),
        "detections": detections,
        "findings": finding_rows(vol.name, findings),
    }


def write_json(path: str, obj, indent: Optional[int] = 1) -> None:
    """Written then renamed: a run killed or out of disk leaves no truncated file."""
    atomic_write_text(path, json.dumps(obj, indent=indent))


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def write_csv(path: str, rows: Iterable[Dict], columns: Sequence[str]) -> None:
    """CSV with a header; list values become space-separated numbers. Written then renamed."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _cell(r.get(c)) for c in columns})
    atomic_write_text(path, buf.getvalue())


class CocoResults:
    """COCO-format detection results of a run: ``coco_results.json`` (the list pycocotools'
    ``loadRes`` reads: image_id, category_id, bbox XYWH, score) and ``coco_images.json`` (the
    images and categories those ids refer to; category_id = class index + 1)."""

    def __init__(self, class_names: Optional[Sequence[str]] = None):
        self.class_names = list(class_names) if class_names else ["lesion"]
        self.images: List[Dict] = []
        self.results: List[Dict] = []

    def add_volume(self, pred: VolumePrediction) -> None:
        self.add_case(case_summary(pred, detection_rows(pred), []))

    def add_case(self, doc: Dict) -> None:
        """Add one case from its ``detections.json`` document (:func:`case_summary`): the
        boxes as written there, so a resumed run that reads finished cases back from their folders
        writes the same results as a run that predicted them."""
        height, width = doc["image_size"]
        by_slice: Dict[int, List[Dict]] = {}
        for d in doc["detections"]:
            by_slice.setdefault(int(d["slice_index"]), []).append(d)
        for n in doc["slices_predicted"]:
            image_id = len(self.images) + 1
            self.images.append(
                {
                    "id": image_id,
                    "file_name": f"{doc['case']}/{n:03d}",
                    "case": doc["case"],
                    "slice_index": int(n),
                    "height": height,
                    "width": width,
                }
            )
            for d in by_slice.get(int(n), []):
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(d["class_id"]) + 1,
                        "bbox": [
                            d["x1"],
                            d["y1"],
                            _round(d["x2"] - d["x1"], 2),
                            _round(d["y2"] - d["y1"], 2),
                        ],
                        "score": d["score"],
                    }
                )

    def write(self, out_dir: str) -> None:
        # can be long: compact
        write_json(f"{out_dir}/coco_results.json", self.results, indent=None)
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        write_json(f"{out_dir}/coco_images.json", {"images": self.images, "categories": cats})


def annotated_slices(
    doc: Dict, gt: Mapping[int, np.ndarray]
) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
    """The FROC's inputs from a case's detections.json document ``doc`` (the values as written):
    per predicted slice that has ground truth in ``gt`` (slice number -> (M, 4) lesions), its
    detections' boxes, their scores and the lesions."""
    boxes, scores, truths = [], [], []
    for n in doc["slices_predicted"]:
        if n in gt:
            rows = [d for d in doc["detections"] if d["slice_index"] == n]
            boxes.append(
                np.array(
                    [[d["x1"], d["y1"], d["x2"], d["y2"]] for d in rows], dtype=np.float64
                ).reshape(-1, 4)
            )
            scores.append(np.array([d["score"] for d in rows], dtype=np.float64))
            truths.append(np.asarray(gt[n], dtype=np.float64).reshape(-1, 4))
    return boxes, scores, truths
