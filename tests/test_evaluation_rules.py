"""Evaluation rules: RTM models on untyped splits are scored by the binary lesion probability (one
box per proposal), and Possibly_noisy lesions follow 3DCE's test loading."""

import os
import uuid

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances

from elixir_d2 import load_config
from elixir_d2.evaluation import LesionEvaluator, compute_froc
from elixir_d2.modeling.roi_heads import rtm_output_mode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTM_QS = os.path.join(REPO, "configs", "quickstart", "elixirnet_rtm_finetune.yaml")
LESION = [10.0, 10.0, 30.0, 30.0]


def _register(records, classes=("lesion",)):
    name = f"eval_rules_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=list(classes), evaluator_type="lesion")
    return name


def _ann(box, noisy=False):
    return {"bbox": list(box), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "noisy": noisy}


def _evaluate(name, outputs, fps):
    ev = LesionEvaluator(name, None, distributed=False, fps=fps)
    ev.reset()
    for image_id, inst in outputs.items():
        ev.process([{"image_id": image_id}], [{"instances": inst}])
    return ev.evaluate()["lesion"]


# ------------------------------------------------------------------------------- RTM scoring
@pytest.fixture(scope="module")
def rtm_heads():
    torch.manual_seed(0)
    cfg = load_config(RTM_QS, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    return build_model(cfg).eval().roi_heads


def _hand_built_predictions(types: int):
    """3 proposals on a 64x64 image, zero box deltas (boxes = proposals). P0 is the lesion: binary
    lesion probability .9, its type probability split evenly (.1 each, type 2 .12). P1 and P2 are
    false positives with binary .3 / .2 but one confident type each (.6 / .5)."""
    proposals = Instances(
        (64, 64),
        proposal_boxes=Boxes(
            torch.tensor([LESION, [40.0, 40.0, 50.0, 50.0], [40.0, 5.0, 50.0, 15.0]])
        ),
    )
    typed_p = torch.full((3, types + 1), 1e-6)
    typed_p[0, :types] = 0.1
    typed_p[0, 2] = 0.12
    typed_p[0, types] = 1 - typed_p[0, :types].sum()
    typed_p[1, 3], typed_p[1, types] = 0.6, 0.4
    typed_p[2, 5], typed_p[2, types] = 0.5, 0.5
    binary_p = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8]])
    typed = (typed_p.log(), torch.zeros(3, 4 * types))
    binary = (binary_p.log(), torch.zeros(3, 4))
    return binary, typed, [proposals]


def test_rtm_on_untyped_split_scores_by_binary_probability_one_box_per_proposal(rtm_heads):
    types = rtm_heads.rtm.predictor.num_classes
    binary, typed, proposals = _hand_built_predictions(types)
    name = _register([{"image_id": 1, "height": 64, "width": 64, "annotations": [_ann(LESION)]}])

    with rtm_output_mode(rtm_heads, "typed"):
        split = rtm_heads._rtm_inference(binary, typed, proposals)[0]
    # Per-type output: the lesion's proposal yields one box per type, ranked below both FPs.
    assert (split.pred_boxes.tensor == torch.tensor(LESION)).all(dim=1).sum() == types
    split_froc = compute_froc(
        [split.pred_boxes.tensor.numpy()],
        [split.scores.numpy()],
        [torch.tensor([LESION]).numpy()],
        fps=(1.0,),
    )
    assert split_froc["sensitivity"][1.0] == 0.0  # hit comes after the 2nd FP
    with pytest.raises(ValueError, match="untyped.*rtm_output_mode\\(model, 'binary'\\)"):
        _evaluate(name, {1: split}, fps=(1.0,))

    assert rtm_heads.rtm_output == "binary"  # the default, back after the block
    one = rtm_heads._rtm_inference(binary, typed, proposals)[0]
    assert len(one) == 3
    assert torch.allclose(one.scores, torch.tensor([0.9, 0.3, 0.2]))
    assert one.pred_types.tolist() == [2, 3, 5] and one.pred_classes.tolist() == [2, 3, 5]
    assert torch.equal(one.pred_boxes.tensor[0], torch.tensor(LESION))
    m = _evaluate(name, {1: one}, fps=(0.5, 1.0))
    assert m["sens@0.5_iou"] == 100.0 and m["sens@1_iou"] == 100.0  # hit ranked first


def test_evaluator_reads_the_rtm_mode_field_not_the_scores():
    """The refusal follows each detection's rtm_typed field: typed output whose scores happen to
    equal the binary probabilities is still refused, and binary output is accepted whatever its
    pred_binary_scores hold."""
    name = _register([{"image_id": 1, "height": 64, "width": 64, "annotations": [_ann(LESION)]}])
    typed = _det([LESION], [0.9])
    typed.pred_binary_scores = typed.scores.clone()
    typed.rtm_typed = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="per-type detections"):
        _evaluate(name, {1: typed}, fps=(1.0,))
    binary = _det([LESION], [0.9])
    binary.pred_binary_scores = torch.tensor([0.5])
    binary.rtm_typed = torch.zeros(1, dtype=torch.bool)
    assert _evaluate(name, {1: binary}, fps=(1.0,))["sens@1_iou"] == 100.0
    # On a typed split, typed output is what is wanted.
    typed_split = _register(
        [{"image_id": 1, "height": 64, "width": 64, "annotations": [_ann(LESION)]}],
        classes=("a", "b"),
    )
    assert _evaluate(typed_split, {1: typed}, fps=(1.0,))["sens@1_iou"] == 100.0


# ----------------------------------------------------------------------------- Possibly_noisy
def _det(boxes, scores):
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.zeros(len(scores), dtype=torch.int64)
    return inst


def test_image_with_only_noisy_lesions_leaves_the_test_set_as_in_3dce():
    """Image 1: a real lesion hit at .9. Image 2: only a Possibly_noisy lesion, with detections
    .95 (on it) and .94. 3DCE drops image 2 (filter_roidb): 1 image, sensitivity 100 % at 0.5 FPs.
    Keeping it would make both its detections FPs ranked first: 0 % at 0.5 FPs over 2 images."""
    name = _register(
        [
            {"image_id": 1, "height": 64, "width": 64, "annotations": [_ann(LESION)]},
            {
                "image_id": 2,
                "height": 64,
                "width": 64,
                "annotations": [_ann([40, 40, 50, 50], noisy=True)],
            },
            {"image_id": 3, "height": 64, "width": 64, "annotations": []},  # no lesion at all: kept
        ]
    )
    m = _evaluate(
        name,
        {
            1: _det([LESION], [0.9]),
            2: _det([[40, 40, 50, 50], [5, 40, 15, 50]], [0.95, 0.94]),
            3: _det([], []),
        },
        fps=(0.5,),
    )
    assert m["num_images"] == 2 and m["num_lesions"] == 1
    assert m["num_noisy_left_out"] == 1 and m["num_images_noisy_only_left_out"] == 1
    assert m["sens@0.5_iou"] == 100.0


def test_detection_on_a_noisy_lesion_beside_a_real_one_is_a_false_positive():
    name = _register(
        [
            {
                "image_id": 1,
                "height": 64,
                "width": 64,
                "annotations": [_ann(LESION), _ann([40, 40, 50, 50], noisy=True)],
            }
        ]
    )
    m = _evaluate(name, {1: _det([[40, 40, 50, 50], LESION], [0.95, 0.9])}, fps=(0.5, 1.0))
    assert m["num_images"] == 1 and m["num_lesions"] == 1
    assert m["sens@0.5_iou"] < 100.0 and m["sens@1_iou"] == 100.0  # the .95 counts as an FP
