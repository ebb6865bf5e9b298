"""predict_net.py on folders it did not make (issue 17 points 1, 3, 4, 5, 8): crafted names stay
inside --output, a 0-spacing DICOM series and a gzip bomb are refused before allocation, one bad
case fails alone, inputs are named relative to --input or anonymised, outputs are never stale."""

import errno
import gzip
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from detectron2.modeling import build_model

from elixir_d2.inference import PredictOptions, case_step, run_prediction
from elixir_d2.inference.case_ids import OutputDir, UnsafeOutputError, unique_case_ids
from elixir_d2.inference.orientation import to_lps_array
from elixir_d2.inference.runner import OutputNotEmptyError
from elixir_d2.inference.volume_io import CTInputError, read_dicom_series, read_nifti

from test_predict_io import phantom, write_dicom_series, write_nifti
from test_predict_net import FixedModel, quickstart_cfg


def run(inp, out, model=None, cfg=None, **opts):
    opts = dict(dict(progress=False, overlays="all"), **opts)
    return run_prediction(
        cfg or quickstart_cfg(),
        str(inp),
        str(out),
        PredictOptions(**opts),
        model=model or FixedModel(),
    )


def files_under(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


# ----------------------------------------------------------------------------- 1: case ids
def test_crafted_names_stay_inside_output_and_stay_distinct(tmp_path):
    scans = tmp_path / "work" / "scans"
    (scans / "sub").mkdir(parents=True)
    names = {
        "...nii.gz": 3,
        "..nii": 4,
        "a.nii.gz": 5,
        "a_2.nii.gz": 6,
        "sub/a.nii.gz": 7,
        "summary.json.nii.gz": 8,
    }
    for name, slices in names.items():
        write_nifti(scans / name, phantom(slices=slices), spacing=(0.8, 0.8, 2.0))
    out = tmp_path / "work" / "out"
    before = files_under(tmp_path)
    summary = run(scans, out)
    assert not summary["failed"]
    # Ids by hand: "..." and ".." lose their dots (-> "case", twice), "a" twice, summary.json is a
    # run file.
    expected = {"case~1": 3, "case~2": 4, "a~1": 5, "a_2": 6, "a~2": 7, "summary.json~1": 8}
    assert {c["case"]: c["slices"] for c in summary["cases"]} == expected
    for case, slices in expected.items():  # each folder holds its own input's results
        doc = json.load(open(out / case / "detections.json", encoding="utf-8"))
        assert doc["case"] == case and doc["num_slices_read"] == slices
    new = files_under(tmp_path) - before
    assert all(p.startswith(os.path.join("work", "out") + os.sep) for p in new), sorted(new)
    assert json.load(open(out / "summary.json", encoding="utf-8"))["cases"] == summary["cases"]
    images = json.load(open(out / "coco_images.json", encoding="utf-8"))["images"]
    assert len(images) == sum(expected.values())


def test_case_ids_by_hand():
    assert unique_case_ids(["..", ".", "a b", "a_b", "A", "a", "x" * 100, "coco_results.json"]) == [
        "case~1",
        "case~2",
        "a_b~1",
        "a_b~2",
        "A~1",
        "a~2",
        "x" * 80,
        "coco_results.json~1",
    ]


def test_output_paths_that_resolve_outside_are_refused(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    os.symlink(str(tmp_path), str(tmp_path / "out" / "link"))
    for parts in (("..", "x"), ("a/../../x",), ("link", "x"), (".",)):
        with pytest.raises(UnsafeOutputError, match="outside the output folder"):
            out.path(*parts)
    assert out.path("case~1", "detections.json") == str(
        tmp_path / "out" / "case~1" / "detections.json"
    )


# ----------------------------------------------------------------------------- 3: DICOM spacing
def test_dicom_pixel_spacing_zero_is_refused_naming_the_series(tmp_path):
    folder = write_dicom_series(tmp_path / "series_z", phantom(slices=4), spacing=(0.7, 0.7))
    patched = 0
    for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        data = bytearray(open(path, "rb").read())
        i = data.find(b"\x28\x00\x30\x00")  # (0028,0030) PixelSpacing, implicit VR little endian
        n = int.from_bytes(data[i + 4 : i + 8], "little")
        assert data[i + 8 : i + 8 + n] == b".7\\.7 "  # 0.7 mm as SimpleITK writes it
        data[i + 8 : i + 8 + n] = b"0\\0".ljust(n, b" ")
        open(path, "wb").write(bytes(data))
        patched += 1
    assert patched == 4
    with pytest.raises(
        CTInputError,
        match=r"series_z: DICOM series 'series_z' has PixelSpacing '0\\\\0' \(in "
        r"IM0000\.dcm and 3 more file\(s\)\): pixel spacing must be positive",
    ):
        read_dicom_series(folder, "z")


# ----------------------------------------------------------------------------- 4: memory
def _bomb(path):
    """128^3 int16 zeros: 4 MiB of voxels in a .nii.gz of a few KB."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((128, 128, 128), np.int16)), str(path))
    return str(path)


def test_gzip_bomb_is_refused_from_its_header_before_allocation(tmp_path, monkeypatch):
    bomb = _bomb(tmp_path / "bomb.nii.gz")
    assert os.path.getsize(bomb) < 16 * 1024
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", lambda self: pytest.fail("volume read"))
    with pytest.raises(
        CTInputError,
        match=r"bomb\.nii\.gz: 128 x 128 x 128 = 2,097,152 voxels exceeds the "
        r"limit of 1,000,000 \(predict_net\.py --max-voxels N raises it\)",
    ):
        read_nifti(bomb, "bomb", max_voxels=1_000_000)
    # A header declaring 2048^3 voxels over the same few KB: refused at the default cap.
    with gzip.open(bomb) as f:
        raw = bytearray(f.read(352 + 1000))
    raw[40:56] = np.array([3, 2048, 2048, 2048, 1, 1, 1, 1], "<i2").tobytes()
    big = tmp_path / "big.nii.gz"
    big.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(
        CTInputError, match=r"big\.nii\.gz: 2048 x 2048 x 2048 = 8,589,934,592 voxels exceeds"
    ):
        read_nifti(str(big), "big")


def test_one_failed_case_is_reported_and_the_folder_completes(tmp_path, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    _bomb(scans / "bomb.nii.gz")
    write_nifti(scans / "good.nii.gz", phantom(slices=3))
    write_nifti(scans / "oom.nii.gz", phantom(slices=3))
    real = case_step.read_case

    def read_case(case, *a, **kw):
        if case.name == "oom":
            raise MemoryError()
        return real(case, *a, **kw)

    monkeypatch.setattr(case_step, "read_case", read_case)
    out = tmp_path / "out"
    s = run(scans, out, max_voxels=1_000_000)
    assert [c["case"] for c in s["cases"]] == ["good"]
    failed = {f["case"]: f["error"] for f in s["failed"]}
    assert set(failed) == {"bomb", "oom"} and failed["oom"] == "MemoryError"
    assert failed["bomb"].startswith("bomb.nii.gz: 128 x 128 x 128 = 2,097,152 voxels exceeds")
    assert sorted(os.listdir(out)) == [
        "coco_images.json",
        "coco_results.json",
        "detections.csv",
        "findings.csv",
        "good",
        "index.html",
        "summary.json",
    ]
    # header + 2 per slice
    assert len(open(out / "detections.csv", encoding="utf-8").read().splitlines()) == 1 + 3 * 2


def test_lps_reorientation_by_slabs_equals_dicomorient():
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    for direction in (
        [0, 0, -1, 1, 0, 0, 0, -1, 0],
        [-1, 0, 0, 0, 1, 0, 0, 0, -1],
        [0.955, -0.296, 0, 0.296, 0.955, 0, 0, 0, 1],
    ):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.7, 0.8, 2.5))
        img.SetOrigin((1.0, -2.0, 3.0))
        img.SetDirection(direction)
        ref = sitk.DICOMOrient(img, "LPS")
        hu, spacing, origin, d = to_lps_array(img)
        np.testing.assert_array_equal(hu, sitk.GetArrayFromImage(ref).astype(np.float32))
        np.testing.assert_allclose(spacing, ref.GetSpacing())
        np.testing.assert_allclose(origin, ref.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(d.ravel(), ref.GetDirection(), atol=1e-9)


def test_relation_graphs_are_drawn_slice_by_slice(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = quickstart_cfg("elixirnet", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    model = build_model(cfg).eval()
    events = []
    model.register_forward_hook(lambda *a: events.append("forward"))
    monkeypatch.setattr(
        case_step,
        "draw_relation_graph",
        lambda grey, props, e, path, **kw: events.append(
            ("draw", os.path.basename(path), e.shape == (len(props), len(props)))
        ),
    )
    vol = write_nifti(tmp_path / "v.nii.gz", phantom(slices=3, size=64), spacing=(1.0, 1.0, 5.0))
    run(
        vol,
        tmp_path / "out",
        model=model,
        cfg=cfg,
        batch_size=1,
        draw_relations=True,
        overlays="none",
    )
    assert events == [
        "forward",
        ("draw", "slice_000.png", True),
        "forward",
        ("draw", "slice_001.png", True),
        "forward",
        ("draw", "slice_002.png", True),
    ]


# ----------------------------------------------------------------------------- 5: names
def test_outputs_name_inputs_relative_to_input(tmp_path):
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    (scans / "sub" / "broken.nii.gz").write_bytes(b"not a volume")
    write_nifti(scans / "good.nii.gz", phantom(slices=3), spacing=(0.8, 0.9, 2.5))
    (scans / "notes.txt").write_text("x", encoding="utf-8")
    out = tmp_path / "out"
    s = run(scans, out)
    assert s["failed"][0]["path"] == os.path.join("sub", "broken.nii.gz")
    assert s["failed"][0]["error"].startswith(
        os.path.join("sub", "broken.nii.gz") + ": unreadable NIfTI"
    )
    assert s["ignored"] == ["notes.txt"]
    assert json.load(open(out / "good" / "detections.json", encoding="utf-8"))["warnings"] == [
        "good.nii.gz: non-square pixels (0.8 x 0.9 mm); resampled by the x spacing as in training"
    ]
    for path in files_under(out):
        assert str(tmp_path).encode() not in (out / path).read_bytes(), path


def test_anonymized_ids_and_a_separate_mapping(tmp_path):
    scans = tmp_path / "scans"
    (scans / "Doe_Jane").mkdir(parents=True)
    write_nifti(scans / "Smith_John.nii.gz", phantom(slices=3))
    (scans / "Doe_Jane" / "Doe_Jane_0001.nii.gz").write_bytes(b"broken")
    out = tmp_path / "out"
    with pytest.raises(OutputNotEmptyError, match="outside --output"):
        run(scans, out, anonymize_ids=str(out / "ids.csv"))
    s = run(scans, out, anonymize_ids=str(tmp_path / "private" / "ids.csv"))
    assert [c["case"] for c in s["cases"]] == ["case_0002"] and s["failed"][0][
        "case"
    ] == "case_0001"
    assert s["failed"][0]["error"].startswith("case_0001: unreadable NIfTI")
    assert open(tmp_path / "private" / "ids.csv", encoding="utf-8").read() == (
        "case_id,input\ncase_0001,Doe_Jane/Doe_Jane_0001.nii.gz\ncase_0002,Smith_John.nii.gz\n"
    )
    for path in files_under(out):
        data = (out / path).read_bytes()
        assert b"Smith" not in data and b"Doe" not in data and b"Jane" not in data, path


# ----------------------------------------------------------------------------- 8: stale outputs
def test_non_empty_output_needs_overwrite_which_clears_only_the_runs_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_nifti(a / "first.nii.gz", phantom(slices=5))
    write_nifti(b / "second.nii.gz", phantom(slices=3))
    out = tmp_path / "out"
    run(a, out)
    (out / "my_notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(OutputNotEmptyError, match=r"is not empty .* pass --overwrite"):
        run(b, out)
    run(b, out, overwrite=True)
    assert sorted(os.listdir(out)) == [
        "coco_images.json",
        "coco_results.json",
        "detections.csv",
        "findings.csv",
        "index.html",
        "my_notes.txt",
        "second",
        "summary.json",
    ]
    assert sorted(os.listdir(out / "second" / "overlays")) == [
        f"slice_{i:03d}.png" for i in range(3)
    ]


def test_a_failed_case_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("c1", "c2"):
        write_nifti(scans / f"{name}.nii.gz", phantom(slices=3))
    real = case_step._write_case

    def full_disk(case_dir, pred, *a):
        if pred.volume.name == "c1":
            with open(os.path.join(case_dir, "detections.json"), "w", encoding="utf-8") as f:
                f.write('{"case": "c1", "detec')
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(case_dir, pred, *a)

    monkeypatch.setattr(case_step, "_write_case", full_disk)
    out = tmp_path / "out"
    s = run(scans, out)
    assert [f["case"] for f in s["failed"]] == ["c1"] and "No space left" in s["failed"][0]["error"]
    assert sorted(os.listdir(out)) == [
        "c2",
        "coco_images.json",
        "coco_results.json",
        "detections.csv",
        "findings.csv",
        "index.html",
        "summary.json",
    ]
    assert json.load(open(out / "summary.json", encoding="utf-8"))["cases"][0]["case"] == "c2"
