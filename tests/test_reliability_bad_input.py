"""Bad-input matrix (issue 9): every fault gives an error naming the file / key / value at fault,
or a documented, counted skip. Cases already tested elsewhere are referenced, not repeated:
  corrupt PNG, 8-bit PNG            test_ct_mapper.py::test_corrupt_and_8bit_png_named
  missing key slice (counted skip)  test_deeplesion.py::test_missing_key_slice_is_counted_not_silent
  DL_info column missing / malformed test_deeplesion.py::test_headerless_or_missing_columns,
                                    ::test_malformed_row_names_file_row_and_column
  genotype unknown op / edge        test_alb_genotype.py::test_validation_errors_name_file_and_entry
  NIfTI 2-D / RGB / not HU / no spacing  test_predict_io.py::test_nifti_bad_inputs_are_named, ...
  image without lesion in the FROC denominator
                                    test_froc.py::test_images_without_lesions_count_in_the_fp_denominator
"""

import logging
import os
import re
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from elixir_d2.checkpoint import AtomicCheckpointer
from elixir_d2.data.ct_mapper import CTDatasetMapper, CTSliceError, read_hu_slice
from elixir_d2.data.deeplesion import (
    LOAD_STATS,
    DeepLesionFormatError,
    load_deeplesion_dicts,
    read_dl_info,
)
from elixir_d2.data.kits19 import KiTS19Error, read_nifti_image, write_nifti
from elixir_d2.inference.volume_io import CTInputError
from elixir_d2.inference.volume_io import read_nifti as volume_read_nifti
from elixir_d2.modeling.alb.genotype import GenotypeError

from conftest import dl_row, write_dl_info, write_slice
from reliability_helpers import QUICKSTART, REPO, build_cfg

RNG = np.random.default_rng(0)
NOISE = RNG.normal(0, 200, (64, 64))  # incompressible enough that half a file is half the pixels


# ----------------------------------------------------------------------------- PNG slices
def _series(root, n=3):
    for k in range(1, n + 1):
        write_slice(root, "000001_01_01", k, NOISE)
    return os.path.join(root, "Images_png", "000001_01_01")


def _record(slice_dir, with_lesion=True):
    anns = (
        [{"bbox": [10.0, 12.0, 30.0, 28.0], "bbox_mode": 0, "category_id": 0}]
        if with_lesion
        else []
    )
    return {
        "file_name": f"{slice_dir}/002.png",
        "image_id": 0,
        "height": 64,
        "width": 64,
        "slice_dir": slice_dir,
        "slice_idx": 2,
        "slice_range": (1, 3),
        "slice_intv": 2.0,
        "spacing": 0.8,
        "annotations": anns,
    }


def _mapper(is_train=True):
    return CTDatasetMapper(is_train, norm_spacing_mm=0, flip_prob=0.0)


@pytest.mark.parametrize("cut", ["half", "header_only", "empty"])
def test_truncated_png_is_named(tmp_path, cut):
    d = _series(str(tmp_path))
    path = f"{d}/003.png"
    data = open(path, "rb").read()
    keep = {"half": len(data) // 2, "header_only": 33, "empty": 0}[cut]
    with open(path, "wb") as f:
        f.write(data[:keep])
    with pytest.raises(CTSliceError, match=r"cannot read CT slice .*000001_01_01/003\.png"):
        read_hu_slice(path)
    # and on the training path: a neighbour slice of the key slice 002
    with pytest.raises(CTSliceError, match=r"003\.png"):
        _mapper()(_record(d))


@pytest.mark.parametrize("mode", ["L", "RGB", "1", "RGBA"])
def test_png_of_the_wrong_pixel_type_is_named(tmp_path, mode):
    d = _series(str(tmp_path))
    Image.new(mode, (64, 64)).save(f"{d}/002.png")
    with pytest.raises(
        CTSliceError, match=rf"002\.png: expected a 16-bit grayscale PNG .* got mode '{mode}'"
    ):
        _mapper()(_record(d))


# ----------------------------------------------------------------------------- NIfTI
def _ct_volume():
    return np.random.default_rng(1).normal(0, 300, (6, 32, 32)).astype(np.int16)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_nifti_is_an_error_not_zeros(tmp_path, ext):
    # SimpleITK reads a cut-off file without complaint and fills the rest with zeros
    import SimpleITK as sitk

    path = str(tmp_path / f"imaging{ext}")
    write_nifti(_ct_volume(), (0.8, 0.8, 2.0), path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    zero_filled = sitk.GetArrayFromImage(sitk.ReadImage(path))
    # the silent failure
    assert zero_filled.shape == (6, 32, 32) and (zero_filled == 0).mean() > 0.4
    with pytest.raises(
        KiTS19Error, match=rf"cannot read case_00001 imaging .*imaging{ext}: .*truncated file"
    ):
        read_nifti_image(path, "case_00001 imaging")
    with pytest.raises(
        CTInputError, match=rf"imaging{ext}: unreadable NIfTI file \(.*truncated file"
    ):
        volume_read_nifti(path, "case")


def test_complete_nifti_still_reads(tmp_path):
    for ext in (".nii.gz", ".nii"):
        path = str(tmp_path / f"v{ext}")
        write_nifti(_ct_volume(), (0.8, 0.8, 2.0), path)
        np.testing.assert_array_equal(
            volume_read_nifti(path, "v").hu, _ct_volume().astype(np.float32)
        )


# ----------------------------------------------------------------------------- DL_info.csv
@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty file"),
        ("\n \n", "empty file"),
        (",".join(dl_row().keys()) + "\n", "a header but no lesion rows"),
        # headerless: the first lesion row is taken for the header
        (
            ",".join(f'"{v}"' for v in dl_row().values()) + "\n",
            r"header lacks column\(s\) \['File_name'",
        ),
    ],
)
def test_empty_or_headerless_dl_info(dl_root, text, match):
    os.makedirs(dl_root)
    path = os.path.join(dl_root, "DL_info.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with pytest.raises(DeepLesionFormatError, match=match) as info:
        read_dl_info(path)
    assert path in str(info.value)
    with pytest.raises(DeepLesionFormatError, match=match):
        load_deeplesion_dicts(dl_root, "test")


def test_dl_info_that_is_not_text(dl_root):
    os.makedirs(dl_root)
    with open(os.path.join(dl_root, "DL_info.csv"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    with pytest.raises(DeepLesionFormatError, match=r"DL_info\.csv: not a text \(UTF-8\) file"):
        read_dl_info(os.path.join(dl_root, "DL_info.csv"))


@pytest.mark.parametrize(
    "box, match",
    [
        ((11, 21, 11, 41), "empty or inverted box '11, 21, 11, 41'"),  # zero width
        ((11, 21, 31, 21), "empty or inverted box"),  # zero height
        ((70, 10, 80, 20), r"box '70, 10, 80, 20' lies outside the 64 x 64 image"),
        ((-20, -20, -5, -5), "lies outside the 64 x 64 image"),
        ((10, 66, 20, 70), "lies outside"),
    ],
)
def test_box_of_zero_size_or_outside_the_image_is_an_error(dl_root, box, match):
    path = write_dl_info(dl_root, [dl_row(), dl_row(box=box)])
    with pytest.raises(DeepLesionFormatError, match=match) as info:
        read_dl_info(path)
    assert "row 3, column Bounding_boxes" in str(info.value)


def test_box_past_the_border_is_clipped_and_counted(dl_root, caplog):
    # DL_info boxes are 1-based: (0.5, ...) becomes -0.5 after the minus-1 convention
    write_dl_info(
        dl_root,
        [dl_row(box=(0.5, 10, 20, 30)), dl_row(box=(50, 55, 70, 66)), dl_row(box=(5, 5, 9, 9))],
    )
    write_slice(dl_root, "000001_01_01", 5, NOISE)
    (rec,) = load_deeplesion_dicts(dl_root, "test")
    assert [a["bbox"] for a in rec["annotations"]] == [
        [0.0, 9.0, 19.0, 29.0],
        [49.0, 54.0, 64.0, 64.0],
        [4.0, 4.0, 8.0, 8.0],
    ]
    assert LOAD_STATS[(dl_root, "test", False)]["clipped_box"] == 2
    assert "clipped 2 boxes reaching past the image border" in caplog.text


# ---------------------------------------------------------------- a key slice with no lesion
@pytest.fixture(scope="module")
def fpn_model():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(build_cfg(["INPUT.MAX_IMAGE_SIZE", "64"]))
    return model


def test_key_slice_without_lesion_trains_as_a_negative_and_counts_in_evaluation(dl_root, fpn_model):
    from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

    from elixir_d2.data import register_deeplesion
    from elixir_d2.evaluation import LesionEvaluator

    # typed val: key slice 005's only lesion has no type, so its record keeps no annotation
    write_dl_info(
        dl_root,
        [
            dl_row("000001_01_01_005.png", split=2, lesion_type=-1),
            dl_row("000002_01_01_005.png", split=2, lesion_type=4, box=(21, 21, 41, 41)),
        ],
    )
    for series in ("000001_01_01", "000002_01_01"):
        for k in (4, 5, 6):
            write_slice(dl_root, series, k, NOISE)
    prefix = f"rel_empty_{uuid.uuid4().hex[:6]}"
    register_deeplesion(dl_root, prefix=prefix)
    name = f"{prefix}_val_typed"
    recs = DatasetCatalog.get(name)
    assert [len(r["annotations"]) for r in recs] == [0, 1]
    assert LOAD_STATS[(dl_root, "val", True)]["untyped_lesion"] == 1  # counted

    # training keeps it (Base-DeepLesion: FILTER_EMPTY_ANNOTATIONS False) as a negative image
    cfg = build_cfg([])
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False
    assert (
        len(
            get_detection_dataset_dicts(
                [name], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
        )
        == 2
    )
    mapper = CTDatasetMapper(cfg, is_train=True)
    # (the quickstart model is binary: the typed lesion trains as class 0 here)
    batch = [
        mapper(dict(r, annotations=[dict(a, category_id=0) for a in r["annotations"]]))
        for r in recs
    ]
    assert len(batch[0]["instances"]) == 0 and len(batch[1]["instances"]) == 1
    fpn_model.train()
    with EventStorage(0):
        losses = fpn_model(batch[:1])  # a batch of only the negative image
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_box_reg"].item() == 0.0  # nothing to regress: no foreground
        assert all(torch.isfinite(v) for v in fpn_model(batch).values())
    fpn_model.eval()

    # evaluation: its detections are false positives, and it counts in the FP-per-image rate
    MetadataCatalog.get(name)  # registered with the 8 lesion types
    ev = LesionEvaluator(name, None, distributed=False, fps=(0.25, 0.5))
    ev.reset()
    preds = {
        recs[0]["image_id"]: [([40, 40, 50, 50], 0.95)],
        recs[1]["image_id"]: [([20, 20, 40, 40], 0.9), ([0, 0, 8, 8], 0.85), ([50, 0, 60, 8], 0.8)],
    }
    for image_id, p in preds.items():
        inst = Instances((64, 64))
        inst.pred_boxes = Boxes(torch.tensor([b for b, _ in p], dtype=torch.float32))
        inst.scores = torch.tensor([s for _, s in p])
        inst.pred_classes = torch.tensor([3] * len(p))
        ev.process([{"image_id": image_id}], [{"instances": inst}])
    m = ev.evaluate()["lesion"]
    assert m["num_images"] == 2 and m["num_lesions"] == 1
    # Ranked: FP (empty image), hit, FP, FP over 2 images: curve (0, 0), (0.5, 1), (1, 1), so
    # 50 % at 0.25 FPs/image and 100 % at 0.5. Leaving the empty image out altogether would give
    # 100 % at 0.25; counting its FP but not the image, 25 % at 0.25 and 50 % at 0.5.
    assert m["sens@0.25_iou"] == pytest.approx(50.0) and m["sens@0.5_iou"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- configs, genotypes
def test_unknown_config_key_is_named(tmp_path):
    from elixir_d2.cli import UnknownKeyError, UserInputError

    with pytest.raises(
        UnknownKeyError,
        match=r"override MODEL\.TRPN\.THRESHOLDD: unknown config key; "
        r"did you mean MODEL\.TRPN\.THRESHOLD\?",
    ):
        build_cfg(["MODEL.TRPN.THRESHOLDD", "0.5"])  # command-line opts (yacs)
    yaml_path = tmp_path / "typo.yaml"
    yaml_path.write_text(f'_BASE_: "{QUICKSTART}"\nSOLVER:\n  MAX_ITERS: 10\n', encoding="utf-8")
    with pytest.raises(
        UnknownKeyError,
        match=r"typo\.yaml: unknown config key SOLVER\.MAX_ITERS; did you mean "
        r"SOLVER\.MAX_ITER\?",
    ):
        build_cfg([], str(yaml_path))
    with pytest.raises(UserInputError, match=r"Type mismatch .* for config key: SOLVER\.MAX_ITER"):
        build_cfg(["SOLVER.MAX_ITER", "ten"])


def test_config_yaml_that_would_run_code_is_refused(tmp_path):
    from detectron2.engine import default_argument_parser

    import predict_net
    import train_net

    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f'_BASE_: "{QUICKSTART}"\nSEED: !!python/object/apply:os.system ["touch {marker}"]\n',
        encoding="utf-8",
    )
    from elixir_d2.cli import UserInputError

    with pytest.raises(
        UserInputError,
        match=r"evil\.yaml: not a plain-data YAML config "
        r".*python/object/apply:os\.system",
    ):
        train_net.setup(default_argument_parser().parse_args(["--config-file", str(path)]))
    with pytest.raises(UserInputError, match="python/object/apply"):
        predict_net.setup_cfg(
            predict_net.build_parser().parse_args(
                ["--config-file", str(path), "--input", "x", "--output", str(tmp_path)]
            )
        )
    assert not marker.exists()
    # the hazard refused: detectron2's own default (allow_unsafe=True) falls back to unsafe_load
    from detectron2.config import CfgNode

    loaded = CfgNode.load_yaml_with_base(str(path), allow_unsafe=True)
    assert marker.exists() and loaded["SEED"] == 0  # os.system's exit status


def test_genotype_with_unknown_op_fails_the_model_build_naming_the_file(tmp_path):
    import yaml

    from detectron2.modeling import build_model

    with open(os.path.join(REPO, "configs", "genotypes", "figure3.yaml"), encoding="utf-8") as f:
        genotype = yaml.safe_load(f)
    genotype["normal"][0][0] = "conv_9x9"
    bad = tmp_path / "bad_genotype.yaml"
    bad.write_text(yaml.safe_dump(genotype), encoding="utf-8")
    cfg = build_cfg(
        ["MODEL.ALB.GENOTYPE", str(bad)], os.path.join(REPO, "configs", "quickstart", "alb.yaml")
    )
    with pytest.raises(
        GenotypeError, match=r"bad_genotype\.yaml: normal\[0\] .*unknown op 'conv_9x9'"
    ):
        build_model(cfg)


# ----------------------------------------------------------------------------- checkpoints
class Payload:
    """Anything but tensors and plain containers: what weights_only=True refuses to unpickle."""


def _capture(name="fvcore.common.checkpoint"):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    return records, lambda: logger.removeHandler(handler)


def _load(model, path):
    records, done = _capture()
    try:
        AtomicCheckpointer(model).load(path)
    finally:
        done()
    summary = [r.getMessage() for r in records if "does not match the model" in r.getMessage()]
    return summary


@pytest.fixture(scope="module")
def fpn_checkpoint(fpn_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "fpn.pth")
    torch.save({"model": fpn_model.state_dict(), "iteration": 3}, path)
    return path


def test_checkpoint_of_a_model_with_other_shapes_is_summarised(fpn_model, fpn_checkpoint):
    from detectron2.modeling import build_model

    typed = build_model(build_cfg(["MODEL.ROI_HEADS.NUM_CLASSES", "8"]))
    ref, own = fpn_model.state_dict(), typed.state_dict()
    other_shape = sorted(k for k in own if k in ref and ref[k].shape != own[k].shape)
    assert len(other_shape) == 4  # cls_score and bbox_pred, weight and bias
    (summary,) = _load(typed, fpn_checkpoint)
    assert f"Checkpoint {fpn_checkpoint} does not match the model" in summary
    weights = [k for k in own if not k.endswith("num_batches_tracked")]  # BN counters left out
    assert f"{len(weights) - 4} of the model's {len(weights)} tensors loaded" in summary
    first = next(k for k in ref if k in other_shape)  # in checkpoint order
    assert (
        f"4 of another shape, skipped (first: {first} {tuple(ref[first].shape)} in the "
        f"checkpoint, {tuple(own[first].shape)} in the model)"
    ) in summary
    assert "missing from the checkpoint" not in summary


def test_checkpoint_of_a_model_with_another_head_is_summarised(fpn_model, fpn_checkpoint):
    from detectron2.modeling import build_model

    alb = build_model(build_cfg([], os.path.join(REPO, "configs", "quickstart", "alb.yaml")))
    # BatchNorm step counters are not weights: torch fills a missing one without reporting it,
    # and the summary leaves them out of its counts.
    ref = [k for k in fpn_model.state_dict() if not k.endswith("num_batches_tracked")]
    own = [k for k in alb.state_dict() if not k.endswith("num_batches_tracked")]
    missing, unexpected = sorted(set(own) - set(ref)), sorted(set(ref) - set(own))
    assert len(own) < len(alb.state_dict())  # the ALB head's BatchNorms do have counters
    assert missing and unexpected
    (summary,) = _load(alb, fpn_checkpoint)
    first_missing = re.search(r"(\d+) missing from the checkpoint \(first: \[([^]]*)\]\)", summary)
    assert int(first_missing.group(1)) == len(missing)
    assert all(k.strip(" '") in missing for k in first_missing.group(2).split(","))
    first_unexpected = re.search(
        r"(\d+) in the checkpoint but not in the model \(first: "
        r"\[([^]]*)\]\)",
        summary,
    )
    assert int(first_unexpected.group(1)) == len(unexpected)
    assert all(k.strip(" '") in unexpected for k in first_unexpected.group(2).split(","))
    assert f"{len(own) - len(missing)} of the model's {len(own)} tensors loaded" in summary


def test_matching_checkpoint_logs_no_summary(fpn_model, fpn_checkpoint):
    assert _load(fpn_model, fpn_checkpoint) == []


def test_checkpoint_of_an_unrelated_model_is_an_error(fpn_model, tmp_path):
    import torchvision

    path = str(tmp_path / "resnet18.pth")
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"resnet18\.pth does not belong to this model: none of its "
        rf"{len(state)} tensors matches one of the model's "
        rf"{len(fpn_model.state_dict())}",
    ):
        AtomicCheckpointer(fpn_model).load(path)


def test_checkpoint_that_would_run_code_is_refused(fpn_model, tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(
        ValueError, match=r"evil\.pth holds more than tensors .*weights_only=True\) refused it"
    ):
        AtomicCheckpointer(fpn_model).load(path)


def test_truncated_checkpoint_is_named(fpn_model, fpn_checkpoint, tmp_path):
    path = tmp_path / "cut.pth"
    data = open(fpn_checkpoint, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"cut\.pth is unreadable \(truncated or not a torch\.save file\)"
    ):
        AtomicCheckpointer(fpn_model).load(str(path))
