"""ElixirROIHeads: StandardROIHeads whose box head learns which RoIs belong to which image, and
which carries the Relation Transfer Module when MODEL.RTM.ENABLED.

The Auto-lesion Block's region_nonlocal relates the proposals of one image only, so a
:class:`~elixir_d2.modeling.box_head.RelationBoxHead` gets the proposal count of each image and
returns its features with the per-image relation graphs E. When the head's
``pointwise_before_pooling`` holds, its pointwise layer runs on the feature maps before RoIAlign
(same values, see ``ALBStem.pointwise_maps``), which halves RoIAlign's channels. Other box heads
(detectron2's 2-fc head) are called as in StandardROIHeads. ``_forward_box`` is split into small
steps (pool, head, predict, losses / inference).

With RTM (paper Table 4; docs/design.md, Relation Transfer Module): ``box_predictor`` stays the
binary (lesion / background)
predictor, loaded from the binary checkpoint; ``rtm`` adds the multi-type predictor over
[f, f_E]. MODEL.ROI_HEADS.NUM_CLASSES must equal MODEL.RTM.NUM_TYPES: it is the number of classes
of the typed dataset, used to label the sampled proposals (background = NUM_TYPES).
- Training: the multi-type losses ``loss_cls`` / ``loss_box_reg`` on the RTM predictor, plus
  the binary predictor's own losses ``loss_cls_binary`` / ``loss_box_reg_binary`` on the same
  proposals with every type mapped to "lesion", so the binary scores (Gamma, and the binary
  output) stay consistent with the head features being fine-tuned. M is detached either way;
  list ``roi_heads.box_predictor`` in MODEL.FREEZE_MODULES to keep the binary predictor fixed.
- Inference, output mode "binary" (the default; ElixirTrainer.test uses it on untyped
  splits): the binary predictor's detections (its box and lesion probability per proposal,
  class-agnostic NMS: exactly the binary model's inference on the same head features);
  ``pred_types`` / ``pred_classes`` = the most likely type of the proposal. Scoring by the
  per-type softmax instead would split a lesion's probability over up to NUM_TYPES near-duplicate
  boxes and rank them below confident false positives; taking the box from the multi-type
  regressor (as before issue 32) used a regressor trained only by the short typed fine-tuning and
  cost binary sensitivity (docs/evaluation.md, "RTM models on untyped splits").
- Inference, output mode "typed" (typed splits, Table 4): ``pred_classes`` = lesion type
  index and ``scores`` from the multi-type softmax with per-type NMS (the class-aware per-type
  evaluation), ``pred_types`` = the same index, ``pred_binary_scores`` = the binary lesion
  probability of the proposal each detection comes from.

The mode is chosen with :func:`rtm_output_mode` (a context manager restoring the previous mode on
exit), never by assigning to the heads, and every RTM detection says which mode produced it: the
per-detection bool field ``rtm_typed`` (an Instances field must have one entry per box; the
per-image dict built by detectron2's meta-architecture is not ours to extend). The evaluator reads
that field to refuse per-type output on an untyped split.
"""

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Boxes, Instances

from .alb.ops import RegionNonLocal
from .box_head import RelationBoxHead
from .rtm import RelationTransferModule

__all__ = ["ElixirROIHeads", "RTM_OUTPUT_MODES", "rtm_heads", "rtm_output_mode"]

RTM_OUTPUT_MODES = ("binary", "typed")


def _binary_targets(proposals: List[Instances], num_classes: int) -> List[Instances]:
    """Copies of sampled proposals whose gt_classes are 0 (any lesion type) or 1 (background)."""
    out = []
    for p in proposals:
        q = Instances(p.image_size, proposal_boxes=p.proposal_boxes)
        fg = (p.gt_classes >= 0) & (p.gt_classes < num_classes)
        q.gt_classes = (~fg).to(p.gt_classes.dtype)  # 0 = lesion, 1 = background
        if p.has("gt_boxes"):
            q.gt_boxes = p.gt_boxes
        out.append(q)
    return out


def _has_relations(box_head: torch.nn.Module) -> bool:
    return any(isinstance(m, RegionNonLocal) for m in box_head.modules())


@ROI_HEADS_REGISTRY.register()
class ElixirROIHeads(StandardROIHeads):
    """StandardROIHeads that calls a :class:`RelationBoxHead` with ``[len(p) for p in proposals]``
    and takes its relation graphs; other heads are called as usual.
    ``rtm``: the Relation Transfer Module, or None (MODEL.RTM.ENABLED False)."""

    # Class-level default: set only by rtm_output_mode, for the duration of its block.
    _rtm_output: str = "binary"

    @configurable
    def __init__(self, *, rtm: Optional[RelationTransferModule] = None, **kwargs):
        super().__init__(**kwargs)
        self.rtm = rtm
        if rtm is not None and rtm.has_own_relations and self._pointwise_before_pooling:
            raise ValueError(
                "RTM computing its own relations pools the box head's unreduced RoI features: "
                "build the box head with pointwise_before_pooling=False"
            )
        if rtm is not None:
            if self.box_predictor.num_classes != 1:
                raise ValueError("ElixirROIHeads with RTM needs a binary box_predictor (1 class)")
            if rtm.predictor.num_classes != self.num_classes:
                raise ValueError(
                    f"MODEL.RTM.NUM_TYPES ({rtm.predictor.num_classes}) must equal "
                    f"MODEL.ROI_HEADS.NUM_CLASSES ({self.num_classes}): with RTM the ROI heads "
                    "label proposals with the typed dataset's classes"
                )
            if not rtm.has_own_relations and not _has_relations(self.box_head):
                raise ValueError(
                    "RTM without its own relations needs a box head with region_nonlocal"
                )

    @classmethod
    def _init_box_head(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        ret = super()._init_box_head(cfg, input_shape)
        ret["rtm"] = None
        if not cfg.MODEL.RTM.ENABLED:
            return ret
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES != cfg.MODEL.RTM.NUM_TYPES:
            raise ValueError(
                f"MODEL.RTM.ENABLED: MODEL.ROI_HEADS.NUM_CLASSES "
                f"({cfg.MODEL.ROI_HEADS.NUM_CLASSES}) must equal MODEL.RTM.NUM_TYPES "
                f"({cfg.MODEL.RTM.NUM_TYPES}), the typed dataset's "
                "classes; the binary predictor is built with 1 class regardless"
            )
        binary_cfg = cfg.clone()
        binary_cfg.defrost()
        binary_cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
        head_shape = ret["box_head"].output_shape
        ret["box_predictor"] = FastRCNNOutputLayers(binary_cfg, head_shape)
        # E from the head's region_nonlocal when it has one, else RTM's own on the pooled RoIs.
        pooled_channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
        own = None if _has_relations(ret["box_head"]) else pooled_channels
        ret["rtm"] = RelationTransferModule(cfg, head_shape, relation_channels=own)
        if own is not None and isinstance(ret["box_head"], RelationBoxHead):
            # RTM's own E comes from the RoIs pooled at full width, before any pointwise layer.
            ret["box_head"].pointwise_before_pooling = False
        return ret

    @property
    def rtm_output(self) -> str:
        """The RTM inference output mode, "binary" or "typed" (read-only: see
        :func:`rtm_output_mode`)."""
        return self._rtm_output

    @property
    def _pointwise_before_pooling(self) -> bool:
        return isinstance(self.box_head, RelationBoxHead) and self.box_head.pointwise_before_pooling

    def _pool_box_features(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances]
    ) -> Tuple[torch.Tensor, List[int]]:
        """RoIAlign features of all proposals (image after image) and the count per image."""
        feats = [features[f] for f in self.box_in_features]
        if self._pointwise_before_pooling:
            feats = self.box_head.pointwise_maps(feats)
        box_features = self.box_pooler(feats, [p.proposal_boxes for p in proposals])
        return box_features, [len(p) for p in proposals]

    def _run_box_head(
        self, box_features: torch.Tensor, num_per_image: List[int]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(N, P) features and the per-image relation graphs ([] from a head without any)."""
        if isinstance(self.box_head, RelationBoxHead):
            return self.box_head(box_features, num_per_image)
        return self.box_head(box_features), []

    def _rtm_relations(
        self, pooled: torch.Tensor, head_relations: List[torch.Tensor], num_per_image: List[int]
    ) -> List[torch.Tensor]:
        """Per-image E for RTM: RTM's own, or the head's region_nonlocal of this forward."""
        if self.rtm.has_own_relations:
            return self.rtm.own_relations(pooled, num_per_image)
        relations = head_relations
        if [len(e) for e in relations] != list(num_per_image):
            raise ValueError(
                f"box head relations {[tuple(e.shape) for e in relations]} do not match the "
                f"proposal counts {num_per_image} of this forward"
            )
        return relations

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """As StandardROIHeads._forward_box, with per-image proposal counts for the head."""
        pooled, num_per_image = self._pool_box_features(features, proposals)
        box_features, relations = self._run_box_head(pooled, num_per_image)
        if self.rtm is not None:
            relations = self._rtm_relations(pooled, relations, num_per_image)
            del pooled
            return self._forward_rtm(box_features, relations, proposals)
        del pooled
        predictions = self.box_predictor(box_features)
        del box_features
        return self._losses_or_inference(self.box_predictor, predictions, proposals)

    def _losses_or_inference(
        self, predictor: FastRCNNOutputLayers, predictions, proposals: List[Instances]
    ):
        if self.training:
            losses = predictor.losses(predictions, proposals)
            # proposals is modified in place below, so losses must be computed first.
            if self.train_on_pred_boxes:
                with torch.no_grad():
                    pred_boxes = predictor.predict_boxes_for_gt_classes(predictions, proposals)
                    for proposals_per_image, boxes in zip(proposals, pred_boxes):
                        proposals_per_image.proposal_boxes = Boxes(boxes)
            return losses
        pred_instances, _ = predictor.inference(predictions, proposals)
        return pred_instances

    def _forward_rtm(
        self,
        box_features: torch.Tensor,
        relations: Sequence[torch.Tensor],
        proposals: List[Instances],
    ):
        binary = self.box_predictor(box_features)
        typed = self.rtm(box_features, self.box_predictor, relations)
        del box_features
        if self.training:
            binary_losses = self.box_predictor.losses(
                binary, _binary_targets(proposals, self.num_classes)
            )
            losses = self._losses_or_inference(self.rtm.predictor, typed, proposals)
            losses.update({f"{k}_binary": v for k, v in binary_losses.items()})
            return losses
        return self._rtm_inference(binary, typed, proposals)

    def _rtm_inference(self, binary, typed, proposals: List[Instances]) -> List[Instances]:
        if self._rtm_output == "binary":
            instances = self._rtm_binary_inference(binary, typed, proposals)
        elif self._rtm_output == "typed":
            instances = self._rtm_typed_inference(binary, typed, proposals)
        else:
            raise ValueError(
                f"RTM output mode must be one of {RTM_OUTPUT_MODES}, got {self._rtm_output!r}"
            )
        for inst in instances:
            inst.rtm_typed = torch.full(
                (len(inst),),
                self._rtm_output == "typed",
                dtype=torch.bool,
                device=inst.scores.device,
            )
        return instances

    def _rtm_typed_inference(self, binary, typed, proposals: List[Instances]) -> List[Instances]:
        """Per-type detections: the multi-type predictor's boxes, scores and per-type NMS."""
        predictor = self.rtm.predictor
        boxes = predictor.predict_boxes(typed, proposals)
        scores = predictor.predict_probs(typed, proposals)
        instances, kept = fast_rcnn_inference(
            boxes,
            scores,
            [p.image_size for p in proposals],
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        binary_probs = self.box_predictor.predict_probs(binary, proposals)
        for inst, b, s, k, prob in zip(instances, boxes, scores, kept, binary_probs):
            # fast_rcnn_inference indexes the proposals left after dropping non-finite rows:
            # map back through the same mask to find each detection's proposal.
            valid = (torch.isfinite(b).all(dim=1) & torch.isfinite(s).all(dim=1)).nonzero()[:, 0]
            inst.pred_binary_scores = prob[valid[k], 0]
            inst.pred_types = inst.pred_classes.clone()
        return instances

    def _rtm_binary_inference(self, binary, typed, proposals: List[Instances]) -> List[Instances]:
        """The binary predictor's detections (its boxes, its lesion probability, its NMS and
        limits: the same as the binary model's inference on the same head features), each
        labelled with the most likely type of its proposal."""
        predictor = self.box_predictor
        boxes = predictor.predict_boxes(binary, proposals)  # (R, 4): one lesion class
        scores = predictor.predict_probs(binary, proposals)  # (R, 2): lesion, background
        types = [
            p[:, :-1].argmax(dim=1) for p in self.rtm.predictor.predict_probs(typed, proposals)
        ]
        instances, kept = fast_rcnn_inference(
            boxes,
            scores,
            [p.image_size for p in proposals],
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        for inst, b, s, t, k in zip(instances, boxes, scores, types, kept):
            valid = (torch.isfinite(b).all(dim=1) & torch.isfinite(s).all(dim=1)).nonzero()[:, 0]
            inst.pred_types = t[valid[k]]
            inst.pred_classes = inst.pred_types.clone()
            inst.pred_binary_scores = inst.scores.clone()
        return instances


def rtm_heads(model: torch.nn.Module) -> List[ElixirROIHeads]:
    """The :class:`ElixirROIHeads` in ``model`` (itself included) that carry an RTM."""
    return [m for m in model.modules() if isinstance(m, ElixirROIHeads) and m.rtm is not None]


@contextlib.contextmanager
def rtm_output_mode(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Within the block, the RTM heads of ``model`` give ``mode`` output ("binary" or "typed",
    see the module docstring); the previous mode comes back on exit, exceptions included.

    Raises ValueError for an unknown mode or a model without RTM (nothing to switch: a silent
    no-op would let a typed evaluation run on binary output)."""
    if mode not in RTM_OUTPUT_MODES:
        raise ValueError(f"RTM output mode must be one of {RTM_OUTPUT_MODES}, got {mode!r}")
    heads = rtm_heads(model)
    if not heads:
        raise ValueError("the model has no ROI heads with RTM (MODEL.RTM.ENABLED is False)")
    before = [h._rtm_output for h in heads]
    try:
        for h in heads:
            h._rtm_output = mode
        yield
    finally:
        for h, b in zip(heads, before):
            h._rtm_output = b
