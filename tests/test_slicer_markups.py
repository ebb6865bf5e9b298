"""3D Slicer markups: findings.mrk.json / detections.mrk.json hold what Slicer's markups schema
v1.0.3 requires, and every ROI's box is where SimpleITK puts the lesion of the image as stored
(non-identity directions, anisotropic spacing, NIfTI and DICOM)."""

import itertools
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom_sr import write_ct_series

from elixir_d2.inference import PredictOptions, read_case, run_prediction
from elixir_d2.inference.grouping import Finding
from elixir_d2.inference.slicer_markups import write_case_markups
from elixir_d2.inference.volume_io import CaseSource

from test_predict_io import phantom, write_nifti
from test_predict_net import OracleModel, quickstart_cfg


# ------------------------------------------------------- markups-schema-v1.0.3.json, by hand
def _numbers(v, n):
    return (
        isinstance(v, list)
        and len(v) == n
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    )


def check_schema(doc):
    """The schema's required properties, enums and array shapes for the properties used."""
    assert set(doc) >= {"@schema", "markups"}  # root "required"
    assert isinstance(doc["@schema"], str) and isinstance(doc["markups"], list)
    for m in doc["markups"]:
        assert isinstance(m, dict) and "type" in m  # markup "required"
        assert m["type"] in ("Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI")
        assert m.get("coordinateSystem", "LPS") in ("LPS", "RAS")
        assert m.get("coordinateUnits", "mm") in ("mm", "um")
        for key, n in (("center", 3), ("size", 3), ("orientation", 9)):
            assert key not in m or _numbers(m[key], n), key
        for key in ("name", "roiType", "labelFormat"):
            assert key not in m or isinstance(m[key], str), key
        for key in ("locked", "fixedNumberOfControlPoints"):
            assert key not in m or isinstance(m[key], bool), key
        for p in m.get("controlPoints", []):
            assert isinstance(p, dict)
            for key in ("id", "label", "description", "associatedNodeID"):
                assert key not in p or isinstance(p[key], str), key
            assert "position" not in p or _numbers(p["position"], 3)
            assert "orientation" not in p or _numbers(p["orientation"], 9)
            for key in ("selected", "locked", "visibility"):
                assert key not in p or isinstance(p[key], bool), key
            assert p.get("positionStatus", "defined") in ("undefined", "preview", "defined")
        d = m.get("display", {})
        assert isinstance(d, dict)
        for key in ("color", "selectedColor", "activeColor"):
            assert key not in d or (_numbers(d[key], 3) and all(0 <= c <= 1 for c in d[key]))
        assert 0 <= d.get("opacity", 1.0) <= 1
        assert isinstance(d.get("visibility", True), bool)


def roi_corners(m):
    """The 8 corners (LPS mm) of an ROI markup: centre +- half sizes along its axes (the
    columns of its row-major orientation matrix)."""
    axes = np.asarray(m["orientation"]).reshape(3, 3)
    half = np.asarray(m["size"]) / 2
    return np.array(
        [
            np.asarray(m["center"]) + axes @ (np.array(s) * half)
            for s in itertools.product((-1, 1), repeat=3)
        ]
    )


def lesion_corners(img, level=80):
    """The 8 corners (LPS mm) of the voxels above ``level`` HU in an image as stored: continuous
    index bounds (+- half a voxel) through SimpleITK's index-to-physical transform."""
    zs, ys, xs = np.nonzero(sitk.GetArrayFromImage(img) > level)  # numpy axes: z, y, x
    lo = np.array([xs.min(), ys.min(), zs.min()]) - 0.5
    hi = np.array([xs.max(), ys.max(), zs.max()]) + 0.5
    return np.array(
        [
            img.TransformContinuousIndexToPhysicalPoint([float(v) for v in np.where(s, hi, lo)])
            for s in itertools.product((0, 1), repeat=3)
        ]
    )


def _same_points(a, b):
    assert sorted(map(tuple, np.round(a, 4))) == sorted(map(tuple, np.round(b, 4)))


def _finding_of_lesion(vol):
    """A finding over the lesion voxels (> 80 HU) of a read CTVolume, key slice in the middle."""
    zs, ys, xs = np.nonzero(vol.hu > 80)
    first, last = int(zs.min()), int(zs.max())
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return Finding(
        finding_id=0,
        slice_first=first,
        slice_last=last,
        num_slices=last - first + 1,
        extent_mm=0.0,
        largest_diameter_mm=0.0,
        short_axis_mm=0.0,
        best_score=0.8766,
        best_slice=(first + last) // 2,
        best_box=box,
        members=[],
    ), box


# Stored RAS (x, y flipped), and x / y swapped with z flipped: LPS reorientation permutes / flips.
DIRECTIONS = [(-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 1, 0, 1, 0, 0, 0, 0, -1)]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_nifti_rois_are_the_lesion_in_physical_space(tmp_path, direction):
    vol = phantom(slices=8, lesion=(2, 6, 10, 22, 14, 30))
    path = write_nifti(
        tmp_path / "ct.nii.gz",
        vol,
        spacing=(0.7, 0.9, 2.5),
        origin=(12.0, -34.0, 56.0),
        direction=direction,
    )
    ct = read_case(CaseSource("ct", path, "nifti"))
    finding, box = _finding_of_lesion(ct)
    det = {
        "slice_index": finding.best_slice,
        "x1": box[0],
        "y1": box[1],
        "x2": box[2],
        "y2": box[3],
        "score": 0.5,
        "finding_id": 0,
    }
    write_case_markups(str(tmp_path), ct, [finding], [det])
    doc = json.load(open(tmp_path / "findings.mrk.json", encoding="utf-8"))
    check_schema(doc)
    (m,) = doc["markups"]
    assert (m["type"], m["coordinateSystem"], m["coordinateUnits"], m["roiType"]) == (
        "ROI",
        "LPS",
        "mm",
        "Box",
    )
    assert "0.877" in m["name"] and m["controlPoints"][0]["position"] == m["center"]
    stored = sitk.ReadImage(path)
    _same_points(roi_corners(m), lesion_corners(stored))
    # One detection: the key slice's box, one slice thick: its mid-plane corners are the
    # stored lesion's corners moved onto the key slice's plane.
    dets = json.load(open(tmp_path / "detections.mrk.json", encoding="utf-8"))
    check_schema(dets)
    (d,) = dets["markups"]
    axes = np.asarray(d["orientation"]).reshape(3, 3)
    assert d["size"][2] == pytest.approx(ct.slice_interval)
    lesion = lesion_corners(stored)
    along = (lesion - d["center"]) @ axes  # in the ROI's axes
    assert np.allclose(np.abs(along[:, :2]), np.asarray(d["size"][:2]) / 2)
    key_z = np.asarray(ct.physical_point(0.5, 0.5, finding.best_slice)) @ axes[:, 2]
    assert np.asarray(d["center"]) @ axes[:, 2] == pytest.approx(key_z)


def test_dicom_rois_match_simpleitk_and_the_run_writes_them(tmp_path):
    """End to end: a feet-first DICOM series (columns run to the patient's right) through
    run_prediction; the finding ROI is the lesion as SimpleITK reads the series."""
    vol = phantom(slices=7, lesion=(1, 5, 10, 22, 14, 30))
    cases = tmp_path / "cases"
    write_ct_series(
        cases / "feet_first",
        vol,
        (-1, 0, 0, 0, 1, 0),
        [(40.0, -30.0, 100.0 + 2.5 * k) for k in range(7)],
    )
    write_nifti(
        cases / "ras.nii.gz",
        vol,
        spacing=(2.0, 2.0, 2.5),
        origin=(5.0, 6.0, 7.0),
        direction=DIRECTIONS[0],
    )
    cfg = quickstart_cfg()
    lo, hi = cfg.INPUT.HU_WINDOW
    out = tmp_path / "out"
    run_prediction(
        cfg,
        str(cases),
        str(out),
        PredictOptions(progress=False),
        model=OracleModel((80 - lo) * 255 / (hi - lo)),
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(cases / "feet_first")))
    stored = {"feet_first": reader.Execute(), "ras": sitk.ReadImage(str(cases / "ras.nii.gz"))}
    for case, img in stored.items():
        doc = json.load(open(out / case / "findings.mrk.json", encoding="utf-8"))
        check_schema(doc)
        (m,) = doc["markups"]
        _same_points(roi_corners(m), lesion_corners(img))
        detections = json.load(open(out / case / "detections.mrk.json", encoding="utf-8"))[
            "markups"
        ]
        assert (
            len(detections)
            == len(json.load(open(out / case / "detections.json", encoding="utf-8"))["detections"])
            == 4
        )
        assert not os.path.exists(out / case / "dicom_sr")  # SR only with --dicom-sr
