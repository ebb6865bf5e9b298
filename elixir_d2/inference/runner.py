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

Several processes (:mod:`.sharding`): rank 0 finds the cases and prepares the output folder, every
rank predicts its share of the cases into their case folders, and rank 0 writes the run files
(:mod:`.run_files`) from all of them, in the case order one process uses: the same bytes but for
summary.json's timing.
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

from ..atomic_io import atomic_write_text, build_dir_atomically, tmp_target
from ..cli import escape_name
from ..data.ct_mapper import CTSliceError
from ..data.deeplesion import DeepLesionFormatError, read_dl_info
from ..visualization import (
    draw_confidence_map,
    draw_detections,
    draw_relation_graph,
    window_for_display,
)
from .case_ids import RUN_FILES, InputNames, OutputDir, UnsafeOutputError
from .case_manifest import (
    CASE_MARKER,
    input_fingerprint,
    is_case_folder,
    settings_fingerprint,
    verified_case,
    write_manifest,
)
from .discovery import check_case_paths, discover_cases
from .grouping import group_detections
from .orientation import DEFAULT_MAX_VOXELS
from .outputs import (
    DETECTION_COLUMNS,
    FINDING_COLUMNS,
    case_summary,
    detection_rows,
    finding_rows,
    flat_detections,
    write_csv,
    write_json,
)
from .predictor import CTPredictor, SlicePrediction, VolumePrediction
from .report import REPORT_FORMATS, write_case_report
from .run_files import CaseOutcome, GroundTruth, RunPlan, write_run_files
from .sharding import run_on_every_rank, run_on_main, shard_indices
from .slicer_markups import write_case_markups
from .volume_io import CaseSource, CTInputError, read_case

logger = logging.getLogger(__name__)

__all__ = ["PredictOptions", "load_ground_truth", "run_prediction", "INPUT_ERRORS",
           "OutputNotEmptyError", "RunInterrupted", "CASE_MARKER"]

# Errors that make one case unusable; a folder run lists them and goes on.
INPUT_ERRORS = (CTInputError, CTSliceError, DeepLesionFormatError, OSError)
# Out of memory on one huge case, or a runtime failure in the model on it, fails that case only.
CASE_ERRORS = INPUT_ERRORS + (MemoryError, RuntimeError, UnsafeOutputError)
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
            per[les["name_slice"]] = np.vstack([per.get(les["name_slice"], np.zeros((0, 4))),
                                                [les["bbox"]]])
        if noisy:
            logger.info(f"{path}: {noisy} lesion(s) flagged Possibly_noisy left out of the ground "
                        "truth")
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
            arr = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes)
                   else np.zeros((0, 4)))
            if arr.size and not np.all(arr[:, 2:] > arr[:, :2]):
                raise ValueError(f"{path}: case {case!r} slice {s}: boxes must be [x1, y1, x2, y2] "
                                 "with x2 > x1, y2 > y1")
            try:
                gt.setdefault(case, {})[int(s)] = arr
            except ValueError:
                raise ValueError(f"{path}: case {case!r}: slice key {s!r} is not an "
                                 "integer") from None
    return gt


def _slice_drawer(case_dir: str, name: str, view_hu, gt: Dict[int, np.ndarray],
                  opts: PredictOptions):
    """on_slice callback: draws one slice's pictures as soon as it is predicted, then drops the
    relation matrix, proposals and confidence maps it held (P x P per slice would add up)."""
    counts = {"drawn": 0}

    def draw(sp: SlicePrediction) -> None:
        gt_boxes = gt.get(sp.slice_number)
        wanted = opts.overlays == "all" or len(sp.scores) or gt_boxes is not None
        relations = opts.draw_relations and sp.relations is not None and len(sp.proposals)
        confidence = opts.draw_confidence and sp.conf_maps
        file = f"slice_{sp.slice_number:03d}.png"
        if (wanted and opts.overlays != "none") or relations or confidence:
            grey = window_for_display(view_hu(sp.slice_number), opts.view_window)
            if wanted and opts.overlays != "none":
                os.makedirs(f"{case_dir}/overlays", exist_ok=True)
                draw_detections(grey, sp.boxes, sp.scores, sp.type_names, gt_boxes,
                                f"{case_dir}/overlays/{file}")
                counts["drawn"] += 1
            if relations:
                os.makedirs(f"{case_dir}/relations", exist_ok=True)
                draw_relation_graph(grey, sp.proposals, sp.relations,
                                    f"{case_dir}/relations/{file}", scores=sp.proposal_scores,
                                    title=f"{name} slice {sp.slice_number}")
            if confidence:
                os.makedirs(f"{case_dir}/confidence", exist_ok=True)
                draw_confidence_map(grey, sp.conf_maps, f"{case_dir}/confidence/{file}",
                                    eps=sp.conf_eps)
        sp.relations = sp.proposals = sp.proposal_scores = None
        sp.conf_maps = sp.conf_eps = None

    return draw, counts


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


def _write_case(case_dir: str, pred: VolumePrediction, dets: List[Dict], findings,
                names: InputNames, case: CaseSource) -> Dict:
    """The case's files (but the manifest); returns its detections.json document as read back."""
    vol = pred.volume
    vol.warnings = [escape_name(names.scrub(w, case.path, vol.name)) for w in vol.warnings]
    doc = case_summary(pred, dets, findings)
    write_json(f"{case_dir}/detections.json", doc)
    write_csv(f"{case_dir}/detections.csv", dets, DETECTION_COLUMNS)
    write_csv(f"{case_dir}/findings.csv", finding_rows(vol.name, findings), FINDING_COLUMNS)
    return json.loads(json.dumps(doc))  # what a resumed run reads back: the same values


def _case_ids(cases: List[CaseSource], names: InputNames, opts: PredictOptions,
              out: OutputDir) -> List[str]:
    """Output ids of the cases; anonymised: case_0001 ... with the mapping written to its CSV."""
    if not opts.anonymize_ids:
        return [c.name for c in cases]
    if out.contains(opts.anonymize_ids):
        raise OutputNotEmptyError(f"--anonymize-ids {escape_name(opts.anonymize_ids)}: keep the "
                                  f"id mapping outside --output {escape_name(out.given)}, which "
                                  "is meant to be shared")
    ids = [f"case_{i:04d}" for i in range(1, len(cases) + 1)]
    rows = [{"case_id": i, "input": escape_name(names.relative(c.path))}
            for i, c in zip(ids, cases)]
    os.makedirs(os.path.dirname(os.path.abspath(opts.anonymize_ids)), exist_ok=True)
    atomic_write_text(opts.anonymize_ids, InputNames.mapping_csv(rows))
    return ids


def run_prediction(cfg, input_path: str, output_dir: str, opts: Optional[PredictOptions] = None,
                   model=None) -> Optional[Dict]:
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
        raise ValueError("--resume keeps what an earlier run finished, --overwrite removes it: "
                         "pass one of them")
    names = InputNames(input_path, anonymize=bool(opts.anonymize_ids))
    out = OutputDir(output_dir)
    t_start = time.perf_counter()
    plan = run_on_main(lambda: _plan_run(input_path, names, out, opts))
    world, rank = comm.get_world_size(), comm.get_rank()
    mine = shard_indices(len(plan.cases), world, rank)
    gt = load_ground_truth(opts.gt) if opts.gt else {}
    outcomes: List[CaseOutcome] = []
    try:
        # one gather: every rank's outcomes, with rank 0's class names and model set-up time
        shards = run_on_every_rank(
            lambda: (*_predict_cases(cfg, plan, mine, names, out, opts, gt, model, outcomes),
                     outcomes))
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(sum(o.doc is not None for o in outcomes), len(plan.cases)) from None
    class_names, setup_s, _ = shards[0]
    ordered = sorted((o for *_, shard in shards for o in shard), key=lambda o: o.index)
    timing = {"processes": world, "model_setup": setup_s, "start": t_start}
    summary = run_on_main(lambda: write_run_files(cfg, plan, ordered, class_names, names, out,
                                                  opts, gt, timing))
    return summary if comm.is_main_process() else None


def _plan_run(input_path: str, names: InputNames, out: OutputDir,
              opts: PredictOptions) -> RunPlan:
    """Find the cases, refuse what cannot run, prepare the output folder, name the cases."""
    cases, ignored = discover_cases(input_path)
    if opts.dicom_sr:  # refused before anything is written
        from .dicom_sr import check_sr_request
        check_sr_request(cases, bool(opts.anonymize_ids))
    _prepare_output(out, opts.overwrite, opts.resume)
    return RunPlan(cases, ignored, _case_ids(cases, names, opts, out))


def _predict_cases(cfg, plan: RunPlan, indices: List[int], names: InputNames, out: OutputDir,
                   opts: PredictOptions, gt: GroundTruth, model,
                   outcomes: List[CaseOutcome]) -> Tuple[List[str], float]:
    """Predict (or, resuming, verify and read back) the cases at ``indices`` of the plan, each
    into its complete case folder; ``outcomes`` fills as cases finish. Returns the model's class
    names and the seconds its construction took."""
    settings = settings_fingerprint(cfg, opts)
    t_setup = time.perf_counter()
    predictor = CTPredictor(cfg, model, batch_size=opts.batch_size,
                            capture_relations=opts.draw_relations,
                            capture_confidence=opts.draw_confidence)
    setup_s = time.perf_counter() - t_setup
    input_root = os.path.realpath(names.root)
    context_mm = max(abs(o) for o in predictor.mapper.offsets_mm)
    world, rank = comm.get_world_size(), comm.get_rank()
    single = len(plan.cases) == 1
    bar = tqdm(indices, desc="cases" if world == 1 else f"cases, rank {rank}/{world}",
               unit="case", position=comm.get_local_rank(),
               disable=not opts.progress or single)
    for index in bar:
        case, case_id = plan.cases[index], plan.ids[index]
        # ground truth names cases as the input does, not by anonymous id
        case_gt = gt.get(case.name, {})
        shown = escape_name(names.shown(case.path, case_id))
        outcome = CaseOutcome(index)
        try:
            check_case_paths(case, input_root)
            case_dir = out.path(case_id)
            input_fp = input_fingerprint(case, shown)
            outcome.doc = verified_case(case_dir, settings, input_fp) if opts.resume else None
            if outcome.doc is not None:
                outcome.resumed = True
            elif os.path.lexists(case_dir) and not is_case_folder(case_dir):
                raise UnsafeOutputError(f"{escape_name(case_id)} in --output "
                                        f"{escape_name(out.given)} was not written by this tool; "
                                        "move it away")
            else:
                t0 = time.perf_counter()
                pred, outcome.doc, outcome.read_s = _predict_case(
                    cfg, predictor, case, case_id, case_dir, case_gt, context_mm, names, opts,
                    settings, input_fp)
                outcome.forward_s, outcome.prepare_s = pred.forward_s, pred.prepare_s
                outcome.write_s = (time.perf_counter() - t0 - outcome.read_s - pred.forward_s
                                   - pred.prepare_s)
                for w in pred.volume.warnings:
                    logger.warning(w)
                pred = None  # release the volume
        except CASE_ERRORS as e:
            if single:
                raise
            error = escape_name(names.scrub(str(e) or type(e).__name__, case.path, case_id))
            logger.warning(f"skipping case {escape_name(case_id)}: {error}")
            outcome.doc, outcome.failure = None, {"case": case_id, "path": shown, "error": error}
        outcomes.append(outcome)
    return predictor.class_names, setup_s


def _predict_case(cfg, predictor: CTPredictor, case: CaseSource, case_id: str, case_dir: str,
                  case_gt: Dict[int, np.ndarray], context_mm: float, names: InputNames,
                  opts: PredictOptions, settings: str,
                  input_fp: Dict) -> Tuple[VolumePrediction, Dict, float]:
    """Read one case, predict it and write its complete case folder (atomically); returns the
    prediction, the detections.json document and the seconds reading took."""
    t0 = time.perf_counter()
    volume = read_case(case, opts.spacing, opts.slice_interval, context_mm=context_mm,
                       max_voxels=opts.max_voxels)
    volume.name = case_id
    read_s = time.perf_counter() - t0

    def build(tmp_dir: str) -> Dict:
        draw, counts = _slice_drawer(tmp_dir, case_id, lambda n: volume.hu[volume.rows[n]],
                                     case_gt, opts)
        with tqdm(total=len(volume.slices_to_predict()), desc=case_id, unit="slice",
                  leave=False, disable=not opts.progress or comm.get_world_size() > 1) as bar:
            pred = predictor.predict_volume(volume, progress=bar, on_slice=draw)
        slices, boxes, scores = flat_detections(pred)
        findings = group_detections(slices, boxes, scores, volume.spacing, volume.slice_interval,
                                    iou_thresh=opts.group_iou, max_gap=opts.group_gap)
        finding_of = {i: f.finding_id for f in findings for i in f.members}
        dets = detection_rows(pred, finding_of)
        written = _write_case(tmp_dir, pred, dets, findings, names, case)
        # --- case report (report.py): before the manifest, which then lists it
        if opts.report == "html":
            write_case_report(tmp_dir, written, volume, case_gt if opts.gt else None,
                              tuple(cfg.TEST.FROC_FPS), cfg.TEST.FROC_CONVENTION)
        # --- end case report
        # --- Slicer markups (every case), DICOM SR (opt-in)
        write_case_markups(tmp_dir, volume, findings, dets)
        if opts.dicom_sr and volume.kind == "dicom":
            from .dicom_sr import write_case_sr
            write_case_sr(tmp_dir, volume, findings)
        # --- end markups / SR ---
        write_manifest(tmp_dir, settings, input_fp)  # last: the folder is complete
        return {"pred": pred, "doc": written}

    built = build_dir_atomically(case_dir, build, None)
    return built["pred"], built["doc"], read_s


