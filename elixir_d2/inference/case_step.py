"""One case of a predict_net run (the per-case step of :func:`.runner.run_prediction`): read it,
predict it and write its complete case folder, or, resuming, verify and read back the folder an
earlier run finished; the result is the case's :class:`~.run_files.CaseOutcome`, which is all the
run files (:mod:`.run_files`) need of it.

Every rank calls :func:`run_case` for each case of its share with a :class:`CaseStep`, what the
cases of a run have in common (the model, the options, the output folder), set up once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from detectron2.utils import comm

from ..atomic_io import build_dir_atomically
from ..cli import escape_name
from ..data.ct_mapper import CTSliceError
from ..data.deeplesion import DeepLesionFormatError
from ..visualization import (
    draw_confidence_map,
    draw_detections,
    draw_relation_graph,
    window_for_display,
)
from .case_ids import InputNames, OutputDir, UnsafeOutputError
from .case_manifest import input_fingerprint, is_case_folder, verified_case, write_manifest
from .discovery import check_case_paths
from .grouping import Finding, group_detections
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
from .report import write_case_report
from .run_files import CaseOutcome
from .slicer_markups import write_case_markups
from .volume_io import CaseSource, CTInputError, CTVolume, read_case

if TYPE_CHECKING:  # runner imports this module
    from .runner import PredictOptions

logger = logging.getLogger(__name__)

__all__ = ["CaseStep", "SliceDrawer", "run_case", "INPUT_ERRORS", "CASE_ERRORS"]

# Errors that make one case unusable; a folder run lists them and goes on.
INPUT_ERRORS = (CTInputError, CTSliceError, DeepLesionFormatError, OSError)
# Out of memory on one huge case, or a runtime failure in the model on it, fails that case only.
CASE_ERRORS = INPUT_ERRORS + (MemoryError, RuntimeError, UnsafeOutputError)


@dataclass(frozen=True)
class CaseStep:
    """What every case of a run needs, set up once per process."""

    cfg: Any
    predictor: CTPredictor
    names: InputNames
    out: OutputDir
    opts: PredictOptions
    settings: str  # case_manifest.settings_fingerprint of cfg and opts
    input_root: str  # the input's real path: a case's files must stay inside it
    single: bool  # the run's only case: its error is the run's, not a failed case

    @property
    def context_mm(self) -> float:
        """How far from a key slice the model's input reaches: what a case must hold around it."""
        return max(abs(o) for o in self.predictor.mapper.offsets_mm)


def run_case(
    step: CaseStep, index: int, case: CaseSource, case_id: str, case_gt: Mapping[int, np.ndarray]
) -> CaseOutcome:
    """The outcome of the case at ``index`` of the run, output as ``case_id``: its folder
    predicted and written, or (``--resume``) verified and read back; ``case_gt``: its ground truth
    slices, drawn on its overlays and read by its report. A case that cannot be done is a failed
    outcome, logged, unless it is the run's only case, whose error is raised."""
    names, out = step.names, step.out
    shown = escape_name(names.shown(case.path, case_id))
    try:
        check_case_paths(case, step.input_root)
        case_dir = out.path(case_id)
        input_fp = input_fingerprint(case, shown)
        doc = verified_case(case_dir, step.settings, input_fp) if step.opts.resume else None
        if doc is not None:
            return CaseOutcome(index, doc=doc, resumed=True)
        if os.path.lexists(case_dir) and not is_case_folder(case_dir):
            raise UnsafeOutputError(
                f"{escape_name(case_id)} in --output "
                f"{escape_name(out.given)} was not written by this tool; "
                "move it away"
            )
        return _predict_case(step, index, case, case_id, case_dir, case_gt, input_fp)
    except CASE_ERRORS as e:
        if step.single:
            raise
        error = escape_name(names.scrub(str(e) or type(e).__name__, case.path, case_id))
        logger.warning(f"skipping case {escape_name(case_id)}: {error}")
        return CaseOutcome(index, failure={"case": case_id, "path": shown, "error": error})


def _predict_case(
    step: CaseStep,
    index: int,
    case: CaseSource,
    case_id: str,
    case_dir: str,
    case_gt: Mapping[int, np.ndarray],
    input_fp: Dict,
) -> CaseOutcome:
    """Read one case, predict it and write its complete case folder (atomically)."""
    opts = step.opts
    t0 = time.perf_counter()
    volume = read_case(
        case,
        opts.spacing,
        opts.slice_interval,
        context_mm=step.context_mm,
        max_voxels=opts.max_voxels,
    )
    # The volume was read under the input's name; its outputs carry the case id (maybe anonymous).
    volume.name = case_id
    read_s = time.perf_counter() - t0
    build = functools.partial(
        _write_case_folder, step=step, case=case, volume=volume, case_gt=case_gt, input_fp=input_fp
    )
    built = build_dir_atomically(case_dir, build, None)
    pred, doc = built["pred"], built["doc"]
    forward_s, prepare_s = pred.forward_s, pred.prepare_s
    outcome = CaseOutcome(
        index,
        doc=doc,
        read_s=read_s,
        prepare_s=prepare_s,
        forward_s=forward_s,
        write_s=time.perf_counter() - t0 - read_s - forward_s - prepare_s,
    )
    for w in doc["warnings"]:  # as written: relative to the input, or anonymised
        logger.warning(w)
    return outcome


def _write_case_folder(
    tmp_dir: str,
    step: CaseStep,
    case: CaseSource,
    volume: CTVolume,
    case_gt: Mapping[int, np.ndarray],
    input_fp: Dict,
) -> Dict:
    """build_dir_atomically's ``build``: the case folder's every file into ``tmp_dir``, the
    manifest last; returns the prediction and the detections.json document as read back."""
    opts = step.opts
    draw = SliceDrawer(tmp_dir, volume, case_gt, opts)
    with tqdm(
        total=len(volume.slices_to_predict()),
        desc=volume.name,
        unit="slice",
        leave=False,
        disable=not opts.progress or comm.get_world_size() > 1,
    ) as bar:
        pred = step.predictor.predict_volume(volume, progress=bar, on_slice=draw)
    slices, boxes, scores = flat_detections(pred)
    findings = group_detections(
        slices,
        boxes,
        scores,
        volume.spacing,
        volume.slice_interval,
        iou_thresh=opts.group_iou,
        max_gap=opts.group_gap,
    )
    finding_of = {i: f.finding_id for f in findings for i in f.members}
    dets = detection_rows(pred, finding_of)
    written = _write_case(tmp_dir, pred, dets, findings, step.names, case)
    # the case report before the manifest, which then lists it
    if opts.report == "html":
        write_case_report(
            tmp_dir,
            written,
            volume,
            case_gt if opts.gt else None,
            tuple(step.cfg.TEST.FROC_FPS),
            step.cfg.TEST.FROC_CONVENTION,
        )
    write_case_markups(tmp_dir, volume, findings, dets)
    if opts.dicom_sr and volume.kind == "dicom":
        from .dicom_sr import write_case_sr

        write_case_sr(tmp_dir, volume, findings)
    write_manifest(tmp_dir, step.settings, input_fp)  # last: the folder is complete
    return {"pred": pred, "doc": written}


def _write_case(
    case_dir: str,
    pred: VolumePrediction,
    dets: List[Dict],
    findings: Sequence[Finding],
    names: InputNames,
    case: CaseSource,
) -> Dict:
    """The case's files (but the manifest); returns its detections.json document as read back."""
    vol = pred.volume
    doc = case_summary(pred, dets, findings)
    # warnings name the input as the outputs show it (relative to the input, or anonymised)
    doc["warnings"] = [escape_name(names.scrub(w, case.path, vol.name)) for w in vol.warnings]
    write_json(f"{case_dir}/detections.json", doc)
    write_csv(f"{case_dir}/detections.csv", dets, DETECTION_COLUMNS)
    write_csv(f"{case_dir}/findings.csv", finding_rows(vol.name, findings), FINDING_COLUMNS)
    return json.loads(json.dumps(doc))  # what a resumed run reads back: the same values


@dataclass(frozen=True)
class SliceDrawer:
    """predict_volume's ``on_slice`` callback: draws one slice's pictures into ``case_dir`` as soon
    as it is predicted (overlay with the ground truth ``gt``, relation graph, confidence maps, as
    ``opts`` asks), then drops the relation matrix, proposals and confidence maps the slice held
    (P x P per slice would add up over a volume)."""

    case_dir: str
    volume: CTVolume
    gt: Mapping[int, np.ndarray]
    opts: PredictOptions

    def __call__(self, sp: SlicePrediction) -> None:
        opts, case_dir = self.opts, self.case_dir
        gt_boxes = self.gt.get(sp.slice_number)
        wanted = opts.overlays == "all" or len(sp.scores) or gt_boxes is not None
        relations = opts.draw_relations and sp.relations is not None and len(sp.proposals)
        confidence = opts.draw_confidence and sp.conf_maps
        file = f"slice_{sp.slice_number:03d}.png"
        if (wanted and opts.overlays != "none") or relations or confidence:
            hu = self.volume.hu[self.volume.rows[sp.slice_number]]
            grey = window_for_display(hu, opts.view_window)
            if wanted and opts.overlays != "none":
                os.makedirs(f"{case_dir}/overlays", exist_ok=True)
                draw_detections(
                    grey,
                    sp.boxes,
                    sp.scores,
                    sp.type_names,
                    gt_boxes,
                    f"{case_dir}/overlays/{file}",
                )
            if relations:
                os.makedirs(f"{case_dir}/relations", exist_ok=True)
                draw_relation_graph(
                    grey,
                    sp.proposals,
                    sp.relations,
                    f"{case_dir}/relations/{file}",
                    scores=sp.proposal_scores,
                    title=f"{self.volume.name} slice {sp.slice_number}",
                )
            if confidence:
                os.makedirs(f"{case_dir}/confidence", exist_ok=True)
                draw_confidence_map(
                    grey, sp.conf_maps, f"{case_dir}/confidence/{file}", eps=sp.conf_eps
                )
        sp.relations = sp.proposals = sp.proposal_scores = None
        sp.conf_maps = sp.conf_eps = None
