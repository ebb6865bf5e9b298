"""Proposal recall: the share of lesions that the proposal generator's top-k boxes cover.

This is what a TRPN or RPN change should be judged by before the box head sees anything: a
lesion without a proposal at IoU >= 0.5 can only be found through the box head's regression.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou
from detectron2.utils import comm

__all__ = ["ProposalRecallEvaluator", "recall_at"]


def recall_at(
    proposals: np.ndarray, gt: np.ndarray, topks: Sequence[int], iou: float = 0.5
) -> Dict[int, int]:
    """How many of ``gt`` (G, 4) have a box among the first k rows of ``proposals`` (ranked
    best first, (P, 4)) with IoU >= ``iou``, for each k of ``topks``."""
    if len(gt) == 0:
        return {k: 0 for k in topks}
    if len(proposals) == 0:
        return {k: 0 for k in topks}
    ious = pairwise_iou(
        Boxes(torch.as_tensor(proposals, dtype=torch.float64)),
        Boxes(torch.as_tensor(gt, dtype=torch.float64)),
    ).numpy()
    # Rank of the first proposal covering each lesion; a lesion never covered gets P.
    covered = ious >= iou
    first = np.where(covered.any(0), covered.argmax(0), len(proposals))
    return {k: int((first < k).sum()) for k in topks}


class ProposalRecallEvaluator(DatasetEvaluator):
    """Recall of the top-k proposals at IoU >= 0.5 over the lesions of a dataset.

    ``proposals`` is the list of records that ``with capture(model, "proposals")``
    (:mod:`elixir_d2.modeling.capture`) fills: per forward, the proposals of each image in
    whole-slice pixels, the frame of the records' boxes. :meth:`process` consumes one record per
    call. Possibly_noisy lesions are left out, as in :class:`~elixir_d2.evaluation.LesionEvaluator`.
    """

    def __init__(
        self,
        dataset_name: str,
        proposals: List[List[Instances]],
        topks: Sequence[int] = (50, 100, 300),
    ):
        self._dataset_name = dataset_name
        self._proposals = proposals
        self._topks = tuple(int(k) for k in topks)
        self.reset()

    def reset(self) -> None:
        self._counts: List[Dict[int, int]] = []
        self._num_gt = 0
        self._proposals.clear()
        self._gt = None

    def _gt_boxes(self) -> Dict:
        if self._gt is None:
            self._gt = {}
            for r in DatasetCatalog.get(self._dataset_name):
                boxes = [
                    BoxMode.convert(
                        list(a["bbox"]), a.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS
                    )
                    for a in r.get("annotations", [])
                    if not a.get("noisy", False)
                ]
                self._gt[r["image_id"]] = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return self._gt

    def process(self, inputs, outputs) -> None:
        if not self._proposals:
            raise RuntimeError(
                "ProposalRecallEvaluator: no captured proposals for this batch; run inference "
                "inside capture(model, 'proposals')"
            )
        batch = self._proposals.pop(0)
        if len(batch) != len(inputs):
            raise RuntimeError(
                f"ProposalRecallEvaluator: {len(batch)} images of captured "
                f"proposals for a batch of {len(inputs)}"
            )
        gt = self._gt_boxes()
        for inp, props in zip(inputs, batch):
            props = props.to("cpu")
            boxes = props.proposal_boxes.tensor.numpy().astype(np.float64)
            order = np.argsort(-props.objectness_logits.numpy(), kind="stable")
            g = gt[inp["image_id"]]
            self._counts.append(recall_at(boxes[order], g, self._topks))
            self._num_gt += len(g)

    def evaluate(self):
        counts = list(itertools.chain(*comm.gather(self._counts, dst=0)))
        num_gt = sum(comm.gather(self._num_gt, dst=0))
        if not comm.is_main_process():
            return {}
        res = OrderedDict(
            (f"recall@{k}", 100.0 * sum(c[k] for c in counts) / max(num_gt, 1)) for k in self._topks
        )
        res["num_lesions"] = num_gt
        return OrderedDict([("proposals", res)])
