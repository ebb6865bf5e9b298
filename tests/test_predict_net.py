"""End to end inference: training-identical inputs, known lesions through the whole pipeline (an
oracle model), the CLI on a folder of NIfTI / DICOM / DeepLesion cases with the quickstart model,
bad cases, and no patient identifier in any output."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from elixir_d2 import load_config
from elixir_d2.data.ct_mapper import CTDatasetMapper
from elixir_d2.inference import (
    CTPredictor,
    PredictOptions,
    discover_cases,
    read_case,
    run_prediction,
)
from elixir_d2.modeling.meta_arch import to_slice_frame
from elixir_d2.visualization import DET_COLOR, GT_COLOR

import predict_net
from conftest import dl_row, write_dl_info
from test_predict_io import FAKE_PHI, phantom, write_dicom_series, write_nifti, write_png_series

# Keep the random quickstart model cheap: few proposals per slice.
# The sizes below are worked out for 2 mm model pixels (the quickstart resamples to 0.75 mm).
FAST = [
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "60",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "30",
    "INPUT.NORM_SPACING_MM",
    "2.0",
]


def quickstart_cfg(name="fpn", opts=()):
    return load_config(f"configs/quickstart/{name}.yaml", FAST + list(opts))


@pytest.fixture(scope="module")
def fpn_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(quickstart_cfg())
    out = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(model, save_dir=str(out)).save("fpn")
    return str(out / "fpn.pth")


def _all_bytes(folder):
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                yield os.path.join(root, f), fh.read()


def _read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- inputs
def test_inputs_equal_the_training_mapper(tmp_path):
    """Every slice gets exactly what CTDatasetMapper gives it in evaluation: 1.25 mm slices
    (neighbours interpolated), key slices in the middle and at both ends (fallback)."""
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1500, size=(7, 30, 36)).astype(np.int16)
    root = str(tmp_path / "DeepLesion")
    folder = write_png_series(root, "000005_01_01", vol, first=1)
    write_dl_info(root, [dl_row("000005_01_01_004.png", spacing=(0.7, 0.7, 1.25), size=(36, 30))])
    # 0.7 -> 0.5 mm: upsampled to 42 x 50
    cfg = quickstart_cfg(opts=["INPUT.NORM_SPACING_MM", "0.5"])
    predictor = CTPredictor(cfg, model=nn.Identity())
    mapper = CTDatasetMapper(cfg, is_train=False)
    volume = read_case(discover_cases(folder)[0][0])
    for key in (1, 4, 7):
        record = {
            "file_name": f"{folder}/{key:03d}.png",
            "image_id": 0,
            "height": 30,
            "width": 36,
            "slice_dir": folder,
            "slice_idx": key,
            "slice_range": (1, 7),
            "slice_intv": 1.25,
            "spacing": 0.7,
            "annotations": [],
        }
        expect = mapper(record)
        got, size, fallbacks, crop = predictor.prepare(volume, key)
        assert tuple(got.shape) == (3, 42, 50) and size == (42, 50) and crop is None
        torch.testing.assert_close(got, expect["image"], rtol=0, atol=0)
        assert fallbacks == expect["fallback_slices"]


def test_cropped_inputs_equal_the_training_mapper(tmp_path):
    """With INPUT.BODY_CROP the predictor crops as the evaluation mapper does: same box, same
    tensor, at the whole slice's scale (0.7 -> 0.5 mm)."""
    rng = np.random.default_rng(1)
    vol = np.full((5, 30, 36), -1000, np.int16)
    vol[:, 6:25, 9:30] = rng.integers(-400, 1500, size=(5, 19, 21))
    root = str(tmp_path / "DeepLesion")
    folder = write_png_series(root, "000005_01_01", vol, first=1)
    write_dl_info(root, [dl_row("000005_01_01_003.png", spacing=(0.7, 0.7, 2.0), size=(36, 30))])
    cfg = quickstart_cfg(
        opts=[
            "INPUT.NORM_SPACING_MM",
            "0.5",
            "INPUT.BODY_CROP.ENABLED",
            "True",
            "INPUT.BODY_CROP.MARGIN_MM",
            "1.4",
        ]
    )
    predictor = CTPredictor(cfg, model=nn.Identity())
    volume = read_case(discover_cases(folder)[0][0])
    record = {
        "file_name": f"{folder}/003.png",
        "image_id": 0,
        "height": 30,
        "width": 36,
        "slice_dir": folder,
        "slice_idx": 3,
        "slice_range": (1, 5),
        "slice_intv": 2.0,
        "spacing": 0.7,
        "annotations": [],
    }
    expect = CTDatasetMapper(cfg, is_train=False)(record)
    got, size, _, crop = predictor.prepare(volume, 3)
    # Body rows 6..24, columns 9..29, grown by 2 pixels (1.4 mm); x 1.4 of 23 x 25 = 32 x 35.
    # height / width stay the slice's: the model maps its outputs back there.
    assert crop == expect["body_crop"] == (7, 4, 32, 27)
    assert size == (32, 35) and (expect["height"], expect["width"]) == (30, 36)
    torch.testing.assert_close(got, expect["image"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- oracle model
class OracleModel(nn.Module):
    """Detects the bright lesion in the key-slice channel: the box around input pixels above
    ``level`` (between body and lesion after windowing), in slice pixels as BodyCropRCNN
    returns them (its postprocess, body crop undone)."""

    def __init__(self, level):
        super().__init__()
        self.level = level

    def forward(self, inputs):
        outs = []
        for x in inputs:
            key = x["image"][1]
            inst = Instances(tuple(key.shape))
            ys, xs = torch.nonzero(key > self.level, as_tuple=True)
            if len(ys):
                box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
                inst.pred_boxes = Boxes(torch.tensor([box]))
                inst.scores = torch.tensor([0.9])
                inst.pred_classes = torch.tensor([0])
            else:
                inst.pred_boxes = Boxes(torch.zeros((0, 4)))
                inst.scores = torch.zeros(0)
                inst.pred_classes = torch.zeros(0, dtype=torch.int64)
            outs.append({"instances": to_slice_frame(inst, x)})
        return outs


def test_known_lesion_through_the_pipeline(tmp_path):
    # Lesion of 120 HU on slices 1..4, rows 10..21, columns 14..29 (box [14, 10, 30, 22]).
    vol = phantom(slices=7, lesion=(1, 5, 10, 22, 14, 30))
    cases = tmp_path / "cases"
    cases.mkdir()
    # 2 mm pixels = NORM_SPACING_MM of FAST: the model sees the native grid.
    write_nifti(
        cases / "ct_nifti.nii.gz", vol, spacing=(2.0, 2.0, 2.5), origin=(-40.0, -30.0, 100.0)
    )
    write_dicom_series(cases / "ct_dicom", vol, spacing=(2.0, 2.0))
    cfg = quickstart_cfg()
    lo, hi = cfg.INPUT.HU_WINDOW
    level = (80 - lo) * 255 / (hi - lo)  # between body (40 HU) and lesion (120 HU)
    gt = {"ct_nifti": {"0": [], "2": [[13, 9, 31, 23]], "6": []}}
    (tmp_path / "gt.json").write_text(json.dumps(gt), encoding="utf-8")
    out = str(tmp_path / "out")
    summary = run_prediction(
        cfg,
        str(cases),
        out,
        PredictOptions(gt=str(tmp_path / "gt.json"), progress=False),
        model=OracleModel(level),
    )
    assert [c["case"] for c in summary["cases"]] == ["ct_dicom", "ct_nifti"] and summary[
        "failed"
    ] == []
    for case in ("ct_nifti", "ct_dicom"):
        doc = json.load(open(f"{out}/{case}/detections.json", encoding="utf-8"))
        assert doc["model_input_size"] == [[40, 40]]
        assert [d["slice_index"] for d in doc["detections"]] == [1, 2, 3, 4]
        for d in doc["detections"]:
            assert [d["x1"], d["y1"], d["x2"], d["y2"]] == [14, 10, 30, 22]
            assert [d["x1_mm"], d["y1_mm"], d["width_mm"], d["height_mm"]] == [28, 20, 32, 24]
        (f,) = doc["findings"]
        assert (f["slice_first"], f["slice_last"], f["num_slices"]) == (1, 4, 4)
        assert f["extent_mm"] == pytest.approx(4 * 2.5) and f[
            "largest_diameter_mm"
        ] == pytest.approx(32.0)
        assert all(d["finding_id"] == f["finding_id"] for d in doc["detections"])
    # LPS centre of the box on NIfTI slice 3: continuous (22, 16) -> voxel (21.5, 15.5, 3).
    d3 = json.load(open(f"{out}/ct_nifti/detections.json", encoding="utf-8"))["detections"][2]
    assert d3["center_lps_mm"] == pytest.approx([-40 + 21.5 * 2, -30 + 15.5 * 2, 100 + 3 * 2.5])
    # Overlays: slices with a detection, plus slices with ground truth (0 and 6 have none drawn).
    overlays = sorted(os.listdir(f"{out}/ct_nifti/overlays"))
    assert overlays == [f"slice_{i:03d}.png" for i in (0, 1, 2, 3, 4, 6)]
    from PIL import Image

    img = np.asarray(Image.open(f"{out}/ct_nifti/overlays/slice_002.png").convert("RGB"))
    assert tuple(img[16, 13]) == GT_COLOR and tuple(img[16, 14]) == DET_COLOR
    # FROC over the three annotated slices: the one lesion is found, no false positive there.
    froc = json.load(open(f"{out}/froc.json", encoding="utf-8"))
    assert (froc["num_images"], froc["num_gt"], froc["num_hits"]) == (3, 1, 1)
    assert set(froc["sensitivity"].values()) == {1.0}
    assert froc["froc_convention"] == "continuous"  # the quickstart config's TEST.FROC_CONVENTION
    assert os.path.getsize(f"{out}/froc.png") > 1000


def test_body_crop_gives_the_same_boxes_in_slice_pixels(tmp_path):
    """INPUT.BODY_CROP: the model sees the body (rows / columns 4..35 of 40) plus a 2 mm (one
    pixel) margin, 34 x 34, and the lesion still comes out at [14, 10, 30, 22]."""
    vol = phantom(slices=5, lesion=(1, 4, 10, 22, 14, 30))
    cases = tmp_path / "cases"
    cases.mkdir()
    write_nifti(cases / "ct.nii.gz", vol, spacing=(2.0, 2.0, 2.5))
    cfg = quickstart_cfg(
        opts=["INPUT.BODY_CROP.ENABLED", "True", "INPUT.BODY_CROP.MARGIN_MM", "2.0"]
    )
    lo, hi = cfg.INPUT.HU_WINDOW
    out = str(tmp_path / "out")
    run_prediction(
        cfg,
        str(cases),
        out,
        PredictOptions(progress=False),
        model=OracleModel((80 - lo) * 255 / (hi - lo)),
    )
    doc = json.load(open(f"{out}/ct/detections.json", encoding="utf-8"))
    assert doc["model_input_size"] == [[34, 34]]
    assert [d["slice_index"] for d in doc["detections"]] == [1, 2, 3]
    for d in doc["detections"]:
        assert [d["x1"], d["y1"], d["x2"], d["y2"]] == [14, 10, 30, 22]


# ----------------------------------------------------------------------------- CLI, real model
def test_cli_folder_run(tmp_path, fpn_weights, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_nifti(cases / "vol_a.nii.gz", phantom(slices=5), spacing=(0.8, 0.8, 2.5))
    write_dicom_series(cases / "series_b", phantom(slices=5), spacing=(0.8, 0.8))
    root = str(cases / "DeepLesion")
    write_png_series(root, "000006_01_01", phantom(slices=5))
    write_dl_info(root, [dl_row("000006_01_01_003.png", spacing=(0.8, 0.8, 5.0), size=(40, 40))])
    (cases / "broken.nii.gz").write_bytes(b"not a volume")
    write_dicom_series(cases / "series_mr", phantom(slices=5), modality="MR")
    write_nifti(cases / "thin.nii.gz", phantom(slices=3), spacing=(0.8, 0.8, 1.0))
    out = str(tmp_path / "out")
    rc = predict_net.main(
        [
            "--config-file",
            "configs/quickstart/fpn.yaml",
            "--weights",
            fpn_weights,
            "--input",
            str(cases),
            "--output",
            out,
            "--score-thresh",
            "0.0",
            "--no-progress",
        ]
        + FAST
    )
    assert rc == 0
    err = capsys.readouterr().err
    summary = json.load(open(f"{out}/summary.json", encoding="utf-8"))
    assert sorted(c["case"] for c in summary["cases"]) == ["000006_01_01", "series_b", "vol_a"]
    failed = {f["case"]: f["error"] for f in summary["failed"]}
    assert set(failed) == {"broken", "series_mr", "thin"}
    assert (
        "broken.nii.gz: unreadable" in failed["broken"] and "not a CT series" in failed["series_mr"]
    )
    assert "thin.nii.gz: 3 slice(s) at 1 mm" in failed["thin"]
    assert "3 case(s) failed" in err and "series_mr" in err
    # The model saw 40 px * 0.8 mm / 2 mm = 16 px.
    assert all(c["model_input_size"] == [[16, 16]] for c in summary["cases"])
    t = summary["timing_s"]
    assert t["model_forward"] > 0 and t["total"] >= t["model_forward"]

    # Detections: per-case JSON = per-case CSV = top-level CSV = COCO results.
    rows = _read_csv(f"{out}/detections.csv")
    coco = json.load(open(f"{out}/coco_results.json", encoding="utf-8"))
    images = json.load(open(f"{out}/coco_images.json", encoding="utf-8"))
    assert len(rows) == len(coco) == sum(c["detections"] for c in summary["cases"]) > 0
    by_id = {im["id"]: im for im in images["images"]}
    assert len(by_id) == 5 + 5 + 5 and images["categories"] == [{"id": 1, "name": "lesion"}]
    for row, res in zip(rows, coco):
        im = by_id[res["image_id"]]
        assert (im["case"], im["slice_index"]) == (row["case"], int(row["slice_index"]))
        x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
        assert res["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.011)
        assert float(row["x2_mm"]) == pytest.approx(x2 * 0.8, abs=0.005)  # x2 rounded to 0.01 px
    for case in ("vol_a", "series_b", "000006_01_01"):
        doc = json.load(open(f"{out}/{case}/detections.json", encoding="utf-8"))
        assert len(doc["detections"]) == len(_read_csv(f"{out}/{case}/detections.csv"))
        members = sum(int(r["num_detections"]) for r in _read_csv(f"{out}/{case}/findings.csv"))
        assert members == len(doc["detections"])  # every detection in exactly one finding
        assert os.listdir(f"{out}/{case}/overlays")

    # No patient identifier from the DICOM headers anywhere in the outputs.
    for path, data in _all_bytes(out):
        for value in FAKE_PHI.values():
            assert value.encode() not in data, f"{value} leaked into {path}"


def test_cli_single_bad_input_names_it(tmp_path, fpn_weights, capsys):
    vol = write_nifti(tmp_path / "flat.nii.gz", phantom()[0], spacing=(0.8, 0.8))
    rc = predict_net.main(
        [
            "--config-file",
            "configs/quickstart/fpn.yaml",
            "--weights",
            fpn_weights,
            "--input",
            vol,
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert f"{vol}: a 2-D image" in capsys.readouterr().err


def test_draw_relations_needs_an_alb_head(tmp_path, fpn_weights, capsys):
    vol = write_nifti(tmp_path / "v.nii.gz", phantom())
    rc = predict_net.main(
        [
            "--config-file",
            "configs/quickstart/fpn.yaml",
            "--weights",
            fpn_weights,
            "--input",
            vol,
            "--output",
            str(tmp_path / "out"),
            "--draw-relations",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert (
        "--draw-relations: the model has no box head with region_nonlocal relations"
        in capsys.readouterr().err
    )


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_relations_and_confidence_of_elixirnet(tmp_path):
    """ElixirNet quickstart (TRPN + ALB head, random init): E of the proposals the head saw,
    proposals mapped back to native pixels, TRPN maps cropped to the image."""
    torch.manual_seed(0)
    cfg = quickstart_cfg("elixirnet", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    model = build_model(cfg).eval()
    vol = write_nifti(tmp_path / "v.nii.gz", phantom(slices=3, size=64), spacing=(1.0, 1.0, 5.0))
    predictor = CTPredictor(
        cfg, model, batch_size=2, capture_relations=True, capture_confidence=True
    )
    assert _hooks(model) == 0  # captures are hooked around each batch's forward only
    pred = predictor.predict_volume(read_case(discover_cases(vol)[0][0]))
    assert len(pred.slices) == 3 and _hooks(model) == 0
    for sp in pred.slices:
        n = len(sp.proposals)
        assert 0 < n <= 30 and sp.relations.shape == (n, n)
        np.testing.assert_allclose(sp.relations.sum(axis=1), 1.0, rtol=1e-5)  # row softmax
        # 64 px at 1 mm -> 32 px input: proposals (clipped to the input) x2 stay inside 64 x 64.
        assert sp.input_size == (32, 32)
        assert sp.proposals.min() >= 0 and sp.proposals.max() <= 64 and sp.proposals.max() > 32
        # Levels p2..p6 at strides 4..64: ceil(32 / stride) locations per side.
        assert {k: v.shape for k, v in sp.conf_maps.items()} == {
            "p2": (8, 8),
            "p3": (4, 4),
            "p4": (2, 2),
            "p5": (1, 1),
            "p6": (1, 1),
        }
        assert set(sp.conf_eps) == set(sp.conf_maps)
    out = str(tmp_path / "out")
    run_prediction(
        cfg,
        vol,
        out,
        PredictOptions(draw_relations=True, draw_confidence=True, overlays="all", progress=False),
        model=model,
    )
    for sub in ("overlays", "relations", "confidence"):
        assert sorted(os.listdir(f"{out}/v/{sub}")) == [
            "slice_000.png",
            "slice_001.png",
            "slice_002.png",
        ]


class FixedModel(nn.Module):
    """Two detections per slice, classes 3 and 0, optionally RTM-style pred_types."""

    def __init__(self, types=None):
        super().__init__()
        self.types = types

    def forward(self, inputs):
        outs = []
        for x in inputs:
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.tensor([[1.0, 1.0, 9.0, 9.0], [20.0, 20.0, 30.0, 30.0]]))
            inst.scores = torch.tensor([0.8, 0.6])
            inst.pred_classes = torch.tensor([3, 0])
            if self.types is not None:
                inst.pred_types = torch.tensor(self.types)
            outs.append({"instances": inst})
        return outs


def test_lesion_types_from_classes_or_rtm(tmp_path):
    vol = read_case(discover_cases(write_nifti(tmp_path / "v.nii.gz", phantom(slices=3)))[0][0])
    binary = CTPredictor(quickstart_cfg(), model=FixedModel()).predict_volume(vol)
    assert binary.slices[0].type_names is None  # one class: no type column
    # synthetic_test has 1 class name
    typed_cfg = quickstart_cfg(opts=["MODEL.ROI_HEADS.NUM_CLASSES", "8"])
    typed = CTPredictor(typed_cfg, model=FixedModel()).predict_volume(vol)
    assert typed.slices[0].type_names == ["liver", "bone"]  # DeepLesion Coarse_lesion_type 4 and 1
    rtm = CTPredictor(quickstart_cfg(), model=FixedModel(types=[4, 7])).predict_volume(vol)
    assert rtm.slices[0].type_names == ["lung", "pelvis"]
    from elixir_d2.inference.outputs import detection_rows

    assert [r["lesion_type"] for r in detection_rows(rtm)][:2] == ["lung", "pelvis"]


def test_ground_truth_files(tmp_path):
    from elixir_d2.inference import load_ground_truth

    rows = [
        dl_row("000007_01_01_005.png", box=(11, 21, 31, 41)),
        dl_row("000007_01_01_005.png", box=(1, 2, 5, 6)),
        dl_row("000007_01_01_006.png", box=(3, 3, 9, 9), noisy=1),
    ]
    gt = load_ground_truth(write_dl_info(str(tmp_path / "DL"), rows))
    # DL_info boxes minus 1 (the loader's convention); the noisy lesion is left out.
    assert list(gt) == ["000007_01_01"] and list(gt["000007_01_01"]) == [5]
    np.testing.assert_array_equal(gt["000007_01_01"][5], [[10, 20, 30, 40], [0, 1, 4, 5]])
    (tmp_path / "g.json").write_text(
        json.dumps({"c": {"3": [[1, 2, 3, 4]], "4": []}}), encoding="utf-8"
    )
    g = load_ground_truth(str(tmp_path / "g.json"))
    assert g["c"][3].tolist() == [[1, 2, 3, 4]] and g["c"][4].shape == (0, 4)
    (tmp_path / "bad.json").write_text(json.dumps({"c": {"3": [[5, 2, 3, 4]]}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: case 'c' slice 3: boxes must be"):
        load_ground_truth(str(tmp_path / "bad.json"))
