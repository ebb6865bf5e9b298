"""BodyCropRCNN (elixir_d2/modeling/meta_arch.py): a body-cropped input's detections and
proposals come out in whole-slice pixels, worked out by hand; callers (the evaluators) read them
as they are; without a crop it is GeneralizedRCNN, whose checkpoints it shares."""

import os

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, BoxMode, Instances

from elixir_d2 import load_config
from elixir_d2.evaluation import LesionEvaluator
from elixir_d2.evaluation.proposal_recall import ProposalRecallEvaluator
from elixir_d2.modeling.capture import capture
from elixir_d2.modeling.meta_arch import BodyCropRCNN, to_slice_frame

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 200 x 100 slice whose body crop is x 50-110, y 40-80 (60 x 40), seen by the network at half
# size (30 x 20): network pixels map to slice pixels as x -> 2x + 50, y -> 2y + 40.
SLICE = {"height": 100, "width": 200}
CROP = (50, 40, 110, 80)
NET_HW = (20, 30)
# Detections in network pixels: inside; past the right / bottom edge (clipped to the crop);
# wholly right of the input (empty once clipped, dropped).
DETECTIONS = [[3.0, 4.0, 9.0, 10.0], [25.0, 15.0, 35.0, 25.0], [31.0, 2.0, 33.0, 6.0]]
SCORES = [0.9, 0.8, 0.7]
# x2, +(50, 40); the second clipped to the crop (scaled [50, 30, 70, 50] -> [50, 30, 60, 40]).
DETECTIONS_IN_SLICE = [[56.0, 48.0, 68.0, 60.0], [100.0, 70.0, 110.0, 80.0]]
# Proposals: scaled and shifted, never clipped nor dropped; order kept.
PROPOSALS = [[3.0, 4.0, 9.0, 10.0], [31.0, 2.0, 33.0, 6.0], [25.0, 15.0, 30.0, 20.0]]
LOGITS = [2.0, 1.5, 1.0]
PROPOSALS_IN_SLICE = [
    [56.0, 48.0, 68.0, 60.0],
    [112.0, 44.0, 116.0, 52.0],
    [100.0, 70.0, 110.0, 80.0],
]


def _instances(image_size, boxes, scores, proposals=False):
    inst = Instances(tuple(image_size))
    if proposals:
        inst.proposal_boxes = Boxes(torch.tensor(boxes))
        inst.objectness_logits = torch.tensor(scores)
    else:
        inst.pred_boxes = Boxes(torch.tensor(boxes))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
    return inst


def test_to_slice_frame_by_hand():
    inp = {**SLICE, "body_crop": CROP}
    det = to_slice_frame(_instances(NET_HW, DETECTIONS, SCORES), inp)
    assert det.image_size == (100, 200)
    torch.testing.assert_close(det.pred_boxes.tensor, torch.tensor(DETECTIONS_IN_SLICE))
    torch.testing.assert_close(det.scores, torch.tensor(SCORES[:2]))
    raw = _instances(NET_HW, PROPOSALS, LOGITS, proposals=True)
    prop = to_slice_frame(raw, inp, clip=False)
    assert prop.image_size == (100, 200)
    torch.testing.assert_close(prop.proposal_boxes.tensor, torch.tensor(PROPOSALS_IN_SLICE))
    torch.testing.assert_close(raw.proposal_boxes.tensor, torch.tensor(PROPOSALS))  # a copy
    # No crop: detectron2's postprocess into height x width (x2 here), nothing shifted.
    whole = to_slice_frame(_instances(NET_HW, DETECTIONS, SCORES), {"height": 40, "width": 60})
    assert whole.image_size == (40, 60)
    torch.testing.assert_close(
        whole.pred_boxes.tensor, torch.tensor([[6.0, 8.0, 18.0, 20.0], [50.0, 30.0, 60.0, 40.0]])
    )
    # A crop box must lie in the slice it names.
    with pytest.raises(ValueError, match="inside the 200 x 100 slice"):
        to_slice_frame(
            _instances(NET_HW, DETECTIONS, SCORES), {**SLICE, "body_crop": (0, 0, 201, 9)}
        )
    with pytest.raises(ValueError, match="'height'"):
        to_slice_frame(_instances(NET_HW, DETECTIONS, SCORES), {"body_crop": CROP})


def _model(meta_arch="BodyCropRCNN"):
    torch.manual_seed(0)
    cfg = load_config(
        os.path.join(REPO, "configs", "quickstart", "fpn.yaml"),
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.META_ARCHITECTURE",
            meta_arch,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "0.0",
        ],
    )
    return build_model(cfg).eval()


def _fixed_heads(model):
    """The proposal generator and ROI heads give the fixed boxes above, in network pixels of
    each image (their modules' hooks still run)."""

    def proposals(images, features, gt_instances=None):
        return [_instances(s, PROPOSALS, LOGITS, proposals=True) for s in images.image_sizes], {}

    def detections(images, features, props, targets=None):
        return [_instances(s, DETECTIONS, SCORES) for s in images.image_sizes], {}

    model.proposal_generator.forward = proposals
    model.roi_heads.forward = detections
    return model


def test_a_cropped_input_comes_out_in_slice_pixels():
    model = _fixed_heads(_model())
    assert type(model) is BodyCropRCNN
    inp = {"image": torch.zeros(3, *NET_HW), "image_id": 0, **SLICE, "body_crop": CROP}
    with torch.no_grad(), capture(model, "proposals") as captured:
        (out,) = model([inp])
    inst = out["instances"]
    assert inst.image_size == (100, 200)
    torch.testing.assert_close(inst.pred_boxes.tensor, torch.tensor(DETECTIONS_IN_SLICE))
    (props,) = captured.pop()
    assert props.image_size == (100, 200)
    torch.testing.assert_close(props.proposal_boxes.tensor, torch.tensor(PROPOSALS_IN_SLICE))
    torch.testing.assert_close(props.objectness_logits, torch.tensor(LOGITS))
    # do_postprocess=False: the network's own frame, as in GeneralizedRCNN.
    (raw,) = model.inference([inp], do_postprocess=False)
    assert raw.image_size == NET_HW
    torch.testing.assert_close(raw.pred_boxes.tensor, torch.tensor(DETECTIONS))


def test_evaluators_read_the_models_slice_pixels():
    """Lesions at the two detections' slice pixels: both found, and the proposal ranked second
    (outside the crop, kept unclipped) covers neither; the same network outputs read in the
    crop's frame (no body_crop given) would find none."""
    name = "body_crop_model_test"
    ann = [
        {"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0} for b in DETECTIONS_IN_SLICE
    ]
    DatasetCatalog.register(
        name, lambda: [{"image_id": 0, **SLICE, "file_name": "a.png", "annotations": ann}]
    )
    MetadataCatalog.get(name).set(thing_classes=["lesion"])
    try:
        model = _fixed_heads(_model())
        for inp, found, recall in (
            ({**SLICE, "body_crop": CROP}, 100.0, {1: 50.0, 2: 50.0, 3: 100.0}),
            ({"height": 40, "width": 60}, 0.0, {1: 0.0, 2: 0.0, 3: 0.0}),
        ):
            inp = {"image": torch.zeros(3, *NET_HW), "image_id": 0, **inp}
            lesions = LesionEvaluator(name, None, distributed=False)
            with torch.no_grad(), capture(model, "proposals") as captured:
                proposals = ProposalRecallEvaluator(name, captured, topks=(1, 2, 3))
                outputs = model([inp])
                for ev in (lesions, proposals):
                    ev.process([inp], outputs)
            assert lesions.evaluate()["lesion"]["sens@8_iou"] == found
            res = proposals.evaluate()["proposals"]
            assert {k: res[f"recall@{k}"] for k in (1, 2, 3)} == recall
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_without_a_crop_it_is_generalized_rcnn_and_shares_its_checkpoints():
    ours = _model()
    plain = _model("GeneralizedRCNN")
    assert type(plain) is GeneralizedRCNN
    # Same parameter and buffer names: a checkpoint of either loads strictly in the other.
    assert ours.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(1)
    inp = {"image": torch.rand(3, 48, 64) * 255, "height": 96, "width": 128}
    with torch.no_grad():
        (a,), (b,) = ours([inp]), plain([inp])
    a, b = a["instances"], b["instances"]
    assert a.image_size == b.image_size == (96, 128) and len(a) > 0
    for field in ("pred_boxes", "scores", "pred_classes"):
        x, y = a.get(field), b.get(field)
        x, y = (x.tensor, y.tensor) if field == "pred_boxes" else (x, y)
        assert torch.equal(x, y)
