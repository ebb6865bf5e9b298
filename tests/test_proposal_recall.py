"""Proposal recall (elixir_d2/evaluation/proposal_recall.py): counts checked by hand."""
import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from elixir_d2.evaluation.proposal_recall import ProposalRecallEvaluator, recall_at


def test_recall_at_counts_lesions_covered_by_the_first_k_proposals():
    gt = np.array([[10, 10, 20, 20], [50, 50, 60, 70]], dtype=float)
    proposals = np.array([
        [0, 0, 5, 5],        # covers nothing
        [11, 10, 21, 20],    # IoU with lesion 0: 90 / 110 = 0.82
        [50, 50, 60, 62],    # IoU with lesion 1: 120 / 200 = 0.6
        [10, 10, 20, 20],    # lesion 0 again (a lesion counts once)
    ], dtype=float)
    assert recall_at(proposals, gt, (1, 2, 3, 4)) == {1: 0, 2: 1, 3: 2, 4: 2}
    assert recall_at(proposals, gt, (3,), iou=0.7) == {3: 1}  # lesion 1's 0.6 no longer counts
    assert recall_at(np.zeros((0, 4)), gt, (5,)) == {5: 0}
    assert recall_at(proposals, np.zeros((0, 4)), (5,)) == {5: 0}


def test_evaluator_scales_proposals_to_the_record_and_skips_noisy_lesions():
    name = "proposal_recall_test"
    records = [{
        "image_id": 7, "height": 100, "width": 200,
        "annotations": [
            {"bbox": [20, 20, 40, 40], "bbox_mode": BoxMode.XYXY_ABS},
            {"bbox": [100, 50, 120, 70], "bbox_mode": BoxMode.XYXY_ABS},
            {"bbox": [150, 10, 160, 20], "bbox_mode": BoxMode.XYXY_ABS, "noisy": True},
        ],
    }]
    DatasetCatalog.register(name, lambda: records)
    try:
        captured = []
        ev = ProposalRecallEvaluator(name, captured, topks=(1, 2))
        # The network saw the image at half size: lesion 1 at [50, 25, 60, 35] there.
        p = Instances((50, 100))
        p.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 3.0, 3.0], [50.0, 25.0, 60.0, 35.0]]))
        p.objectness_logits = torch.tensor([-1.0, 2.0])  # the lesion's proposal ranks first
        captured.append(p)
        ev.process([{"image_id": 7, "height": 100, "width": 200}], [{}])
        res = ev.evaluate()["proposals"]
        assert res["num_lesions"] == 2  # the Possibly_noisy one is left out
        assert res["recall@1"] == 50.0 and res["recall@2"] == 50.0
    finally:
        DatasetCatalog.remove(name)
