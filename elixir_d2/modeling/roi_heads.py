"""ElixirROIHeads: StandardROIHeads whose box head learns which RoIs belong to which image.

The Auto-lesion Block's region_nonlocal relates the proposals of one image only, so the box head
needs the proposal count of each image. ``_forward_box`` is split into small steps (pool, head,
predict, losses / inference) so that the Relation Transfer Module can hook into
:meth:`ElixirROIHeads._predict_boxes` without copying the rest.
"""
from typing import Dict, List, Tuple

import torch
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, Instances

__all__ = ["ElixirROIHeads"]


@ROI_HEADS_REGISTRY.register()
class ElixirROIHeads(StandardROIHeads):
    """StandardROIHeads that hands ``[len(p) for p in proposals]`` to box heads declaring
    ``takes_num_per_image = True`` (ALBHead, ALBSearchHead); other heads are called as usual."""

    def _pool_box_features(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances]
    ) -> Tuple[torch.Tensor, List[int]]:
        """RoIAlign features of all proposals (image after image) and the count per image."""
        feats = [features[f] for f in self.box_in_features]
        box_features = self.box_pooler(feats, [p.proposal_boxes for p in proposals])
        return box_features, [len(p) for p in proposals]

    def _run_box_head(self, box_features: torch.Tensor, num_per_image: List[int]) -> torch.Tensor:
        if getattr(self.box_head, "takes_num_per_image", False):
            return self.box_head(box_features, num_per_image)
        return self.box_head(box_features)

    def _predict_boxes(
        self, box_features: torch.Tensor, proposals: List[Instances], num_per_image: List[int]
    ):
        """Box predictor outputs from head features (the place where RTM extends the head)."""
        return self.box_predictor(box_features)

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """As StandardROIHeads._forward_box, with per-image proposal counts for the head."""
        box_features, num_per_image = self._pool_box_features(features, proposals)
        box_features = self._run_box_head(box_features, num_per_image)
        predictions = self._predict_boxes(box_features, proposals, num_per_image)
        del box_features

        if self.training:
            losses = self.box_predictor.losses(predictions, proposals)
            # proposals is modified in place below, so losses must be computed first.
            if self.train_on_pred_boxes:
                with torch.no_grad():
                    pred_boxes = self.box_predictor.predict_boxes_for_gt_classes(
                        predictions, proposals
                    )
                    for proposals_per_image, boxes in zip(proposals, pred_boxes):
                        proposals_per_image.proposal_boxes = Boxes(boxes)
            return losses
        pred_instances, _ = self.box_predictor.inference(predictions, proposals)
        return pred_instances
