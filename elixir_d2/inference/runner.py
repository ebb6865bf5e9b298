"""Inference runs over cases: read, predict, group into findings, write every output.

Output layout under ``output_dir``::

    <case>/detections.json     geometry, model input size, detections, findings, warnings
    <case>/detections.csv      one row per detection (DETECTION_COLUMNS)
    <case>/findings.csv        one row per 3-D finding (FINDING_COLUMNS)
    <case>/overlays/slice_NNN.png      windowed slice, detections (red) + ground truth (green)
    <case>/relations/slice_NNN.png     with draw_relations: the region_nonlocal graph
    <case>/confidence/slice_NNN.png    with draw_confidence: TRPN's p per level
    detections.csv, findings.csv       all cases together
    coco_results.json, coco_images.json
    froc.png, froc.json                with ground truth: FROC over the slices it annotates
    summary.json                       cases done, cases that failed (and why), ignored files, timing
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from detectron2.utils.file_io import PathManager

from ..data.ct_mapper import CTSliceError
from ..data.deeplesion import DeepLesionFormatError, read_dl_info
from ..visualization import draw_confidence_map, draw_detections, draw_relation_graph, window_for_display
from .grouping import group_detections
from .outputs import (
    DETECTION_COLUMNS, FINDING_COLUMNS, CocoResults, case_summary, detection_rows, finding_rows, flat_detections,
    write_csv, write_json,
)
from .predictor import CTPredictor, VolumePrediction
from .volume_io import CTInputError, discover_cases, read_case

logger = logging.getLogger(__name__)

__all__ = ["PredictOptions", "load_ground_truth", "run_prediction", "INPUT_ERRORS"]

# Errors that make one case unusable; a folder run lists them and goes on.
INPUT_ERRORS = (CTInputError, CTSliceError, DeepLesionFormatError, OSError)

GroundTruth = Dict[str, Dict[int, np.ndarray]]  # case -> slice number -> (M, 4) XYXY pixels


@dataclass
class PredictOptions:
    batch_size: int = 4
    spacing: Optional[float] = None  # mm/px for DeepLesion folders (else DL_info.csv)
    slice_interval: Optional[float] = None  # mm for DeepLesion folders (else DL_info.csv)
    view_window: Tuple[float, float] = (-175.0, 275.0)
    overlays: str = "detections"  # "detections" (slices with a detection or ground truth), "all", "none"
    draw_relations: bool = False
    draw_confidence: bool = False
    group_iou: float = 0.3
    group_gap: int = 1
    gt: Optional[str] = None
    progress: bool = True


def load_ground_truth(path: str) -> GroundTruth:
    """Ground truth boxes from a DeepLesion ``DL_info.csv`` (case = series folder, e.g.
    ``000001_01_01``; rows flagged Possibly_noisy are left out, as in evaluation) or a JSON file
    ``{case: {slice_number: [[x1, y1, x2, y2], ...]}}`` (slices listed with [] have no lesion)."""
    gt: GroundTruth = {}
    if path.lower().endswith(".csv"):
        noisy = 0
        for les in read_dl_info(path):
            if les["noisy"]:
                noisy += 1
                continue
            per = gt.setdefault(les["series_dir"], {})
            per[les["name_slice"]] = np.vstack([per.get(les["name_slice"], np.zeros((0, 4))), [les["bbox"]]])
        if noisy:
            logger.info(f"{path}: {noisy} lesion(s) flagged Possibly_noisy left out of the ground truth")
        return gt
    with PathManager.open(path, "r") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{case: {{slice: [[x1, y1, x2, y2], ...]}}}}")
    for case, slices in data.items():
        if not isinstance(slices, dict):
            raise ValueError(f"{path}: case {case!r} must map slice numbers to box lists")
        for s, boxes in slices.items():
            arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
            if arr.size and not np.all(arr[:, 2:] > arr[:, :2]):
                raise ValueError(f"{path}: case {case!r} slice {s}: boxes must be [x1, y1, x2, y2] with x2 > x1, y2 > y1")
            try:
                gt.setdefault(case, {})[int(s)] = arr
            except ValueError:
                raise ValueError(f"{path}: case {case!r}: slice key {s!r} is not an integer") from None
    return gt


def _draw_case(pred: VolumePrediction, case_dir: str, gt: Dict[int, np.ndarray], opts: PredictOptions) -> int:
    """Overlays (and relation / confidence pictures) of the slices worth looking at."""
    if opts.overlays == "none" and not (opts.draw_relations or opts.draw_confidence):
        return 0
    vol = pred.volume
    drawn = 0
    for sp in pred.slices:
        gt_boxes = gt.get(sp.slice_number)
        if opts.overlays != "all" and not len(sp.scores) and gt_boxes is None:
            continue
        grey = window_for_display(vol.hu[vol.rows[sp.slice_number]], opts.view_window)
        name = f"slice_{sp.slice_number:03d}.png"
        if opts.overlays != "none":
            PathManager.mkdirs(f"{case_dir}/overlays")
            draw_detections(grey, sp.boxes, sp.scores, sp.type_names, gt_boxes, f"{case_dir}/overlays/{name}")
            drawn += 1
        if opts.draw_relations and sp.relations is not None and len(sp.proposals):
            PathManager.mkdirs(f"{case_dir}/relations")
            draw_relation_graph(grey, sp.proposals, sp.relations, f"{case_dir}/relations/{name}",
                                scores=sp.proposal_scores, title=f"{vol.name} slice {sp.slice_number}")
        if opts.draw_confidence and sp.conf_maps:
            PathManager.mkdirs(f"{case_dir}/confidence")
            draw_confidence_map(grey, sp.conf_maps, f"{case_dir}/confidence/{name}", eps=sp.conf_eps)
    return drawn


def _froc(preds: List[VolumePrediction], gt: GroundTruth, out_dir: str, fps) -> Optional[Dict]:
    from ..evaluation.froc import compute_froc
    from ..visualization import plot_froc

    boxes, scores, truths = [], [], []
    for pred in preds:
        case_gt = gt.get(pred.volume.name, {})
        for sp in pred.slices:
            if sp.slice_number in case_gt:
                boxes.append(sp.boxes)
                scores.append(sp.scores)
                truths.append(case_gt[sp.slice_number])
    if not truths:
        logger.warning("ground truth given but no predicted slice has any: no FROC")
        return None
    result = compute_froc(boxes, scores, truths, fps=fps)
    plot_froc({"IoU": (result["fp_per_image"], result["sens_curve"])}, f"{out_dir}/froc.png", fps=fps,
              title=f"FROC over {len(truths)} annotated slices")
    doc = {"num_images": result["num_images"], "num_gt": result["num_gt"], "num_hits": result["num_hits"],
           "sensitivity": {str(k): v for k, v in result["sensitivity"].items()},
           "note": "computed on the detections kept by the score threshold of this run"}
    write_json(f"{out_dir}/froc.json", doc)
    return doc


def run_prediction(cfg, input_path: str, output_dir: str, opts: Optional[PredictOptions] = None,
                   model=None) -> Dict:
    """Predict every case under ``input_path`` and write the outputs (module docstring).

    A single case that cannot be read raises its error; in a run over several cases a bad case
    is skipped, logged, and listed under ``failed`` in the returned summary and summary.json.
    """
    opts = opts or PredictOptions()
    cases, ignored = discover_cases(input_path)
    t_setup = time.perf_counter()
    predictor = CTPredictor(cfg, model, batch_size=opts.batch_size, capture_relations=opts.draw_relations,
                            capture_confidence=opts.draw_confidence)
    t_start = time.perf_counter()  # model construction / loading is timed apart
    gt = load_ground_truth(opts.gt) if opts.gt else {}
    PathManager.mkdirs(output_dir)
    coco = CocoResults(predictor.class_names)
    all_dets, all_findings, done, failed, preds = [], [], [], [], []
    forward_s = prepare_s = 0.0
    context_mm = max(abs(o) for o in predictor.mapper.offsets_mm)
    bar = tqdm(cases, desc="cases", unit="case", disable=not opts.progress or len(cases) == 1)
    for case in bar:
        try:
            volume = read_case(case, opts.spacing, opts.slice_interval, context_mm=context_mm)
            with tqdm(total=len(volume.slices_to_predict()), desc=case.name, unit="slice", leave=False,
                      disable=not opts.progress) as slice_bar:
                pred = predictor.predict_volume(volume, progress=slice_bar)
        except INPUT_ERRORS as e:
            if len(cases) == 1:
                raise
            logger.warning(f"skipping case {case.name}: {e}")
            failed.append({"case": case.name, "path": case.path, "error": str(e)})
            continue
        forward_s += pred.forward_s
        prepare_s += pred.prepare_s
        slices, boxes, scores = flat_detections(pred)
        findings = group_detections(slices, boxes, scores, volume.spacing, volume.slice_interval,
                                    iou_thresh=opts.group_iou, max_gap=opts.group_gap)
        finding_of = {i: f.finding_id for f in findings for i in f.members}
        dets = detection_rows(pred, finding_of)
        case_dir = f"{output_dir}/{volume.name}"
        PathManager.mkdirs(case_dir)
        write_json(f"{case_dir}/detections.json", case_summary(pred, dets, findings))
        write_csv(f"{case_dir}/detections.csv", dets, DETECTION_COLUMNS)
        f_rows = finding_rows(volume.name, findings)
        write_csv(f"{case_dir}/findings.csv", f_rows, FINDING_COLUMNS)
        _draw_case(pred, case_dir, gt.get(volume.name, {}), opts)
        coco.add_volume(pred)
        all_dets += dets
        all_findings += f_rows
        for w in volume.warnings:
            logger.warning(w)
        done.append({"case": volume.name, "input_kind": volume.kind, "slices": len(pred.slices),
                     "detections": len(dets), "findings": len(findings),
                     "model_input_size": [list(s) for s in sorted({tuple(sp.input_size) for sp in pred.slices})]})
        if opts.gt:
            preds.append(pred)
        volume.hu = None  # release the volume; outputs are written
    write_csv(f"{output_dir}/detections.csv", all_dets, DETECTION_COLUMNS)
    write_csv(f"{output_dir}/findings.csv", all_findings, FINDING_COLUMNS)
    coco.write(output_dir)
    froc = _froc(preds, gt, output_dir, tuple(cfg.TEST.FROC_FPS)) if opts.gt else None
    total_s = time.perf_counter() - t_start
    summary = {
        "cases": done, "failed": failed, "ignored": ignored, "froc": froc,
        "timing_s": {"model_setup": round(t_start - t_setup, 3), "total": round(total_s, 3), "model_forward": round(forward_s, 3),
                     "prepare_inputs": round(prepare_s, 3),
                     "total_over_forward": round(total_s / forward_s, 3) if forward_s > 0 else None},
    }
    write_json(f"{output_dir}/summary.json", summary)
    if failed:
        logger.warning(f"{len(failed)} case(s) failed: " + "; ".join(f"{f['case']} ({f['error']})" for f in failed))
    if ignored:
        logger.info(f"ignored {len(ignored)} file(s) that are not CT input, e.g. {ignored[0]}")
    return summary
