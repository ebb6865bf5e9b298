"""Proposal recall (elixir_d2/evaluation/proposal_recall.py): counts checked by hand."""

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from elixir_d2.evaluation.proposal_recall import ProposalRecallEvaluator, recall_at


def test_recall_at_counts_lesions_covered_by_the_first_k_proposals():
    gt = np.array([[10, 10, 20, 20], [50, 50, 60, 70]], dtype=float)
    proposals = np.array(
        [
            [0, 0, 5, 5],  # covers nothing
            [11, 10, 21, 20],  # IoU with lesion 0: 90 / 110 = 0.82
            [50, 50, 60, 62],  # IoU with lesion 1: 120 / 200 = 0.6
            [10, 10, 20, 20],  # lesion 0 again (a lesion counts once)
        ],
        dtype=float,
    )
    assert recall_at(proposals, gt, (1, 2, 3, 4)) == {1: 0, 2: 1, 3: 2, 4: 2}
    assert recall_at(proposals, gt, (3,), iou=0.7) == {3: 1}  # lesion 1's 0.6 no longer counts
    assert recall_at(np.zeros((0, 4)), gt, (5,)) == {5: 0}
    assert recall_at(proposals, np.zeros((0, 4)), (5,)) == {5: 0}


def test_evaluator_ranks_the_captured_proposals_and_skips_noisy_lesions():
    """The records of capture(model, "proposals") are in the dataset's pixels (the model maps
    them there, test_meta_arch.py): the evaluator ranks and counts them as they are."""
    name = "proposal_recall_test"
    records = [
        {
            "image_id": 7,
            "height": 100,
            "width": 200,
            "annotations": [
                {"bbox": [20, 20, 40, 40], "bbox_mode": BoxMode.XYXY_ABS},
                {"bbox": [100, 50, 120, 70], "bbox_mode": BoxMode.XYXY_ABS},
                {"bbox": [150, 10, 160, 20], "bbox_mode": BoxMode.XYXY_ABS, "noisy": True},
            ],
        }
    ]
    DatasetCatalog.register(name, lambda: records)
    try:
        captured = []
        ev = ProposalRecallEvaluator(name, captured, topks=(1, 2, 3))
        p = Instances((100, 200))
        # Lesion 1 exactly, the noisy lesion exactly (not counted), lesion 0 at IoU 0.82.
        p.proposal_boxes = Boxes(
            torch.tensor(
                [[100.0, 50.0, 120.0, 70.0], [150.0, 10.0, 160.0, 20.0], [22.0, 20.0, 42.0, 40.0]]
            )
        )
        p.objectness_logits = torch.tensor([-1.0, 2.0, -3.0])  # ranked 2nd, 1st, 3rd
        captured.append([p])  # one forward of one image
        ev.process([{"image_id": 7}], [{}])
        assert captured == []  # consumed
        res = ev.evaluate()["proposals"]
        assert res["num_lesions"] == 2  # the Possibly_noisy one is left out
        assert (res["recall@1"], res["recall@2"], res["recall@3"]) == (0.0, 50.0, 100.0)
        with pytest.raises(RuntimeError, match="run inference inside capture"):
            ev.process([{"image_id": 7}], [{}])
        captured.append([p, p])
        with pytest.raises(RuntimeError, match="2 images of captured proposals for a batch of 1"):
            ev.process([{"image_id": 7}], [{}])
    finally:
        DatasetCatalog.remove(name)
