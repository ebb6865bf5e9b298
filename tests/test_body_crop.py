"""Body crop at inference (elixir_d2/data/body_crop.py, INPUT.BODY_CROP): the box found by hand,
the mapper's crop and scale, and predictions shifted back to slice pixels by the evaluators."""
import numpy as np
import pytest
import torch
from test_lesion_evaluator import binary_name, binary_predictions, run  # noqa: F401 (fixture)

from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from elixir_d2.data.body_crop import body_box, to_slice_pixels
from elixir_d2.data.ct_mapper import CTDatasetMapper, window_to_uint8_range
from elixir_d2.evaluation import LesionEvaluator
from elixir_d2.evaluation.proposal_recall import ProposalRecallEvaluator

from conftest import write_slice

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


def test_to_slice_pixels_shifts_only_cropped_records():
    boxes = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_slice_pixels(boxes, {}), boxes)
    out = to_slice_pixels(boxes, {"body_crop": (10, 20, 50, 60)})
    np.testing.assert_array_equal(out, [[11.0, 22.0, 13.0, 24.0]])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(to_slice_pixels(np.array([[0, 0, 1, 1]]), {"body_crop":
                                                   (5, 6, 9, 9)}), [[5.0, 6.0, 6.0, 7.0]])


def _record(tmp_path, hu, spacing):
    for idx in (1, 2, 3):
        write_slice(str(tmp_path), "000001_01_01", idx, hu)
    d = f"{tmp_path}/Images_png/000001_01_01"
    return {"file_name": f"{d}/002.png", "image_id": 0, "height": hu.shape[0],
            "width": hu.shape[1], "slice_dir": d, "slice_idx": 2, "slice_range": (1, 3),
            "slice_intv": 2.0, "spacing": spacing,
            "annotations": [{"bbox": [6, 12, 10, 16], "bbox_mode": BoxMode.XYXY_ABS,
                             "category_id": 0}]}


def _mapper(is_train=False, **kw):
    args = dict(num_slices=3, slice_interval_mm=2.0, hu_window=(-1024.0, 3071.0),
                norm_spacing_mm=0.8, max_size=512, flip_prob=0.0, body_crop=True,
                body_hu_threshold=-500.0, body_margin_mm=1.6)
    args.update(kw)
    return CTDatasetMapper(is_train, **args)


def test_mapper_crops_test_slices_to_the_body(tmp_path):
    hu = _phantom()
    # 0.8 mm pixels at 0.8 mm: no resampling; a 1.6 mm margin is 2 pixels -> box (0, 8, 64, 39).
    out = _mapper()(_record(tmp_path, hu, spacing=0.8))
    assert out["body_crop"] == (0, 8, 64, 39)
    assert (out["height"], out["width"]) == (31, 64)
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
    # Where the marker lands in the network input, mapped back as detectron2's postprocessing
    # (x height / input height) and the evaluators (to_slice_pixels) do: the marker's pixels.
    img = out["image"][1].numpy()
    ys, xs = np.nonzero(img > img.max() - 1.0)
    sy = out["height"] / img.shape[0]
    sx = out["width"] / img.shape[1]
    centre = to_slice_pixels(np.array([[xs.mean() + 0.5, ys.mean() + 0.5] * 2])
                             * np.array([sx, sy, sx, sy]), out)
    np.testing.assert_allclose(centre[0, :2], [15.0, 21.0], atol=0.35)


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


def test_lesion_evaluator_shifts_cropped_predictions_back(binary_name, tmp_path):  # noqa: F811
    """The hand-computed FROC of test_lesion_evaluator, with every prediction given in the frame
    of a crop at (30, 40): the same numbers once shifted back, none without the offset."""
    preds = binary_predictions()
    ev = LesionEvaluator(binary_name, str(tmp_path), distributed=False)
    ev.reset()
    for image_id in [14, 12, 13, 11]:
        p = preds[image_id]
        inst = Instances((200, 200))
        inst.pred_boxes = Boxes(torch.tensor([q[0] for q in p], dtype=torch.float32).reshape(-1, 4)
                                - torch.tensor([30.0, 40.0, 30.0, 40.0]))
        inst.scores = torch.tensor([q[1] for q in p], dtype=torch.float32)
        inst.pred_classes = torch.zeros(len(p), dtype=torch.int64)
        ev.process([{"image_id": image_id, "body_crop": (30, 40, 200, 200)}],
                   [{"instances": inst}])
    m = ev.evaluate()["lesion"]
    assert m["sens@1_iou"] == pytest.approx(200.0 / 3) and m["sens@6_iou"] == pytest.approx(100.0)
    unshifted = run(LesionEvaluator(binary_name, str(tmp_path), distributed=False),
                    {i: [([b[0] - 30, b[1] - 40, b[2] - 30, b[3] - 40], s) for b, s, *_ in p]
                     for i, p in preds.items()}, [14, 12, 13, 11])["lesion"]
    assert unshifted["sens@8_iou"] == 0.0


def test_proposal_recall_shifts_cropped_proposals_back():
    name = "proposal_recall_body_crop_test"
    records = [{"image_id": 3, "height": 100, "width": 200,
                "annotations": [{"bbox": [120, 60, 140, 80], "bbox_mode": BoxMode.XYXY_ABS}]}]
    DatasetCatalog.register(name, lambda: records)
    try:
        captured = []
        ev = ProposalRecallEvaluator(name, captured, topks=(1,))
        # Crop x 100-200, y 50-100 seen at half size (50 x 25): the lesion at [10, 5, 20, 15].
        p = Instances((25, 50))
        p.proposal_boxes = Boxes(torch.tensor([[10.0, 5.0, 20.0, 15.0]]))
        p.objectness_logits = torch.tensor([1.0])
        captured.append(p)
        ev.process([{"image_id": 3, "height": 50, "width": 100, "body_crop": (100, 50, 200, 100)}],
                   [{}])
        assert ev.evaluate()["proposals"]["recall@1"] == 100.0
    finally:
        DatasetCatalog.remove(name)
