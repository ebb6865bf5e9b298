"""Body crop at inference (elixir_d2/data/body_crop.py, INPUT.BODY_CROP): the box found by hand,
the mapper's crop and scale, network pixels mapped back to the slice's by the model's postprocess
(BodyCropRCNN, every shipped config's; the mapper refuses another). The model's side by hand:
test_meta_arch.py."""

import os

import numpy as np
import pytest
import torch

from detectron2.structures import Boxes, BoxMode, Instances

from elixir_d2 import load_config
from elixir_d2.cli import UserInputError
from elixir_d2.data.body_crop import body_box
from elixir_d2.data.ct_mapper import CTDatasetMapper, window_to_uint8_range
from elixir_d2.modeling.meta_arch import to_slice_frame

from config_files import CONFIGS, shipped_configs
from conftest import write_slice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AIR = -1000.0


def _phantom(h=64, w=64):
    """Air, a 20 x 20 body at rows 10-29 / cols 5-24, a table strip at rows 35-36 across the
    whole width (kept: 128 px, 32% of the body) and a 1-pixel speck at row 60 (left out)."""
    hu = np.full((h, w), AIR)
    hu[10:30, 5:25] = 40.0
    hu[35:37, :] = 0.0
    hu[60, 30] = 100.0
    return hu


def test_body_box_by_hand():
    hu = _phantom()
    # Body and table: x 0..64, y 10..37 (end-exclusive); the speck would pull y1 to 61.
    assert body_box(hu, -500.0, 0) == (0, 10, 64, 37)
    assert body_box(hu, -500.0, 2) == (0, 8, 64, 39)
    # A threshold above the table's 0 HU leaves the body alone (the speck is still a speck).
    assert body_box(hu, 20.0, 3) == (2, 7, 28, 33)
    # A margin past the slice is clipped to it.
    assert body_box(hu, 20.0, 50) == (0, 0, 64, 64)


def test_body_box_empty_slice_and_bad_arguments():
    assert body_box(np.full((16, 16), AIR), -500.0, 4) is None
    with pytest.raises(ValueError, match="margin"):
        body_box(_phantom(), -500.0, -1)
    with pytest.raises(ValueError, match="2-D"):
        body_box(np.zeros((4, 4, 3)), -500.0, 0)


def _record(tmp_path, hu, spacing):
    for idx in (1, 2, 3):
        write_slice(str(tmp_path), "000001_01_01", idx, hu)
    d = f"{tmp_path}/Images_png/000001_01_01"
    return {
        "file_name": f"{d}/002.png",
        "image_id": 0,
        "height": hu.shape[0],
        "width": hu.shape[1],
        "slice_dir": d,
        "slice_idx": 2,
        "slice_range": (1, 3),
        "slice_intv": 2.0,
        "spacing": spacing,
        "annotations": [{"bbox": [6, 12, 10, 16], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}],
    }


def _mapper(is_train=False, **kw):
    args = dict(
        num_slices=3,
        slice_interval_mm=2.0,
        hu_window=(-1024.0, 3071.0),
        norm_spacing_mm=0.8,
        max_size=512,
        flip_prob=0.0,
        body_crop=True,
        body_hu_threshold=-500.0,
        body_margin_mm=1.6,
    )
    args.update(kw)
    return CTDatasetMapper(is_train, **args)


def test_mapper_crops_test_slices_to_the_body(tmp_path):
    hu = _phantom()
    # 0.8 mm pixels at 0.8 mm: no resampling; a 1.6 mm margin is 2 pixels -> box (0, 8, 64, 39).
    out = _mapper()(_record(tmp_path, hu, spacing=0.8))
    assert out["body_crop"] == (0, 8, 64, 39)
    # The image is the crop; height / width stay the slice's (where outputs go).
    assert tuple(out["image"].shape[1:]) == (31, 64)
    assert (out["height"], out["width"]) == (64, 64)
    expected = window_to_uint8_range(hu[8:39, :], (-1024.0, 3071.0))
    np.testing.assert_allclose(out["image"][1].numpy(), expected, atol=1e-4)
    assert "body_crop" not in _mapper(body_crop=False)(_record(tmp_path, hu, spacing=0.8))


def test_crop_keeps_the_whole_slices_scale_and_boxes_map_back(tmp_path):
    hu = _phantom()
    hu[20:22, 14:16] = 1000.0  # a 2 x 2 marker inside the body, slice pixels x 14-16, y 20-22
    # 1.6 mm pixels resampled to 0.8 mm: x2, but the cap of 96 px on the 64 px slice's longer
    # side makes it x1.5. The crop (y 8-39, 31 rows) must get the slice's x1.5, not its own x2.
    out = _mapper(max_size=96, body_margin_mm=3.2)(_record(tmp_path, hu, spacing=1.6))
    assert out["body_crop"] == (0, 8, 64, 39)
    assert tuple(out["image"].shape[1:]) == (round(31 * 1.5), 96)
    # Where the marker lands in the network input, mapped back by the model's postprocess: the
    # marker's slice pixels.
    img = out["image"][1].numpy()
    ys, xs = np.nonzero(img > img.max() - 1.0)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    inst = Instances(img.shape)
    inst.pred_boxes = Boxes(torch.tensor([[cx - 1, cy - 1, cx + 1, cy + 1]]))
    box = to_slice_frame(inst, out).pred_boxes.tensor[0].numpy()
    np.testing.assert_allclose(
        [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], [15.0, 21.0], atol=0.35
    )


def test_training_never_body_crops(tmp_path):
    out = _mapper(is_train=True)(_record(tmp_path, _phantom(), spacing=0.8))
    assert "body_crop" not in out and tuple(out["image"].shape[1:]) == (64, 64)
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), [[6, 12, 10, 16]])


def test_mapper_sees_an_empty_slice_whole(tmp_path):
    out = _mapper()(_record(tmp_path, np.full((32, 48), AIR), spacing=0.8))
    assert "body_crop" not in out and tuple(out["image"].shape[1:]) == (32, 48)


def test_negative_margin_is_refused():
    with pytest.raises(ValueError, match="MARGIN_MM"):
        _mapper(body_margin_mm=-1.0)


def test_every_shipped_config_undoes_the_crop_in_its_model():
    configs = shipped_configs()
    assert len(configs) > 30
    for f in configs:
        assert load_config(os.path.join(CONFIGS, f)).MODEL.META_ARCHITECTURE == "BodyCropRCNN", f


def test_body_crop_with_another_meta_architecture_is_refused():
    cfg = load_config(
        os.path.join(REPO, "configs", "quickstart", "fpn.yaml"), ["INPUT.BODY_CROP.ENABLED", "True"]
    )
    assert CTDatasetMapper(cfg, is_train=False).body_crop
    # A config saved before BodyCropRCNN existed: GeneralizedRCNN would stretch the crop.
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    with pytest.raises(
        UserInputError, match="needs MODEL.META_ARCHITECTURE BodyCropRCNN.*got 'GeneralizedRCNN'"
    ):
        CTDatasetMapper(cfg, is_train=False)
    assert not CTDatasetMapper(cfg, is_train=True).body_crop  # training never crops
    cfg.INPUT.BODY_CROP.ENABLED = False
    assert not CTDatasetMapper(cfg, is_train=False).body_crop
