"""--dicom-sr: a TID 1500 Comprehensive 3D SR per DICOM series, checked by dciodvfy (dicom3tools)
and read back with highdicom / pydicom against the source images' own pixels and headers and
against findings.csv; patient identifiers only under the SR subfolder; the refusals."""

import csv
import json
import os
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from elixir_d2.inference import PredictOptions, run_prediction
from elixir_d2.inference.dicom_sr import DicomSRError

import predict_net
from test_predict_io import FAKE_PHI, phantom, write_nifti
from test_predict_net import OracleModel, fpn_weights, quickstart_cfg  # noqa: F401 (fixture)

PHI = {
    "PatientName": FAKE_PHI["0010|0010"],
    "PatientID": FAKE_PHI["0010|0020"],
    "PatientBirthDate": FAKE_PHI["0010|0030"],
    "AccessionNumber": FAKE_PHI["0008|0050"],
}
INTERCEPT = -1024


def write_ct_series(folder, vol, iop, positions, spacing=(2.0, 2.0)):
    """A CT series with pydicom, one file per slice ``vol[k]`` (HU) at ``positions[k]``; files
    named in reverse so their names say nothing of their order. Returns the SOP Instance UIDs."""
    os.makedirs(folder, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    uids = []
    for k, hu in enumerate(vol):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"IM{len(vol) - k:04d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.StudyID = "O", "20240102", "101500", "S1"
        ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer = "", "CT", "TestCo"
        ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = 3, k + 1, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), 2.5
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = INTERCEPT, 1, "HU"
        ds.PixelData = (hu.astype(np.int32) - INTERCEPT).astype("<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return uids


def dciodvfy(path):
    """(errors, warnings) lines dciodvfy reports on ``path``."""
    run = subprocess.run(["dciodvfy", "-new", path], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return (
        [ln for ln in lines if ln.startswith("Error")],
        [ln for ln in lines if ln.startswith("Warning")],
    )


def _findings_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return {int(r["finding_id"]): r for r in csv.DictReader(f)}


def _lesion_box(ds):
    """XYXY (continuous, TLHC = 0) around the lesion's pixels (> 80 HU) of a source image."""
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ys, xs = np.nonzero(hu > 80)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _run(tmp_path, cases, **opts):
    cfg = quickstart_cfg()
    lo, hi = cfg.INPUT.HU_WINDOW
    out = str(tmp_path / "out")
    summary = run_prediction(
        cfg,
        str(cases),
        out,
        PredictOptions(progress=False, dicom_sr=True, **opts),
        model=OracleModel((80 - lo) * 255 / (hi - lo)),
    )
    return out, summary


def _groups(path):
    sr = hd.sr.srread(path)
    return sr, sr.content.get_planar_roi_measurement_groups()


def _value(group, code):
    (m,) = group.get_measurements(name=code)
    return float(m.value)


def test_axial_series_sr_round_trips(tmp_path, capsys):
    # Lesion of 120 HU on array slices 1..4, rows 10..21, columns 14..29, 2 mm pixels.
    vol = phantom(slices=7, lesion=(1, 5, 10, 22, 14, 30))
    cases = tmp_path / "cases"
    z = [100.0 + 2.5 * k for k in range(7)]
    head_first = write_ct_series(
        cases / "head_first", vol, (1, 0, 0, 0, 1, 0), [(-40.0, -30.0, zk) for zk in z]
    )
    # Feet first: rows run toward the patient's right; the reader flips the columns to LPS and
    # the SR must map the box back into the stored image's columns.
    feet_first = write_ct_series(
        cases / "feet_first", vol, (-1, 0, 0, 0, 1, 0), [(40.0, -30.0, zk) for zk in z]
    )
    write_nifti(cases / "volume.nii.gz", vol, spacing=(2.0, 2.0, 2.5))
    out, summary = _run(tmp_path, cases)
    assert summary["failed"] == [] and len(summary["cases"]) == 3
    assert not os.path.exists(f"{out}/volume/dicom_sr")  # NIfTI: no SR, a warning
    for case, uids in (("head_first", head_first), ("feet_first", feet_first)):
        path = f"{out}/{case}/dicom_sr/sr.dcm"
        errors, _ = dciodvfy(path)  # warnings are allowed
        assert errors == [], errors
        sr, groups = _groups(path)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        sources = {
            u: pydicom.dcmread(os.path.join(cases, case, f))
            for f in os.listdir(cases / case)
            for u in [pydicom.dcmread(os.path.join(cases, case, f)).SOPInstanceUID]
        }
        src0 = sources[uids[0]]
        assert (sr.PatientName, sr.PatientID, sr.StudyInstanceUID) == (
            src0.PatientName,
            src0.PatientID,
            src0.StudyInstanceUID,
        )
        assert sr.SeriesInstanceUID != src0.SeriesInstanceUID
        rows = _findings_csv(f"{out}/{case}/findings.csv")
        assert len(groups) == len(rows) == 1
        (g,) = groups
        f = rows[0]
        assert g.tracking_identifier == "finding 0"
        # The key slice is LPS slice best_slice, counted from the lowest (most inferior) z.
        key_uid = uids[int(np.argsort(z)[int(f["best_slice"])])]
        roi = g.roi
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert roi.ContentSequence[0].referenced_sop_instance_uid == key_uid
        points = roi.value
        assert np.array_equal(points[0], points[-1]) and len(points) == 5  # closed rectangle
        x1, y1, x2, y2 = _lesion_box(sources[key_uid])
        # The rectangle's four corners, in whatever order the mapping to the stored image
        # (mirrored for feet first) leaves them; consecutive corners share an edge.
        corners = sorted(map(tuple, np.round(points[:4], 3)))
        assert corners == sorted([(x1, y1), (x2, y1), (x2, y2), (x1, y2)])
        assert all((np.diff(points, axis=0) == 0).any(axis=1))
        assert _value(g, codes.SCT.LongAxis) == pytest.approx(float(f["largest_diameter_mm"]))
        assert _value(g, codes.SCT.ShortAxis) == pytest.approx(float(f["short_axis_mm"]))
        assert (float(f["largest_diameter_mm"]), float(f["short_axis_mm"])) == (32.0, 24.0)
        assert _value(g, codes.DCM.CertaintyOfFinding) == pytest.approx(float(f["best_score"]))

    # Identifiers: in the SRs, and nowhere else under --output.
    for folder, _, files in os.walk(out):
        for name in files:
            p = os.path.join(folder, name)
            data = open(p, "rb").read()
            leaked = [v for v in PHI.values() if v.encode() in data]
            in_sr = os.path.relpath(p, out).split(os.sep)[1:2] == ["dicom_sr"]
            assert (leaked == list(PHI.values())) if in_sr else not leaked, (p, leaked)
    # The manifest lists the SR, so --resume verifies it like any other file.
    manifest = json.load(open(f"{out}/head_first/.elixir_d2_case", encoding="utf-8"))
    assert "dicom_sr/sr.dcm" in manifest["files"] and "findings.mrk.json" in manifest["files"]


def test_coronal_series_region_is_scoord3d(tmp_path):
    """A coronal series is read as axial slices, which are no source image: the region is a
    closed polygon in patient coordinates on the key slice's plane, around the lesion."""
    # Source slices k along +y (posterior), rows along -z, columns along +x; 2 mm everywhere.
    vol = phantom(slices=20, lesion=(5, 10, 10, 22, 14, 30))
    cases = tmp_path / "cases"
    write_ct_series(
        cases / "coronal",
        vol,
        (1, 0, 0, 0, 0, -1),
        [(-40.0, -20.0 + 2.0 * k, 60.0) for k in range(20)],
        spacing=(2.0, 2.0),
    )
    out, summary = _run(tmp_path, cases)
    assert summary["failed"] == []
    path = f"{out}/coronal/dicom_sr/sr.dcm"
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    _, groups = _groups(path)
    assert groups
    src = pydicom.dcmread(os.path.join(cases, "coronal", "IM0001.dcm"), stop_before_pixels=True)
    for g in groups:
        roi = g.roi
        assert roi.graphic_type == hd.sr.GraphicTypeValues3D.POLYGON
        assert roi.ReferencedFrameOfReferenceUID == src.FrameOfReferenceUID
        pts = np.asarray(roi.value)
        assert np.array_equal(pts[0], pts[-1]) and np.ptp(pts[:, 2]) == pytest.approx(0)
        # Lesion voxels: x = -40 + 2 * (14..29), y = -20 + 2 * (5..9), z = 60 - 2 * (10..21);
        # the box edges lie half a voxel beyond the outer voxel centres.
        assert pts[:, 0].min() == pytest.approx(-40 + 2 * 14 - 1)
        assert pts[:, 0].max() == pytest.approx(-40 + 2 * 29 + 1)
        assert pts[:, 1].min() == pytest.approx(-20 + 2 * 5 - 1)
        assert pts[:, 1].max() == pytest.approx(-20 + 2 * 9 + 1)
        assert 60 - 2 * 21 <= pts[0, 2] <= 60 - 2 * 10


def test_series_without_findings_says_so(tmp_path):
    """No finding: still an SR (the series was read), one TID 1501 group "Lesion: Absent"."""
    cases = tmp_path / "cases"
    write_ct_series(
        cases / "clear",
        phantom(slices=6, lesion_hu=40),
        (1, 0, 0, 0, 1, 0),
        [(0.0, 0.0, 2.5 * k) for k in range(6)],
    )
    out, summary = _run(tmp_path, cases)
    assert summary["cases"][0]["findings"] == 0
    path = f"{out}/clear/dicom_sr/sr.dcm"
    assert dciodvfy(path)[0] == []
    sr, planar = _groups(path)
    (group,) = sr.content.get_image_measurement_groups()
    assert planar == [] and group.tracking_identifier == "no findings"
    (evaluation,) = group.get_qualitative_evaluations(name=codes.SCT.Lesion)
    assert evaluation.value == codes.SCT.Absent


def test_a_series_the_sr_cannot_be_built_from_fails_alone(tmp_path):
    """A series without StudyDate (Type 1 in the SR's General Study module): that case fails,
    named; the other series gets its SR."""
    cases = tmp_path / "cases"
    for name in ("good", "no_study_date"):
        write_ct_series(
            cases / name,
            phantom(slices=6),
            (1, 0, 0, 0, 1, 0),
            [(0.0, 0.0, 2.5 * k) for k in range(6)],
        )
    for f in os.listdir(cases / "no_study_date"):
        ds = pydicom.dcmread(cases / "no_study_date" / f)
        del ds.StudyDate
        ds.save_as(cases / "no_study_date" / f)
    out, summary = _run(tmp_path, cases)
    assert [c["case"] for c in summary["cases"]] == ["good"]
    (failed,) = summary["failed"]
    assert failed["case"] == "no_study_date" and "cannot write the DICOM SR" in failed["error"]
    assert "StudyDate" in failed["error"]
    assert os.path.isfile(f"{out}/good/dicom_sr/sr.dcm")
    assert not os.path.exists(f"{out}/no_study_date")


def test_dicom_sr_refusals(tmp_path, monkeypatch, capsys, fpn_weights):  # noqa: F811
    cases = tmp_path / "cases"
    cases.mkdir()
    write_nifti(cases / "v.nii.gz", phantom())
    rc = predict_net.main(
        [
            "--config-file",
            "configs/quickstart/fpn.yaml",
            "--weights",
            fpn_weights,
            "--input",
            str(cases),
            "--output",
            str(tmp_path / "o0"),
            "--dicom-sr",
            "--no-progress",
        ]
    )
    assert rc == 2 and "--dicom-sr: the input holds no DICOM series" in capsys.readouterr().err
    cfg = quickstart_cfg()
    with pytest.raises(DicomSRError, match="the input holds no DICOM series"):
        run_prediction(cfg, str(cases), str(tmp_path / "o1"), PredictOptions(dicom_sr=True))
    write_ct_series(
        cases / "s", phantom(), (1, 0, 0, 0, 1, 0), [(0.0, 0.0, 2.5 * k) for k in range(6)]
    )
    with pytest.raises(DicomSRError, match="cannot be combined with --anonymize-ids"):
        run_prediction(
            cfg,
            str(cases),
            str(tmp_path / "o2"),
            PredictOptions(dicom_sr=True, anonymize_ids=str(tmp_path / "ids.csv")),
        )
    monkeypatch.setitem(__import__("sys").modules, "highdicom", None)  # not installed
    with pytest.raises(DicomSRError, match=r"--dicom-sr needs highdicom: pip install"):
        run_prediction(cfg, str(cases), str(tmp_path / "o3"), PredictOptions(dicom_sr=True))
    assert not any(os.path.exists(tmp_path / o) for o in ("o0", "o1", "o2", "o3"))
