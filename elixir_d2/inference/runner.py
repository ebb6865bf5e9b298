"""Inference runs over cases: read, predict, group into findings, write every output.

Output layout under ``output_dir``::

    <case>/detections.json     geometry, model input size, detections, findings, warnings
    <case>/detections.csv      one row per detection (DETECTION_COLUMNS)
    <case>/findings.csv        one row per 3-D finding (FINDING_COLUMNS)
    <case>/overlays/slice_NNN.png      windowed slice, detections (red) + ground truth (green)
    <case>/relations/slice_NNN.png     with draw_relations: the region_nonlocal graph
    <case>/confidence/slice_NNN.png    with draw_confidence: TRPN's p per level
    <case>/report.html, <case>/report/ with report "html" (default): the case report (.report)
    <case>/findings.mrk.json, detections.mrk.json   3D Slicer ROI markups (:mod:`.slicer_markups`)
    <case>/dicom_sr/sr.dcm             with dicom_sr, DICOM series only: TID 1500 SR, which
                                       carries the patient's identifiers (:mod:`.dicom_sr`)
    detections.csv, findings.csv       all cases together
    coco_results.json, coco_images.json
    froc.png, froc.json                with ground truth: FROC over the slices it annotates
    index.html                         with report "html": the cases, linking to their reports
    summary.json                       cases done, cases that failed (and why), ignored files,
                                       timing

Case folder names are case ids (:mod:`.case_ids`: from file / folder names, sanitised, unique);
every path is checked to stay inside ``output_dir``. Each case folder is written under a
temporary name and renamed when complete; the files above are written then renamed. The last file
written into a case folder is its manifest :data:`CASE_MARKER` (JSON: every file of the folder with
its size and SHA-256, a fingerprint of the settings and of the input). A run refuses a non-empty
``output_dir`` unless ``overwrite``, which removes only what an earlier run wrote there (the files
above, case folders holding :data:`CASE_MARKER`, and temporary entries named as
:func:`elixir_d2.atomic_io.tmp_name` names them), or ``resume``, which keeps every case folder whose
manifest still matches (same settings, same input, every file of the size and hash recorded) and
does the other cases; the run files are rewritten from all case folders, so they equal those of an
uninterrupted run but for timing. Outputs and logs name inputs relative to the input path, or, with
``anonymize_ids``, by sequential ids only (the mapping goes to a separate CSV); every name shown is
escaped (:func:`elixir_d2.cli.escape_name`). Which files are read: :mod:`.discovery`.

Each case is one step (:mod:`.case_step`): its folder written, or read back, and its outcome
returned; the run files (:mod:`.run_files`) are written from the outcomes of all the cases. Several
processes (:mod:`.sharding`): rank 0 finds the cases and prepares the output folder, every rank
predicts its share of the cases into their case folders, and rank 0 writes the run files from all
of them, in the case order one process uses: the same bytes but for summary.json's timing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..atomic_io import atomic_write_text, tmp_target
from ..cli import escape_name
from ..data.deeplesion import read_dl_info
from .case_ids import RUN_FILES, InputNames, OutputDir
from .case_manifest import CASE_MARKER, is_case_folder, settings_fingerprint
from .case_step import INPUT_ERRORS, CaseStep, run_case
from .discovery import discover_cases
from .orientation import DEFAULT_MAX_VOXELS
from .predictor import CTPredictor
from .report import REPORT_FORMATS
from .run_files import CaseOutcome, GroundTruth, RunPlan, write_run_files
from .sharding import run_on_every_rank, run_on_main, shard_indices
from .volume_io import CaseSource

logger = logging.getLogger(__name__)

__all__ = [
    "PredictOptions",
    "load_ground_truth",
    "run_prediction",
    "INPUT_ERRORS",
    "OutputNotEmptyError",
    "RunInterrupted",
    "CASE_MARKER",
]

# A case folder's temporary name: a sanitised case id (case_ids), maybe with its ~N suffix.
_CASE_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(~[0-9]+)?")


class OutputNotEmptyError(ValueError):
    """The output folder holds files and the run was not told it may replace them."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT / Ctrl-C during a run: ``done`` of ``total`` cases have complete folders."""

    def __init__(self, done: int, total: int):
        super().__init__(f"interrupted: {done} of {total} cases done; rerun with --resume")
        self.done, self.total = done, total


@dataclass
class PredictOptions:
    batch_size: int = 4
    spacing: Optional[float] = None  # mm/px for DeepLesion folders (else DL_info.csv)
    slice_interval: Optional[float] = None  # mm for DeepLesion folders (else DL_info.csv)
    view_window: Tuple[float, float] = (-175.0, 275.0)
    # "detections" (slices with a detection or ground truth), "all", "none"
    overlays: str = "detections"
    report: str = "html"  # "html": report.html per case + index.html; "none"
    draw_relations: bool = False
    draw_confidence: bool = False
    group_iou: float = 0.3
    group_gap: int = 1
    gt: Optional[str] = None
    progress: bool = True
    max_voxels: Optional[int] = DEFAULT_MAX_VOXELS  # larger cases are refused from their header
    overwrite: bool = False  # replace what an earlier run wrote in the output folder
    resume: bool = False  # keep the verified case folders of an interrupted run, do the rest
    anonymize_ids: Optional[str] = None  # CSV path: sequential case ids, the mapping written there
    dicom_sr: bool = False  # DICOM series: <case>/dicom_sr/sr.dcm (carries patient identifiers)


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
            per[les["name_slice"]] = np.vstack(
                [per.get(les["name_slice"], np.zeros((0, 4))), [les["bbox"]]]
            )
        if noisy:
            logger.info(
                f"{path}: {noisy} lesion(s) flagged Possibly_noisy left out of the ground truth"
            )
        return gt
    with PathManager.open(path, "r", encoding="utf-8") as f:
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
            arr = (
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
                if len(boxes)
                else np.zeros((0, 4))
            )
            if arr.size and not np.all(arr[:, 2:] > arr[:, :2]):
                raise ValueError(
                    f"{path}: case {case!r} slice {s}: boxes must be [x1, y1, x2, y2] "
                    "with x2 > x1, y2 > y1"
                )
            try:
                gt.setdefault(case, {})[int(s)] = arr
            except ValueError:
                raise ValueError(
                    f"{path}: case {case!r}: slice key {s!r} is not an integer"
                ) from None
    return gt


def _is_our_tmp(root: str, entry: str) -> bool:
    """A temporary entry this tool's writers leave when killed: a run file or a case folder under
    :func:`elixir_d2.atomic_io.tmp_name`'s exact naming, nothing a user named alike."""
    target = tmp_target(entry)
    path = os.path.join(root, entry)
    if target is None or os.path.islink(path):
        return False
    if target in RUN_FILES:
        return os.path.isfile(path)
    return bool(_CASE_ID_RE.fullmatch(target)) and os.path.isdir(path)


def _prepare_output(out: OutputDir, overwrite: bool, resume: bool = False) -> None:
    """Refuse a non-empty output folder; or (``overwrite``) remove what an earlier run wrote;
    or (``resume``) remove only its temporary entries and run files, which are rewritten."""
    os.makedirs(out.root, exist_ok=True)
    entries = sorted(os.listdir(out.root))
    if not entries:
        return
    if not (overwrite or resume):
        raise OutputNotEmptyError(
            f"--output {escape_name(out.given)} is not empty ({len(entries)} entries, e.g. "
            f"{escape_name(entries[0])}); pass --overwrite to replace what an earlier run wrote "
            "there, --resume to finish an interrupted run, or give an empty folder"
        )
    for e in entries:
        path = os.path.join(out.root, e)
        if e in RUN_FILES and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
        elif overwrite and is_case_folder(path):
            shutil.rmtree(path)
        elif _is_our_tmp(out.root, e):  # a killed run's unfinished case folder or file
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _case_ids(
    cases: List[CaseSource], names: InputNames, opts: PredictOptions, out: OutputDir
) -> List[str]:
    """Output ids of the cases; anonymised: case_0001 ... with the mapping written to its CSV."""
    if not opts.anonymize_ids:
        return [c.name for c in cases]
    if out.contains(opts.anonymize_ids):
        raise OutputNotEmptyError(
            f"--anonymize-ids {escape_name(opts.anonymize_ids)}: keep the "
            f"id mapping outside --output {escape_name(out.given)}, which "
            "is meant to be shared"
        )
    ids = [f"case_{i:04d}" for i in range(1, len(cases) + 1)]
    rows = [
        {"case_id": i, "input": escape_name(names.relative(c.path))} for i, c in zip(ids, cases)
    ]
    os.makedirs(os.path.dirname(os.path.abspath(opts.anonymize_ids)), exist_ok=True)
    atomic_write_text(opts.anonymize_ids, InputNames.mapping_csv(rows))
    return ids


def run_prediction(
    cfg, input_path: str, output_dir: str, opts: Optional[PredictOptions] = None, model=None
) -> Optional[Dict]:
    """Predict every case under ``input_path`` and write the outputs (module docstring).

    A single case that cannot be read raises its error; in a run over several cases a bad case
    (unreadable, too large, out of memory, a write that failed) is skipped, logged, and listed
    under ``failed`` in the returned summary and summary.json, and the other cases complete.
    With ``opts.resume`` the case folders an earlier run finished (verified) are read back instead
    of predicted again. SIGINT raises :class:`RunInterrupted` (how many cases are done) once the
    case being written is cleaned up.

    Under several processes (:mod:`.sharding`; ``predict_net.py --num-gpus``) every rank calls
    this: rank 0 finds the cases and prepares ``output_dir``, each rank predicts its share of the
    cases into their case folders, and rank 0 writes the run files from every rank's cases, in
    the order one process would have used, and returns the summary (the other ranks: None).
    """
    opts = opts or PredictOptions()
    if opts.report not in REPORT_FORMATS:
        raise ValueError(f"report must be one of {REPORT_FORMATS}, got {opts.report!r}")
    if opts.resume and opts.overwrite:
        raise ValueError(
            "--resume keeps what an earlier run finished, --overwrite removes it: pass one of them"
        )
    names = InputNames(input_path, anonymize=bool(opts.anonymize_ids))
    out = OutputDir(output_dir)
    t_start = time.perf_counter()
    plan = run_on_main(lambda: _plan_run(input_path, names, out, opts))
    world, rank = comm.get_world_size(), comm.get_rank()
    mine = shard_indices(len(plan.cases), world, rank)
    gt = load_ground_truth(opts.gt) if opts.gt else {}
    shard = _Shard(cfg, plan, mine, names, out, opts, gt, model)
    try:
        # one gather: every rank's outcomes, with rank 0's class names and model set-up time
        shards = run_on_every_rank(shard)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(shard.done, len(plan.cases)) from None
    class_names, setup_s, _ = shards[0]
    ordered = sorted((o for *_, outcomes in shards for o in outcomes), key=lambda o: o.index)
    timing = {"processes": world, "model_setup": setup_s, "start": t_start}
    summary = run_on_main(
        lambda: write_run_files(cfg, plan, ordered, class_names, names, out, opts, gt, timing)
    )
    return summary if comm.is_main_process() else None


def _plan_run(input_path: str, names: InputNames, out: OutputDir, opts: PredictOptions) -> RunPlan:
    """Find the cases, refuse what cannot run, prepare the output folder, name the cases."""
    cases, ignored = discover_cases(input_path)
    if opts.dicom_sr:  # refused before anything is written
        from .dicom_sr import check_sr_request

        check_sr_request(cases, bool(opts.anonymize_ids))
    _prepare_output(out, opts.overwrite, opts.resume)
    return RunPlan(cases, ignored, _case_ids(cases, names, opts, out))


class _Shard:
    """This process's share of the run: the cases at ``indices`` of the plan, each through
    :func:`.case_step.run_case`, in order. ``outcomes`` holds the cases finished so far, so that
    an interrupted run can say how many are done."""

    def __init__(
        self,
        cfg,
        plan: RunPlan,
        indices: List[int],
        names: InputNames,
        out: OutputDir,
        opts: PredictOptions,
        gt: GroundTruth,
        model,
    ):
        self.cfg, self.plan, self.indices, self.names, self.out = cfg, plan, indices, names, out
        self.opts, self.gt, self.model = opts, gt, model
        self.outcomes: List[CaseOutcome] = []

    @property
    def done(self) -> int:
        """This share's cases with a complete folder in the output (what --resume keeps). Read
        from the folders, not from ``outcomes``: an interrupt can land after a case folder is
        renamed into place and before its outcome is recorded."""
        return sum(is_case_folder(self.out.path(self.plan.ids[i])) for i in self.indices)

    def __call__(self) -> Tuple[List[str], float, List[CaseOutcome]]:
        """Build the model, run every case of the share; returns the model's class names, the
        seconds its construction took and the cases' outcomes."""
        cfg, opts, plan = self.cfg, self.opts, self.plan
        settings = settings_fingerprint(cfg, opts)
        t_setup = time.perf_counter()
        predictor = CTPredictor(
            cfg,
            self.model,
            batch_size=opts.batch_size,
            capture_relations=opts.draw_relations,
            capture_confidence=opts.draw_confidence,
        )
        setup_s = time.perf_counter() - t_setup
        step = CaseStep(
            cfg,
            predictor,
            self.names,
            self.out,
            opts,
            settings,
            input_root=os.path.realpath(self.names.root),
            single=len(plan.cases) == 1,
        )
        world, rank = comm.get_world_size(), comm.get_rank()
        bar = tqdm(
            self.indices,
            desc="cases" if world == 1 else f"cases, rank {rank}/{world}",
            unit="case",
            position=comm.get_local_rank(),
            disable=not opts.progress or step.single,
        )
        for index in bar:
            case = plan.cases[index]
            # ground truth names cases as the input does, not by anonymous id
            self.outcomes.append(
                run_case(step, index, case, plan.ids[index], self.gt.get(case.name, {}))
            )
        return predictor.class_names, setup_s, self.outcomes
