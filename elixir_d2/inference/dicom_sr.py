"""DICOM Structured Report of the findings of a DICOM series (``--dicom-sr``), written with
highdicom: one Comprehensive 3D SR per series holding a TID 1500 Measurement Report.

Each 3-D finding is one Planar ROI measurement group: its box on the key slice (the best-scoring
one) as a closed POLYLINE in that source image's pixel coordinates (SCOORD, referencing the
image's SOP Instance UID; DICOM's convention: (0, 0) is the top-left corner of the top-left pixel),
its long and short axis in mm (SCT 103339001 / 103340004: the ``largest_diameter_mm`` and
``short_axis_mm`` of findings.csv) and the detector's score (DCM 111012 "Certainty of Finding",
unit "1": the raw score, not a calibrated probability). When the key slice is no source image (a
sagittal or coronal series, read as axial slices after the LPS reorientation) the box is written as
a closed POLYGON in patient coordinates (SCOORD3D, the series' Frame of Reference) instead.

The SR copies the Patient and Study modules of the source series by design: it is meant to be
filed with the patient's study. It is therefore opt-in, written to its own subfolder
(``<case>/dicom_sr/sr.dcm``), and refused with ``--anonymize-ids``; every other output stays free
of identifiers. The source headers are read here, when the SR is written, and nowhere else.
"""

from __future__ import annotations

import logging
import os
from typing import List, Sequence

import numpy as np

from .grouping import Finding
from .volume_io import CaseSource, CTInputError, CTVolume

logger = logging.getLogger(__name__)

__all__ = ["SR_DIR", "SR_FILE", "DicomSRError", "check_sr_request", "write_case_sr"]

SR_DIR, SR_FILE = "dicom_sr", "sr.dcm"
_SR_SERIES_NUMBER = 900
# A key-slice corner within this fraction of the slice interval of a source image plane lies on it.
_PLANE_TOL = 0.1


class DicomSRError(ValueError):
    """``--dicom-sr`` cannot be honoured for this run (no highdicom, no DICOM input, ...)."""


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise DicomSRError(
            "--dicom-sr needs highdicom: pip install 'elixir_d2[dicom-sr]' (or "
            "pip install highdicom)"
        ) from None
    return highdicom


def check_sr_request(cases: Sequence[CaseSource], anonymize: bool) -> None:
    """Refuse ``--dicom-sr`` up front when it cannot be written (highdicom missing, identifiers
    asked to be hidden, no DICOM series in the input); warn about cases that get no SR."""
    _highdicom()
    if anonymize:
        raise DicomSRError(
            "--dicom-sr writes the patient's identifiers (the SR is filed with the "
            "patient's study); it cannot be combined with --anonymize-ids"
        )
    others = [c for c in cases if c.kind != "dicom"]
    if cases and len(others) == len(cases):
        raise DicomSRError(
            "--dicom-sr: the input holds no DICOM series (an SR references DICOM "
            "images; NIfTI volumes and PNG folders get findings.mrk.json only)"
        )
    if others:
        logger.warning(f"--dicom-sr: {len(others)} case(s) are not DICOM series and get no SR")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("elixir_d2")
    except PackageNotFoundError:  # a source checkout that was never pip-installed
        return "unknown"


def _corners(box: Sequence[float]) -> np.ndarray:
    """Closed outline of an XYXY box: 5 (x, y) points, the first repeated last."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])


def _region(hd, vol: CTVolume, f: Finding, sources: List, frame_uid: str):
    """The finding's key-slice box as an SCOORD on the source image holding that plane, else as
    an SCOORD3D in patient coordinates."""
    lps = np.array([vol.physical_point(x, y, f.best_slice) for x, y in _corners(f.best_box)])
    best, off = None, np.inf
    for ds in sources:
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        dist = float(np.max(np.abs((lps - ipp) @ np.cross(iop[:3], iop[3:]))))
        if dist < off:
            best, off = (ds, ipp, iop), dist
    if best is not None and off <= _PLANE_TOL * vol.slice_interval:
        ds, ipp, iop = best
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        # IPP is the centre of pixel (0, 0), whose top-left corner is SCOORD (0, 0).
        cols = (lps - ipp) @ iop[:3] / col_mm + 0.5
        rows = (lps - ipp) @ iop[3:] / row_mm + 0.5
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.stack([cols, rows], axis=1),
            source_image=hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID),
        )
    lps[-1] = lps[0]  # closed exactly, whatever the rounding
    return hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
        graphic_data=lps,
        frame_of_reference_uid=frame_uid,
    )


def _group(hd, codes, vol: CTVolume, f: Finding, sources: List, frame_uid: str, algorithm):
    """TID 1410 group of one finding: region, long / short axis (mm), score (the group names
    the algorithm once for all three)."""
    mm, one = codes.UCUM.Millimeter, codes.UCUM.NoUnits
    # Rounded as findings.csv rounds them: the SR and the CSV hold the same numbers.
    measurements = [
        hd.sr.Measurement(name=codes.SCT.LongAxis, value=round(f.largest_diameter_mm, 3), unit=mm),
        hd.sr.Measurement(name=codes.SCT.ShortAxis, value=round(f.short_axis_mm, 3), unit=mm),
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding, value=round(f.best_score, 5), unit=one
        ),
    ]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"finding {f.finding_id}"
        ),
        referenced_region=_region(hd, vol, f, sources, frame_uid),
        finding_type=codes.SCT.Lesion,
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _none_found(hd, codes, algorithm):
    """TID 1501 group "Lesion: Absent": the report of a series without findings (TID 1500 needs
    at least one measurement group; an SR saying nothing was found still says the series was read).
    """
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="no findings"),
        finding_type=codes.SCT.Lesion,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.SCT.Lesion, value=codes.SCT.Absent)
        ],
    )


def write_case_sr(case_dir: str, vol: CTVolume, findings: Sequence[Finding]) -> str:
    """``<case_dir>/dicom_sr/sr.dcm`` for a DICOM series volume; returns its path."""
    hd = _highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    if vol.kind != "dicom" or not vol.series_files:
        raise ValueError(f"{vol.name}: a DICOM SR needs a DICOM series input")
    try:
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in vol.series_files]
        frame_uid = str(getattr(sources[0], "FrameOfReferenceUID", "") or "")
        algorithm = hd.sr.AlgorithmIdentification(name="elixir_d2 ElixirNet", version=_version())
        device = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=pydicom.uid.generate_uid(entropy_srcs=["elixir_d2 predict_net.py"]),
                name="elixir_d2 predict_net.py",
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=device),
            procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
            imaging_measurements=(
                [_group(hd, codes, vol, f, sources, frame_uid, algorithm) for f in findings]
                or [_none_found(hd, codes, algorithm)]
            ),
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=sources,
            content=report[0],
            series_instance_uid=hd.UID(),
            series_number=_SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="elixir_d2",
            series_description="elixir_d2 lesion findings",
            is_complete=True,
            is_final=False,
            is_verified=False,
        )
        os.makedirs(os.path.join(case_dir, SR_DIR), exist_ok=True)
        path = os.path.join(case_dir, SR_DIR, SR_FILE)
        sr.save_as(path)
    except (AttributeError, KeyError, TypeError, ValueError, pydicom.errors.InvalidDicomError) as e:
        # The message goes to summary.json, which holds no identifier: an attribute missing is
        # named, other errors (whose text may quote a header value) by their type only.
        why = (
            str(e).splitlines()[0]
            if isinstance(e, AttributeError) and str(e)
            else "a source header value it cannot use"
        )
        raise CTInputError(
            f"{vol.source}: cannot write the DICOM SR ({type(e).__name__}: {why})"
        ) from None
    return path
