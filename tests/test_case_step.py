"""The per-case step (inference/case_step.py, run_case): one case in, its outcome out. An oracle
model finds the phantom's lesion (box [14, 10, 30, 22] on slices 1..4), so the case folder's
contents are known: a predicted case, one read back by --resume without the model, a failed case,
the run's only case raising, and a folder the tool did not write."""

import json
import os

import numpy as np
import pytest
from torch import nn

from elixir_d2.inference import PredictOptions, discover_cases
from elixir_d2.inference.case_ids import InputNames, OutputDir
from elixir_d2.inference.case_manifest import CASE_MARKER
from elixir_d2.inference.case_step import CaseStep, run_case
from elixir_d2.inference.predictor import CTPredictor
from elixir_d2.inference.volume_io import CTInputError

from test_predict_io import phantom, write_nifti
from test_predict_net import OracleModel, quickstart_cfg


class ModelThatMustNotRun(nn.Module):
    def forward(self, inputs):
        raise AssertionError("the model ran")


def _oracle(cfg):
    lo, hi = cfg.INPUT.HU_WINDOW
    return OracleModel((80 - lo) * 255 / (hi - lo))  # between body (40 HU) and lesion (120 HU)


def _step(scans, out, model=None, settings="settings-1", single=False, **opts):
    cfg = quickstart_cfg()
    return CaseStep(
        cfg,
        CTPredictor(cfg, model if model is not None else _oracle(cfg)),
        InputNames(str(scans)),
        OutputDir(str(out)),
        PredictOptions(progress=False, report="none", **opts),
        settings,
        input_root=os.path.realpath(scans),
        single=single,
    )


@pytest.fixture
def scans(tmp_path):
    """A NIfTI case "ct" (2 mm pixels: the model sees the native grid), a broken file, an empty
    output folder."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_nifti(
        folder / "ct.nii.gz",
        phantom(slices=6, lesion=(1, 5, 10, 22, 14, 30)),
        spacing=(2.0, 2.0, 2.5),
    )
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    (tmp_path / "out").mkdir()
    return folder, {c.name: c for c in discover_cases(str(folder))[0]}


def test_a_case_is_predicted_into_its_folder_under_its_id(tmp_path, scans):
    folder, cases = scans
    out = tmp_path / "out"
    gt = {2: np.array([[13.0, 9.0, 31.0, 23.0]]), 5: np.zeros((0, 4))}
    o = run_case(_step(folder, out), 7, cases["ct"], "case_0001", gt)
    assert (o.index, o.failure, o.resumed) == (7, None, False)
    doc = o.doc
    assert doc["case"] == "case_0001"  # the output id, not the input's name "ct"
    assert [d["slice_index"] for d in doc["detections"]] == [1, 2, 3, 4]
    assert all([d["x1"], d["y1"], d["x2"], d["y2"]] == [14, 10, 30, 22] for d in doc["detections"])
    (finding,) = doc["findings"]
    assert (finding["slice_first"], finding["slice_last"]) == (1, 4)
    case_dir = out / "case_0001"
    assert json.loads((case_dir / "detections.json").read_text(encoding="utf-8")) == doc
    assert (case_dir / CASE_MARKER).is_file()
    # overlays: the slices with a detection (1..4) or with ground truth (2, 5), not slice 0
    assert sorted(os.listdir(case_dir / "overlays")) == [
        f"slice_{n:03d}.png" for n in (1, 2, 3, 4, 5)
    ]
    assert o.read_s > 0 and o.forward_s > 0 and o.write_s > 0
    assert cases["ct"].name == "ct" and sorted(gt) == [2, 5]  # the inputs as they were


def test_resume_reads_a_finished_folder_back_without_the_model(tmp_path, scans):
    folder, cases = scans
    out = tmp_path / "out"
    first = run_case(_step(folder, out), 0, cases["ct"], "ct", {})
    again = run_case(
        _step(folder, out, ModelThatMustNotRun(), resume=True), 0, cases["ct"], "ct", {}
    )
    assert again.resumed and again.doc == first.doc and again.failure is None
    assert (again.read_s, again.forward_s, again.write_s) == (0.0, 0.0, 0.0)
    # other settings (another config, weights or option): the folder is not reused
    with pytest.raises(AssertionError, match="the model ran"):
        run_case(
            _step(folder, out, ModelThatMustNotRun(), settings="settings-2", resume=True),
            0,
            cases["ct"],
            "ct",
            {},
        )


def test_a_case_that_cannot_be_read_is_a_failed_outcome(tmp_path, scans):
    folder, cases = scans
    out = tmp_path / "out"
    o = run_case(_step(folder, out), 3, cases["broken"], "broken", {})
    assert (o.index, o.doc, o.resumed) == (3, None, False)
    assert (o.failure["case"], o.failure["path"]) == ("broken", "broken.nii.gz")
    # named relative to the input, as every output names it
    assert o.failure["error"].startswith("broken.nii.gz: unreadable NIfTI file")
    assert str(folder) not in o.failure["error"]
    assert os.listdir(out) == []


def test_the_runs_only_case_raises_its_error(tmp_path, scans):
    folder, cases = scans
    with pytest.raises(CTInputError, match="broken.nii.gz: unreadable NIfTI file"):
        run_case(_step(folder, tmp_path / "out", single=True), 0, cases["broken"], "broken", {})
    assert os.listdir(tmp_path / "out") == []


def test_a_folder_the_tool_did_not_write_is_left_alone(tmp_path, scans):
    folder, cases = scans
    out = tmp_path / "out"
    (out / "ct").mkdir()
    (out / "ct" / "mine.txt").write_text("a user's file", encoding="utf-8")
    o = run_case(_step(folder, out), 0, cases["ct"], "ct", {})
    assert o.doc is None and o.failure["case"] == "ct"
    assert o.failure["error"].endswith("was not written by this tool; move it away")
    assert os.listdir(out / "ct") == ["mine.txt"]


def test_an_interrupted_share_counts_the_complete_case_folders(tmp_path):
    # SIGINT can land after a case folder is renamed into place and before its outcome is
    # recorded: the count an interrupted run reports is read from the folders themselves.
    from elixir_d2.inference.run_files import RunPlan
    from elixir_d2.inference.runner import _Shard

    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / CASE_MARKER).write_text("{}", encoding="utf-8")  # complete
    (out / "b").mkdir()  # no marker: not a folder this tool finished
    plan = RunPlan(cases=[], ignored=[], ids=["a", "b", "c"])
    names = InputNames(str(tmp_path))

    def shard(indices):
        return _Shard(None, plan, indices, names, OutputDir(str(out)), PredictOptions(), {}, None)

    assert shard([0, 1, 2]).outcomes == [] and shard([0, 1, 2]).done == 1
    assert shard([1, 2]).done == 0  # another rank's finished case is not this share's
