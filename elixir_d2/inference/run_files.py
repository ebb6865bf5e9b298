"""The run files of a predict_net run (runner.py's module docstring), written once, by rank 0,
from every case's outcome in the run's case order: the same bytes whichever process predicted
which case, and whether a case was predicted or read back by ``--resume``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

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

__all__ = ["GroundTruth", "RunPlan", "CaseOutcome", "RunSummary", "done_entry", "write_run_files"]

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
    return {
        "case": doc["case"],
        "input_kind": doc["input_kind"],
        "slices": len(doc["slices_predicted"]),
        "detections": len(doc["detections"]),
        "findings": len(doc["findings"]),
        "model_input_size": doc["model_input_size"],
    }


def _froc(
    docs: List[Tuple[str, Dict]], gt: GroundTruth, out_dir: str, fps, convention: str = "continuous"
) -> Optional[Dict]:
    """FROC over the predicted slices with ground truth, from the (input case name, detections.json
    document) of every finished case: the boxes as written, fresh and resumed cases alike."""
    from ..evaluation.froc import compute_froc
    from ..visualization import plot_froc

    boxes, scores, truths = [], [], []
    for name, doc in docs:
        for values, case_values in zip(
            (boxes, scores, truths), annotated_slices(doc, gt.get(name, {}))
        ):
            values += case_values
    if not truths:
        logger.warning("ground truth given but no predicted slice has any: no FROC")
        return None
    result = compute_froc(boxes, scores, truths, fps=fps, convention=convention)
    plot_froc(
        {"IoU": (result["fp_per_image"], result["sens_curve"])},
        f"{out_dir}/froc.png",
        fps=fps,
        title=f"FROC over {len(truths)} annotated slices",
    )
    doc = {
        "num_images": result["num_images"],
        "num_gt": result["num_gt"],
        "num_hits": result["num_hits"],
        "froc_convention": convention,
        "sensitivity": {str(k): v for k, v in result["sensitivity"].items()},
        "note": "computed on the detections kept by the score threshold of this run",
    }
    write_json(f"{out_dir}/froc.json", doc)
    return doc


class RunSummary:
    """What the run files hold, gathered case by case in the run's case order: summary.json's case
    lists and step times, the rows of the run's CSVs, its COCO results and the FROC's inputs."""

    # summary.json's timing_s step -> CaseOutcome field
    STEPS = (
        ("read_inputs", "read_s"),
        ("prepare_inputs", "prepare_s"),
        ("model_forward", "forward_s"),
        ("write_outputs", "write_s"),
    )

    def __init__(self, class_names: Sequence[str]):
        self.coco = CocoResults(class_names)
        self.done: List[Dict] = []  # summary.json's "cases"
        self.failed: List[Dict] = []
        self.detections: List[Dict] = []
        self.findings: List[Dict] = []
        self.resumed = 0
        self._step_s: Dict[str, List[float]] = {field: [] for _, field in self.STEPS}
        # (input case name, detections.json document) of every finished case
        self._froc_cases: List[Tuple[str, Dict]] = []

    def add(self, outcome: CaseOutcome, case_name: str) -> None:
        """One case's outcome; ``case_name``: the input's name for the case, which ground truth
        uses (the case's outputs may carry an anonymous id instead)."""
        # every outcome, a failed one at 0.0 s: the sums are floats even when no case finished
        for _, field in self.STEPS:
            self._step_s[field].append(getattr(outcome, field))
        self.resumed += outcome.resumed
        if outcome.failure is not None:
            self.failed.append(outcome.failure)
            return
        doc = outcome.doc
        self.coco.add_case(doc)
        self.detections += doc["detections"]
        self.findings += doc["findings"]
        self.done.append(done_entry(doc))
        self._froc_cases.append((case_name, doc))

    def write_tables(self, out: OutputDir) -> None:
        """detections.csv, findings.csv, coco_results.json and coco_images.json."""
        write_csv(out.path("detections.csv"), self.detections, DETECTION_COLUMNS)
        write_csv(out.path("findings.csv"), self.findings, FINDING_COLUMNS)
        self.coco.write(out.root)

    def write_froc(
        self, gt: GroundTruth, out_dir: str, fps: Sequence[float], convention: str
    ) -> Optional[Dict]:
        """froc.json and froc.png over the finished cases' slices that ``gt`` annotates; returns
        froc.json's document, None (nothing written) when no predicted slice has ground truth."""
        return _froc(self._froc_cases, gt, out_dir, tuple(fps), convention)

    def document(
        self, ignored: Union[int, List[str]], froc: Optional[Dict], run: Dict[str, float]
    ) -> Dict:
        """summary.json's document; ``ignored``: the files not read (or their number), ``froc``:
        :meth:`write_froc`'s document, ``run``: the run's processes, model_setup and start time."""
        return {
            "cases": self.done,
            "failed": self.failed,
            "ignored": ignored,
            "froc": froc,
            "timing_s": self._timing(run),
        }

    def _timing(self, run: Dict[str, float]) -> Dict[str, float]:
        """summary.json's timing_s: the run's wall time after model construction (rank 0's clock)
        and the time of each step summed over the cases, whichever process did them."""
        steps = {k: round(sum(self._step_s[field]), 3) for k, field in self.STEPS}
        total = time.perf_counter() - run["start"] - run["model_setup"]
        return {
            "processes": run["processes"],
            "model_setup": round(run["model_setup"], 3),
            "total": round(total, 3),
            **steps,
            # one process: how much of the run is the model's (predict_speed.py's target)
            "total_over_forward": (
                round(total / steps["model_forward"], 3)
                if run["processes"] == 1 and steps["model_forward"] > 0
                else None
            ),
        }


def write_run_files(
    cfg,
    plan: RunPlan,
    outcomes: List[CaseOutcome],
    class_names: List[str],
    names: InputNames,
    out: OutputDir,
    opts,
    gt: GroundTruth,
    timing: Dict[str, float],
) -> Dict:
    """The run files (module docstring) from every case's outcome, in the plan's case order:
    the same bytes whoever predicted which case, and whether it was predicted or resumed.
    Returns summary.json's document."""
    run = RunSummary(class_names)
    for o in outcomes:
        run.add(o, plan.cases[o.index].name)
    if run.resumed:
        logger.info(
            f"--resume: {run.resumed} of {len(plan.cases)} case(s) were complete and "
            f"verified in {escape_name(out.given)}; read back, not predicted again"
        )
    run.write_tables(out)
    froc = (
        run.write_froc(gt, out.root, cfg.TEST.FROC_FPS, cfg.TEST.FROC_CONVENTION)
        if opts.gt
        else None
    )
    summary = run.document(
        (
            len(plan.ignored)
            if opts.anonymize_ids
            else [escape_name(names.relative(p)) for p in plan.ignored]
        ),
        froc,
        timing,
    )
    write_json(out.path("summary.json"), summary)
    if opts.report == "html":  # case report: the run's index page
        write_index(out.root, run.done, run.failed, froc)
    if run.failed:
        logger.warning(
            f"{len(run.failed)} case(s) failed: "
            + "; ".join(f"{f['case']} ({f['error']})" for f in run.failed)
        )
    if plan.ignored:
        logger.info(
            f"ignored {len(plan.ignored)} file(s) that are not CT input or not followed"
            + (
                ""
                if opts.anonymize_ids
                else f", e.g. {escape_name(names.relative(plan.ignored[0]))}"
            )
        )
    return summary
