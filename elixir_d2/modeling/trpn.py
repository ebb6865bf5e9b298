"""TruncatedRPN (ElixirNet, AAAI 2020, section "Truncated RPN", equation 1).

    TRPN = F([p(I(i,j)) * I(i,j)]_{p(I(i,j)) > eps} | k)

detectron2's :class:`RPN` with a location confidence p (a 1x1 conv + sigmoid shared across
levels). The RPN head sees the gated features, and the anchors of the locations with p <= eps are
dropped before box decoding, top-k and NMS, so they are never proposed and cost nothing there. p
learns through the gate and from an auxiliary focal loss; the RPN losses stay on every anchor.

Two defaults are not the literal paper: the gate is p / max(p) (with p * I the focal loss drives
p, and with it the head's input and gradients, to 0 away from lesions), and the focal loss's
positives include every location with an anchor above the RPN's negative IoU (with only matched
anchors, truncation removes the neighbours giving a small lesion its best box). docs/design.md,
"Decisions where the paper is silent" / TruncatedRPN, has the runs behind both and the rest
(eps, padding, constant maps, the focal normaliser).
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from detectron2.utils.memory import retry_if_cuda_oom

__all__ = ["TRPN", "LocationTruncation", "Truncation", "build_conf_head"]

# Floor of the focal loss normaliser, per location (Guided Anchoring's N_locations / 200).
_MIN_NORMALIZER_PER_LOCATION = 1.0 / 200


def build_conf_head(in_channels: int, prior_prob: float = 0.01) -> nn.Conv2d:
    """The location-confidence branch p: a 1x1 conv to one logit per location (sigmoid later),
    starting at p ~ ``prior_prob`` everywhere."""
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"MODEL.TRPN.PRIOR_PROB={prior_prob} must be in (0, 1)")
    conv = nn.Conv2d(in_channels, 1, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, math.log(prior_prob / (1.0 - prior_prob)))
    return conv


class Truncation(NamedTuple):
    """Per level: ``keep`` (N, H, W) bool, ``eps`` (N,), ``valid`` (N, H, W) bool (the location
    covers a pixel of its image, not padding)."""

    keep: List[torch.Tensor]
    eps: List[torch.Tensor]
    valid: List[torch.Tensor]


class LocationTruncation(nn.Module):
    """TRPN's truncation: a location survives when p > eps. No parameters (state dicts are
    unchanged); a module so that its inputs (p) and output (:class:`Truncation`) can be read by a
    forward hook (:mod:`elixir_d2.modeling.capture`).

    Args:
        strides: the anchor stride of each level.
        threshold: eps; negative = the mean of p over the image's valid locations of the level,
            else a fixed value in [0, 1).
    """

    def __init__(self, strides: Sequence[int], threshold: float):
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.threshold = float(threshold)

    def forward(self, conf: List[torch.Tensor], image_sizes: List[Tuple[int, int]]) -> Truncation:
        """``conf``: per level, p of shape (N, 1, H, W) in [0, 1]; ``image_sizes``: (h, w) of
        each image before padding."""
        sizes = torch.as_tensor(image_sizes, device=conf[0].device, dtype=torch.float32)
        keeps, epss, valids = [], [], []
        for p, stride in zip(conf, self.strides):
            p = p[:, 0]
            n, h, w = p.shape
            # Locations covering any image pixel: ceil(size / stride) rows and columns.
            rows_in = torch.ceil(sizes[:, 0] / stride)
            cols_in = torch.ceil(sizes[:, 1] / stride)
            valid = (torch.arange(h, device=p.device)[None, :, None] < rows_in[:, None, None]) & (
                torch.arange(w, device=p.device)[None, None, :] < cols_in[:, None, None]
            )
            if self.threshold < 0:
                num_in = valid.flatten(1).sum(1).clamp(min=1)
                eps = (p * valid).flatten(1).sum(1) / num_in
                keep = p > eps[:, None, None]
                # Nothing strictly above the mean means p is constant there: keep everything.
                degenerate = ~(keep & valid).flatten(1).any(1)
                keep = keep | degenerate[:, None, None]
            else:
                eps = p.new_full((n,), self.threshold)
                keep = p > self.threshold
            keeps.append(keep)
            epss.append(eps)
            valids.append(valid)
        return Truncation(keeps, epss, valids)


@PROPOSAL_GENERATOR_REGISTRY.register()
class TRPN(RPN):
    """TruncatedRPN: detectron2's :class:`RPN` with a learned location confidence that gates
    the head's input (p * I) and truncates proposal candidates at locations with p <= eps.

    The truncation step is the submodule ``truncation`` (:class:`LocationTruncation`): its
    forward takes p and returns the keep masks and eps, which
    ``capture(model, "trpn_confidence")`` (:mod:`elixir_d2.modeling.capture`) reads through a
    forward hook for drawing; TRPN keeps nothing between calls."""

    @configurable
    def __init__(
        self,
        *,
        conf_head: nn.Module,
        threshold: float = -1.0,
        loc_loss_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        gate: str = "max_norm",
        conf_positives: str = "not_background",
        **kwargs,
    ):
        """
        Args:
            conf_head: maps one level's feature (N, C, H, W) to confidence logits (N, 1, H, W);
                shared across levels.
            threshold: eps; negative = mean of p per image and level, else a value in [0, 1).
            loc_loss_weight: weight of the focal loss on p; 0 switches it off (no loss term).
            focal_alpha, focal_gamma: the focal loss's alpha and gamma.
            gate: what multiplies the head's input: "p" (equation 1), "max_norm" (p divided by
                its maximum over the image's locations of the level, so the most confident
                location passes I unchanged), "none" (I; truncation only).
            conf_positives: locations the focal loss treats as positive: "foreground" (an
                anchor the RPN matcher labels foreground) or "not_background" (an anchor the
                matcher does not label background: IoU above the RPN's negative threshold).
            kwargs: every argument of detectron2's :class:`RPN`.
        """
        super().__init__(**kwargs)
        if threshold >= 1.0:
            raise ValueError(
                f"MODEL.TRPN.THRESHOLD={threshold}: must be < 0 (per-image mean) or in [0, 1); "
                "a threshold >= 1 truncates every location"
            )
        if loc_loss_weight < 0:
            raise ValueError(f"MODEL.TRPN.LOC_LOSS_WEIGHT={loc_loss_weight} must be >= 0")
        if gate not in ("p", "max_norm", "none"):
            raise ValueError(f"MODEL.TRPN.GATE={gate!r}: must be 'p', 'max_norm' or 'none'")
        if conf_positives not in ("foreground", "not_background"):
            raise ValueError(
                f"MODEL.TRPN.CONF_POSITIVES={conf_positives!r}: must be 'foreground' or "
                "'not_background'"
            )
        self.conf_head = conf_head
        self.truncation = LocationTruncation(self.anchor_generator.strides, threshold)
        self.loc_loss_weight = float(loc_loss_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.gate = gate
        self.conf_positives = conf_positives

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        channels = {input_shape[f].channels for f in cfg.MODEL.RPN.IN_FEATURES}
        if len(channels) != 1:
            raise ValueError(
                f"TRPN shares one conf_head across MODEL.RPN.IN_FEATURES="
                f"{cfg.MODEL.RPN.IN_FEATURES}, which have different channels {sorted(channels)}"
            )
        ret.update(
            conf_head=build_conf_head(channels.pop(), cfg.MODEL.TRPN.PRIOR_PROB),
            threshold=cfg.MODEL.TRPN.THRESHOLD,
            loc_loss_weight=cfg.MODEL.TRPN.LOC_LOSS_WEIGHT,
            focal_alpha=cfg.MODEL.TRPN.FOCAL_ALPHA,
            focal_gamma=cfg.MODEL.TRPN.FOCAL_GAMMA,
            gate=cfg.MODEL.TRPN.GATE,
            conf_positives=cfg.MODEL.TRPN.CONF_POSITIVES,
        )
        return ret

    @property
    def threshold(self) -> float:
        """eps (see ``__init__``), held by the truncation step."""
        return self.truncation.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.truncation.threshold = float(value)

    # ------------------------------------------------------------------ truncation and gate
    def location_keep_masks(
        self, conf: List[torch.Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Truncation:
        """Which locations survive truncation: ``self.truncation`` (:class:`LocationTruncation`)
        on p per level (N, 1, H, W) and the (h, w) of each image before padding."""
        return self.truncation(conf, image_sizes)

    def gated(
        self, feats: List[torch.Tensor], conf: List[torch.Tensor], valids: List[torch.Tensor]
    ) -> List[torch.Tensor]:
        """The RPN head's input per level under ``self.gate`` (see ``__init__``)."""
        if self.gate == "none":
            return feats
        if self.gate == "p":
            return [p * x for p, x in zip(conf, feats)]
        out = []
        for p, x, valid in zip(conf, feats, valids):
            # Detached: the maximum only rescales; gradients reach p through p itself.
            peak = (p[:, 0] * valid).flatten(1).amax(1).clamp(min=1e-6).detach()
            out.append(p / peak[:, None, None, None] * x)
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ):
        """:meth:`RPN.forward` on the gated features, with proposals only from kept locations;
        adds ``loss_trpn_conf`` to the losses when LOC_LOSS_WEIGHT > 0."""
        feats = [features[f] for f in self.in_features]
        conf_logits = [self.conf_head(x) for x in feats]
        conf = [torch.sigmoid(z) for z in conf_logits]
        with torch.no_grad():
            keeps, _, valids = self.location_keep_masks(conf, images.image_sizes)

        anchors = self.anchor_generator(feats)
        pred_objectness_logits, pred_anchor_deltas = self._per_anchor(
            *self.rpn_head(self.gated(feats, conf, valids))
        )
        if self.training:
            if gt_instances is None:
                raise ValueError("TRPN requires gt_instances in training")
            gt_labels, gt_boxes = self.label_and_sample_anchors(anchors, gt_instances)
            losses = self.losses(
                anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
            )
            if self.loc_loss_weight > 0:
                targets = self.conf_targets(anchors, gt_instances, conf_logits)
                loss = self.conf_loss(conf_logits, targets)
                losses["loss_trpn_conf"] = self.loc_loss_weight * loss
            self._log_truncation(keeps, valids)
        else:
            losses = {}
        proposals = self.predict_proposals(
            anchors, pred_objectness_logits, pred_anchor_deltas, images.image_sizes, keeps
        )
        return proposals, losses

    def _per_anchor(
        self, pred_objectness_logits: List[torch.Tensor], pred_anchor_deltas: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The head's maps in the anchor order of :meth:`RPN.forward` (Hi, Wi, A): logits
        (N, Hi*Wi*A), deltas (N, Hi*Wi*A, B). RPN does this inline in its forward, which TRPN
        cannot call because the keep masks must reach ``predict_proposals``."""
        box_dim = self.anchor_generator.box_dim
        logits = [s.permute(0, 2, 3, 1).flatten(1) for s in pred_objectness_logits]
        deltas = [
            x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, -2)
            for x in pred_anchor_deltas
        ]
        return logits, deltas

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def conf_targets(
        self, anchors: List[Boxes], gt_instances: List[Instances], conf_logits: List[torch.Tensor]
    ) -> torch.Tensor:
        """Focal-loss targets, (N, sum_l H_l * W_l) in {0, 1}: a location is positive when one
        of its anchors is "foreground" / "not_background" (``conf_positives``) to the RPN's
        matcher. Labels from before the RPN's anchor sampling, which turns unsampled anchors
        (background or not) into "ignore"; and without the legacy RPN.BOUNDARY_THRESH "ignore",
        which would make every anchor crossing the border a not-background one."""
        all_anchors = Boxes.cat(anchors)
        labels = []
        for inst in gt_instances:
            iou = retry_if_cuda_oom(pairwise_iou)(inst.gt_boxes, all_anchors)
            _, label = retry_if_cuda_oom(self.anchor_matcher)(iou)
            labels.append(label.to(device=inst.gt_boxes.device))
        label = torch.stack(labels)  # N x R, anchors in (level, Hi, Wi, A) order
        pos = label == 1 if self.conf_positives == "foreground" else label != 0
        targets, offset = [], 0
        for level_anchors, z in zip(anchors, conf_logits):
            h, w = z.shape[-2:]
            num = len(level_anchors)
            level_pos = pos[:, offset : offset + num].reshape(len(pos), h, w, -1)
            targets.append(level_pos.any(-1).flatten(1))
            offset += num
        return torch.cat(targets, dim=1).to(conf_logits[0].dtype)

    def conf_loss(self, conf_logits: List[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Sigmoid focal loss on the confidence logits against :meth:`conf_targets`, normalised
        by the number of positive locations, but by at least (number of locations) / 200 (with one
        to three lesions a slice, the positives alone make the loss diverge; docs/design.md)."""
        logits = torch.cat([z.flatten(1) for z in conf_logits], dim=1)
        loss = sigmoid_focal_loss(
            logits, targets, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        return loss / targets.sum().clamp(min=targets.numel() * _MIN_NORMALIZER_PER_LOCATION)

    def _log_truncation(self, keeps: List[torch.Tensor], valids: List[torch.Tensor]) -> None:
        storage = get_event_storage()
        for name, keep, valid in zip(self.in_features, keeps, valids):
            cut = (~keep & valid).sum()
            frac = cut.float() / valid.sum().clamp(min=1)
            storage.put_scalar(f"trpn/truncated_frac_{name}", frac.item())

    # ------------------------------------------------------------------ proposals
    def predict_proposals(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
        keep_masks: Optional[List[torch.Tensor]] = None,
    ) -> List[Instances]:
        """:meth:`RPN.predict_proposals` on the anchors of kept locations only.

        Per image and level, the truncated anchors are dropped first, then the top
        ``pre_nms_topk`` of the rest are taken and only those are decoded; detectron2's
        :func:`find_top_rpn_proposals` does NMS and the final top-k as for RPN. RPN sorts and
        decodes every anchor; this sorts the kept ones and decodes at most pre_nms_topk a level.

        Args:
            keep_masks: per level, (N, H, W) bool from :meth:`location_keep_masks`; None
                keeps every location (plain RPN).
        """
        if keep_masks is None:
            return super().predict_proposals(
                anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes
            )
        pre_nms_topk = self.pre_nms_topk[self.training]
        results: List[Instances] = []
        with torch.no_grad():  # proposals are fixed inputs to the ROI heads, as in RPN
            for n, image_size in enumerate(image_sizes):
                boxes, scores = [], []
                for level_anchors, logits, deltas, keep in zip(
                    anchors, pred_objectness_logits, pred_anchor_deltas, keep_masks
                ):
                    # A location's A anchors are consecutive in the (Hi, Wi, A) order.
                    num_a = logits.shape[1] // keep[n].numel()
                    kept = keep[n].flatten().repeat_interleave(num_a).nonzero().squeeze(1)
                    kept_logits, order = logits[n, kept].sort(descending=True)
                    top = kept[order[:pre_nms_topk]]
                    scores.append(kept_logits[:pre_nms_topk][None])
                    decoded = self.box2box_transform.apply_deltas(
                        deltas[n, top], level_anchors.tensor[top]
                    )
                    boxes.append(decoded[None])
                # Already at most pre_nms_topk a level: this does the checks, NMS and final top-k.
                results += find_top_rpn_proposals(
                    boxes,
                    scores,
                    [image_size],
                    self.nms_thresh,
                    pre_nms_topk,
                    self.post_nms_topk[self.training],
                    self.min_box_size,
                    self.training,
                )
        return results
