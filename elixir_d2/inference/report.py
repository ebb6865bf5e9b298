"""Case report (``report.html`` per case) and run index (``index.html``) for predict_net.py.

Both pages are self-contained: the CSS and JavaScript of ``report_assets/`` are inlined and the
case data is an inline ``<script type="application/json">`` block, so they work from ``file://``
in any browser (no fetch / XHR of local files, no ES modules, no network). The slice pictures lie
beside the report, ``report/<preset>/slice_NNN.jpg``: every slice read, windowed once per preset
(soft tissue, lung, bone) to an 8-bit greyscale JPEG; the page loads only the current slice and a
few around it. Detections, findings and ground truth are drawn by the page as SVG over the
picture, so the score threshold slider can hide boxes live.
"""

from __future__ import annotations

import html
import json
import os
import re
from importlib import resources
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..atomic_io import atomic_write_text
from ..boxes import box_overlap
from ..visualization import window_for_display
from .outputs import annotated_slices
from .volume_io import CTVolume

__all__ = ["PRESETS", "REPORT_FORMATS", "write_case_report", "write_index", "ground_truth_matches"]

REPORT_FORMATS = ("html", "none")
# (key, label, (low HU, high HU)): soft tissue W450 L50, lung W1500 L-600, bone W1800 L400.
PRESETS: Tuple[Tuple[str, str, Tuple[float, float]], ...] = (
    ("soft", "soft tissue", (-175.0, 275.0)),
    ("lung", "lung", (-1350.0, 150.0)),
    ("bone", "bone", (-500.0, 1300.0)),
)
REPORT_DIR = "report"
# JPEG q90: a 200-slice 512 x 512 case stays well under the 30 MB target with three presets
# (projects/benchmarks/report_speed.py; lossless PNG measured there for comparison).
IMAGE_EXT = "jpg"
JPEG_QUALITY = 90
HIT_IOU = 0.5  # a detection hits a lesion on its slice at IoU >= this (the FROC criterion)
_TOKEN = re.compile(r"\{\{([A-Z_]+)\}\}")


def _asset(name: str) -> str:
    """A file of ``report_assets/`` (package data: found in source trees and installs alike)."""
    return resources.files(__package__).joinpath("report_assets", name).read_text("utf-8")


def _fill(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{{NAME}}`` tokens in one pass (a value holding ``{{...}}`` is left as is)."""
    return _TOKEN.sub(lambda m: values[m.group(1)], template)


def _json_for_script(obj) -> str:
    """JSON safe inside a <script> element: ``<``, ``>`` and ``&`` as \\u escapes, so no name
    in the data can close the element or open a comment."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def ground_truth_matches(
    boxes: np.ndarray, gt_boxes: np.ndarray, thresh: float = HIT_IOU
) -> List[List[int]]:
    """Per detection, the indices of the lesions it overlaps with IoU >= ``thresh``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes) or not len(gt_boxes):
        return [[] for _ in range(len(boxes))]
    iou = box_overlap(boxes[:, None], gt_boxes[None])
    return [np.flatnonzero(row >= thresh).tolist() for row in iou]


def _case_froc(
    doc: Dict, gt: Mapping[int, np.ndarray], fps: Sequence[float], convention: str
) -> Optional[Dict]:
    """This case's FROC over its predicted slices with ground truth (None without any)."""
    from ..evaluation.froc import compute_froc

    boxes, scores, truths = annotated_slices(doc, gt)
    if not truths or not sum(len(t) for t in truths):
        return None
    r = compute_froc(boxes, scores, truths, fps=fps, convention=convention)
    return {
        "fp": [round(float(v), 4) for v in r["fp_per_image"]],
        "sens": [round(float(v), 4) for v in r["sens_curve"]],
        "at": {str(k): round(float(v), 4) for k, v in r["sensitivity"].items()},
        "num_images": int(r["num_images"]),
        "num_gt": int(r["num_gt"]),
    }


def report_data(
    doc: Dict,
    volume: CTVolume,
    gt: Optional[Mapping[int, np.ndarray]] = None,
    fps: Sequence[float] = (0.5, 1, 2, 4, 8),
    convention: str = "continuous",
) -> Dict:
    """What the page shows, from the case's detections.json document ``doc`` (the values as
    written) and its volume (slice numbers, spacing); ``gt``: slice number -> (M, 4) lesions."""
    gt_slices = {
        int(n): np.asarray(b, dtype=np.float64).reshape(-1, 4)
        for n, b in (gt or {}).items()
        if int(n) in volume.rows
    }
    dets = []
    for d in doc["detections"]:
        n = int(d["slice_index"])
        box = [d["x1"], d["y1"], d["x2"], d["y2"]]
        entry = {
            "s": n,
            "box": box,
            "score": d["score"],
            "finding": d["finding_id"],
            "label": d.get("lesion_type", ""),
        }
        if n in gt_slices:  # hit / false positive only where the slice is annotated
            entry["match"] = ground_truth_matches(np.array([box]), gt_slices[n])[0]
        dets.append(entry)
    return {
        "case": doc["case"],
        "kind": doc["input_kind"],
        "width": volume.width,
        "height": volume.height,
        "spacing": list(doc["spacing_mm"]),
        "slice_interval": doc["slice_interval_mm"],
        "slices": [int(n) for n in volume.slice_numbers],
        "predicted": [int(n) for n in doc["slices_predicted"]],
        "image_dir": REPORT_DIR,
        "files": [_image_name(n) for n in volume.slice_numbers],
        "presets": [{"key": k, "label": label, "window": list(w)} for k, label, w in PRESETS],
        "detections": dets,
        "findings": doc["findings"],
        "warnings": doc["warnings"],
        "has_gt": gt is not None,
        "gt": {str(n): b.round(2).tolist() for n, b in sorted(gt_slices.items())},
        "froc": _case_froc(doc, gt_slices, fps, convention) if gt is not None else None,
        "hit_iou": HIT_IOU,
    }


def _image_name(n: int) -> str:
    return f"slice_{int(n):03d}.{IMAGE_EXT}"


def write_slice_images(
    case_dir: str, volume: CTVolume, ext: str = IMAGE_EXT, quality: int = JPEG_QUALITY
) -> List[str]:
    """Every slice of ``volume`` windowed by each preset: ``report/<preset>/slice_NNN.<ext>``
    (ext ``jpg`` or ``png``); returns the paths relative to ``case_dir``."""
    written = []
    for key, _, window in PRESETS:
        os.makedirs(os.path.join(case_dir, REPORT_DIR, key), exist_ok=True)
    for row, n in enumerate(volume.slice_numbers):
        hu = volume.hu[row]
        for key, _, window in PRESETS:
            rel = f"{REPORT_DIR}/{key}/slice_{int(n):03d}.{ext}"
            img = Image.fromarray(window_for_display(hu, window), mode="L")
            if ext == "jpg":
                img.save(os.path.join(case_dir, rel), format="JPEG", quality=quality)
            else:
                img.save(os.path.join(case_dir, rel), format="PNG", compress_level=6)
            written.append(rel)
    return written


def render_report(data: Dict) -> str:
    """The report page for :func:`report_data`'s ``data``."""
    return _fill(
        _asset("report.html"),
        {
            "TITLE": html.escape(f"{data['case']}: lesion detection report"),
            "CSS": _asset("report.css"),
            "DATA": _json_for_script(data),
            "JS": _asset("report.js"),
        },
    )


def write_case_report(
    case_dir: str,
    doc: Dict,
    volume: CTVolume,
    gt: Optional[Mapping[int, np.ndarray]] = None,
    fps: Sequence[float] = (0.5, 1, 2, 4, 8),
    convention: str = "continuous",
) -> None:
    """``report.html`` and its slice pictures into ``case_dir`` (see the module docstring)."""
    write_slice_images(case_dir, volume)
    data = report_data(doc, volume, gt, fps, convention)
    atomic_write_text(os.path.join(case_dir, "report.html"), render_report(data))


def write_index(
    out_root: str, cases: Sequence[Dict], failed: Sequence[Dict], froc: Optional[Dict] = None
) -> None:
    """``index.html`` of a run: one row per finished case (summary.json entries) linking to its
    report, the failed cases and why, and the run's FROC (froc.png) when there is one."""
    esc = html.escape
    rows = []
    for c in cases:
        case = c["case"]
        link = (
            f'<a href="{esc(case)}/report.html">{esc(case)}</a>'
            if os.path.isfile(os.path.join(out_root, case, "report.html"))
            else esc(case)
        )
        rows.append(
            f'<tr data-case="{esc(case)}"><td>{link}</td><td>{esc(c["input_kind"])}</td>'
            f'<td class="num">{c["slices"]}</td><td class="num">{c["detections"]}</td>'
            f'<td class="num findings">{c["findings"]}</td></tr>'
        )
    fails = "".join(
        f'<tr data-case="{esc(f["case"])}"><td>{esc(f["case"])}</td><td>{esc(f["error"])}</td></tr>'
        for f in failed
    )
    froc_html = ""
    if froc is not None:
        sens = ", ".join(f"{esc(k)} FP: {v:.3f}" for k, v in froc["sensitivity"].items())
        froc_html = (
            f"<h2>FROC</h2><p>{froc['num_gt']} lesions on {froc['num_images']} annotated "
            f'slices; sensitivity at {sens}</p><img id="froc" src="froc.png" '
            'alt="FROC curve of the run">'
        )
    page = _fill(
        _asset("index.html"),
        {
            "CSS": _asset("report.css"),
            "SUMMARY": esc(f"{len(cases)} case(s) done, {len(failed)} failed"),
            "ROWS": "".join(rows) or '<tr><td colspan="5">no case finished</td></tr>',
            "FAILED": (
                f'<h2>Failed cases</h2><table id="failed"><thead><tr><th>case</th>'
                f"<th>error</th></tr></thead><tbody>{fails}</tbody></table>"
                if failed
                else ""
            ),
            "FROC": froc_html,
        },
    )
    atomic_write_text(os.path.join(out_root, "index.html"), page)
