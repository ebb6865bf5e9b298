"""The run files of a predict_net run (runner.py's module docstring), written once, by rank 0,
from every case's outcome in the run's case order: the same bytes whichever process predicted
which case, and whether a case was predicted or read back by ``--resume``."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..cli import escape_name
from .case_ids import InputNames, OutputDir
from .outputs import (
    DETECTION_COLUMNS,
    FINDING_COLUMNS,
    CocoResults,
    annotated_slices,
    write_csv,
    write_json,
)
from .report import write_index
from .volume_io import CaseSource

logger = logging.getLogger(__name__)

__all__ = ["GroundTruth", "RunPlan", "CaseOutcome", "done_entry", "write_run_files"]

GroundTruth = Dict[str, Dict[int, np.ndarray]]  # case -> slice number -> (M, 4) XYXY pixels


@dataclass
class RunPlan:
    """What rank 0 found and prepared before any case is predicted; shared with every rank."""

    cases: List[CaseSource]
    ignored: List[str]
    ids: List[str]


@dataclass
class CaseOutcome:
    """One case of a rank's shard: its detections.json document, or why it failed."""

    index: int
    doc: Optional[Dict] = None
    failure: Optional[Dict] = None
    resumed: bool = False
    read_s: float = 0.0  # reading the input files
    prepare_s: float = 0.0  # building the model inputs
    forward_s: float = 0.0  # the model
    write_s: float = 0.0  # the rest of the case: grouping, outputs, pictures, manifest


def done_entry(doc: Dict) -> Dict:
    """A case's summary.json entry, from its detections.json document."""
    return {"case": doc["case"], "input_kind": doc["input_kind"],
            "slices": len(doc["slices_predicted"]), "detections": len(doc["detections"]),
            "findings": len(doc["findings"]), "model_input_size": doc["model_input_size"]}


def _froc(docs: List[Tuple[str, Dict]], gt: GroundTruth, out_dir: str, fps,
          convention: str = "continuous") -> Optional[Dict]:
    """FROC over the predicted slices with ground truth, from the (input case name, detections.json
    document) of every finished case: the boxes as written, fresh and resumed cases alike."""
    from ..evaluation.froc import compute_froc
    from ..visualization import plot_froc

    boxes, scores, truths = [], [], []
    for name, doc in docs:
        for values, case_values in zip((boxes, scores, truths),
                                       annotated_slices(doc, gt.get(name, {}))):
            values += case_values
    if not truths:
        logger.warning("ground truth given but no predicted slice has any: no FROC")
        return None
    result = compute_froc(boxes, scores, truths, fps=fps, convention=convention)
    plot_froc({"IoU": (result["fp_per_image"], result["sens_curve"])}, f"{out_dir}/froc.png",
              fps=fps, title=f"FROC over {len(truths)} annotated slices")
    doc = {"num_images": result["num_images"], "num_gt": result["num_gt"],
           "num_hits": result["num_hits"], "froc_convention": convention,
           "sensitivity": {str(k): v for k, v in result["sensitivity"].items()},
           "note": "computed on the detections kept by the score threshold of this run"}
    write_json(f"{out_dir}/froc.json", doc)
    return doc


def write_run_files(cfg, plan: RunPlan, outcomes: List[CaseOutcome], class_names: List[str],
                    names: InputNames, out: OutputDir, opts, gt: GroundTruth,
                    timing: Dict[str, float]) -> Dict:
    """The run files (module docstring) from every case's outcome, in the plan's case order:
    the same bytes whoever predicted which case, and whether it was predicted or resumed."""
    coco = CocoResults(class_names)
    done, failed, all_dets, all_findings, docs = [], [], [], [], []
    for o in outcomes:
        if o.failure is not None:
            failed.append(o.failure)
            continue
        coco.add_case(o.doc)
        all_dets += o.doc["detections"]
        all_findings += o.doc["findings"]
        done.append(done_entry(o.doc))
        if opts.gt:  # FROC matches ground truth by the input's case name
            docs.append((plan.cases[o.index].name, o.doc))
    resumed = sum(o.resumed for o in outcomes)
    if resumed:
        logger.info(f"--resume: {resumed} of {len(plan.cases)} case(s) were complete and verified "
                    f"in {escape_name(out.given)}; read back, not predicted again")
    write_csv(out.path("detections.csv"), all_dets, DETECTION_COLUMNS)
    write_csv(out.path("findings.csv"), all_findings, FINDING_COLUMNS)
    coco.write(out.root)
    froc = (_froc(docs, gt, out.root, tuple(cfg.TEST.FROC_FPS), cfg.TEST.FROC_CONVENTION)
            if opts.gt else None)
    summary = {
        "cases": done, "failed": failed,
        "ignored": (len(plan.ignored) if opts.anonymize_ids
                    else [escape_name(names.relative(p)) for p in plan.ignored]),
        "froc": froc,
        "timing_s": _timing(outcomes, timing),
    }
    write_json(out.path("summary.json"), summary)
    if opts.report == "html":  # case report: the run's index page
        write_index(out.root, done, failed, froc)
    if failed:
        logger.warning(f"{len(failed)} case(s) failed: "
                       + "; ".join(f"{f['case']} ({f['error']})" for f in failed))
    if plan.ignored:
        logger.info(f"ignored {len(plan.ignored)} file(s) that are not CT input or not followed"
                    + ("" if opts.anonymize_ids
                       else f", e.g. {escape_name(names.relative(plan.ignored[0]))}"))
    return summary


def _timing(outcomes: List[CaseOutcome], run: Dict[str, float]) -> Dict[str, float]:
    """summary.json's timing_s: the run's wall time after model construction (rank 0's clock) and
    the time of each step summed over the cases, whichever process did them."""
    steps = {k: round(sum(getattr(o, f) for o in outcomes), 3)
             for k, f in (("read_inputs", "read_s"), ("prepare_inputs", "prepare_s"),
                          ("model_forward", "forward_s"), ("write_outputs", "write_s"))}
    total = time.perf_counter() - run["start"] - run["model_setup"]
    return {"processes": run["processes"], "model_setup": round(run["model_setup"], 3),
            "total": round(total, 3), **steps,
            # one process: how much of the run is the model's (predict_speed.py's target)
            "total_over_forward": (round(total / steps["model_forward"], 3)
                                   if run["processes"] == 1 and steps["model_forward"] > 0
                                   else None)}
