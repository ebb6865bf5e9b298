"""RunSummary (inference/run_files.py): the run files gathered from hand-made case outcomes, with
the case lists, CSV rows, COCO ids, FROC and step times worked out by hand."""

import csv
import json

import numpy as np
import pytest

from elixir_d2.inference import run_files
from elixir_d2.inference.case_ids import OutputDir
from elixir_d2.inference.run_files import CaseOutcome, RunSummary


def _det(case, n, box, score, class_id=0, finding_id=1):
    x1, y1, x2, y2 = box
    return {
        "case": case,
        "slice_index": n,
        "x1": x1,
        "y1": y1,
        "x2": x2,
        "y2": y2,
        "score": score,
        "class_id": class_id,
        "finding_id": finding_id,
    }


def _doc(case, slices, dets, findings=(), kind="nifti"):
    """A detections.json document with the keys the run files read."""
    return {
        "case": case,
        "input_kind": kind,
        "image_size": [40, 50],
        "slices_predicted": list(slices),
        "model_input_size": [[40, 50]],
        "detections": list(dets),
        "findings": list(findings),
    }


# Case 1 (output id case_0001, input name vol_a): an FP on slice 0 above a hit on slice 1.
DOC_A = _doc(
    "case_0001",
    [0, 1],
    [
        _det("case_0001", 0, (30, 30, 40, 40), 0.9),
        _det("case_0001", 1, (10, 10, 20, 20), 0.8, class_id=2, finding_id=2),
    ],
    findings=[{"case": "case_0001", "finding_id": 1}, {"case": "case_0001", "finding_id": 2}],
)
DOC_C = _doc("case_0003", [5], [_det("case_0003", 5, (0, 0, 4, 6), 0.5)], kind="dicom")
FAILURE = {"case": "case_0002", "path": "broken.nii.gz", "error": "broken.nii.gz: unreadable"}
# Lesions of vol_a on slices 0 and 1; "case_0001" is the anonymous id, not a name ground truth
# uses: a summary that matched by id would find a lesion on slice 5 instead.
GT = {
    "vol_a": {0: np.array([[0.0, 0.0, 8.0, 8.0]]), 1: np.array([[10.0, 10.0, 20.0, 20.0]])},
    "case_0001": {5: np.array([[0.0, 0.0, 4.0, 6.0]])},
}


def _summary():
    s = RunSummary(["lesion", "liver", "bone"])
    s.add(
        CaseOutcome(0, doc=DOC_A, read_s=0.25, prepare_s=0.125, forward_s=0.5, write_s=1.0), "vol_a"
    )
    s.add(CaseOutcome(1, failure=FAILURE), "broken")
    s.add(CaseOutcome(2, doc=DOC_C, resumed=True, forward_s=0.75), "series_c")
    return s


def test_cases_are_listed_in_the_order_added_with_their_counts():
    s = _summary()
    assert s.done == [
        {
            "case": "case_0001",
            "input_kind": "nifti",
            "slices": 2,
            "detections": 2,
            "findings": 2,
            "model_input_size": [[40, 50]],
        },
        {
            "case": "case_0003",
            "input_kind": "dicom",
            "slices": 1,
            "detections": 1,
            "findings": 0,
            "model_input_size": [[40, 50]],
        },
    ]
    assert s.failed == [FAILURE] and s.resumed == 1


def test_tables_hold_every_finished_case_and_coco_numbers_its_slices(tmp_path):
    s = _summary()
    s.write_tables(OutputDir(str(tmp_path)))
    with open(tmp_path / "detections.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["slice_index"], r["score"]) for r in rows] == [
        ("case_0001", "0", "0.9"),
        ("case_0001", "1", "0.8"),
        ("case_0003", "5", "0.5"),
    ]
    with open(tmp_path / "findings.csv", encoding="utf-8") as f:
        assert [r["finding_id"] for r in csv.DictReader(f)] == ["1", "2"]
    # Images 1, 2: case_0001's slices 0, 1; image 3: case_0003's slice 5. category = class + 1.
    results = json.loads((tmp_path / "coco_results.json").read_text(encoding="utf-8"))
    assert results == [
        {"image_id": 1, "category_id": 1, "bbox": [30, 30, 10.0, 10.0], "score": 0.9},
        {"image_id": 2, "category_id": 3, "bbox": [10, 10, 10.0, 10.0], "score": 0.8},
        {"image_id": 3, "category_id": 1, "bbox": [0, 0, 4.0, 6.0], "score": 0.5},
    ]
    images = json.loads((tmp_path / "coco_images.json").read_text(encoding="utf-8"))
    assert [(im["id"], im["file_name"]) for im in images["images"]] == [
        (1, "case_0001/000"),
        (2, "case_0001/001"),
        (3, "case_0003/005"),
    ]
    assert images["categories"] == [
        {"id": 1, "name": "lesion"},
        {"id": 2, "name": "liver"},
        {"id": 3, "name": "bone"},
    ]


def test_froc_matches_ground_truth_by_the_input_case_name(tmp_path):
    froc = _summary().write_froc(GT, str(tmp_path), (0.25, 0.5, 1.0), "continuous")
    # Two annotated slices (vol_a 0 and 1), two lesions. Ranked: the FP (0.9) then the hit
    # (0.8): curve (0, 0), (0.5 FP/image, 0.5); read linearly, flat past its end.
    assert (froc["num_images"], froc["num_gt"], froc["num_hits"]) == (2, 2, 1)
    assert froc["sensitivity"] == {"0.25": 0.25, "0.5": 0.5, "1.0": 0.5}
    assert json.loads((tmp_path / "froc.json").read_text(encoding="utf-8")) == froc
    assert (tmp_path / "froc.png").stat().st_size > 0


def test_no_froc_when_no_finished_case_has_ground_truth(tmp_path):
    assert (
        _summary().write_froc({"other": GT["vol_a"]}, str(tmp_path), (1.0,), "continuous") is None
    )
    assert not (tmp_path / "froc.json").exists()


@pytest.mark.parametrize("processes,ratio", [(1, 5.2), (2, None)])
def test_summary_document_sums_the_steps_over_the_cases(monkeypatch, processes, ratio):
    monkeypatch.setattr(run_files.time, "perf_counter", lambda: 10.0)
    doc = _summary().document(
        ["notes.txt"], {"num_gt": 2}, {"processes": processes, "model_setup": 1.5, "start": 2.0}
    )
    assert list(doc) == ["cases", "failed", "ignored", "froc", "timing_s"]
    assert doc["ignored"] == ["notes.txt"] and doc["froc"] == {"num_gt": 2}
    # total = 10 - 2 - 1.5; forward = 0.5 + 0 (failed) + 0.75; 6.5 / 1.25 = 5.2
    assert doc["timing_s"] == {
        "processes": processes,
        "model_setup": 1.5,
        "total": 6.5,
        "read_inputs": 0.25,
        "prepare_inputs": 0.125,
        "model_forward": 1.25,
        "write_outputs": 1.0,
        "total_over_forward": ratio,
    }
