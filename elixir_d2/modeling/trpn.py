"""TruncatedRPN (paper section "Truncated RPN", equation 1; docs/design.md, TruncatedRPN).

    TRPN = F([p(I(i,j)) * I(i,j)]_{p(I(i,j)) > eps} | k)

A shared 1x1 conv + sigmoid (``conf_head``) gives a location confidence ``p`` on every input
level. The RPN head (detectron2's, unchanged) sees the gated features; a location with
``p <= eps`` contributes none of its A anchors as a proposal candidate, in training and in
inference. The RPN losses are computed on all anchors, so ``p`` learns end to end through the
gate and, with ``MODEL.TRPN.LOC_LOSS_WEIGHT > 0``, from an auxiliary sigmoid focal loss.

Decisions where the paper is silent:

* Gate (``MODEL.TRPN.GATE``): by default ``p / max(p)`` per image and level, not ``p`` itself.
  The focal loss pushes ``p`` towards 0 away from lesions, so with the literal ``p * I`` the
  RPN head is fed almost nothing, its gradients vanish with it, and the detector never starts
  learning. Dividing by the maximum keeps the ranking and the truncation of equation 1 while
  the most confident location passes ``I`` unchanged. ``"p"`` keeps the literal form.
* Focal-loss positives (``MODEL.TRPN.CONF_POSITIVES``): by default every location with an
  anchor above the RPN's negative IoU threshold, i.e. the ring whose anchors regress onto a
  lesion, not only the few matched ones; otherwise truncation removes the neighbours that give
  a small lesion its best proposal.
* ``eps``: ``MODEL.TRPN.THRESHOLD < 0`` means the mean of ``p`` per image and level over the
  locations inside the image (padding left out, so an image's threshold does not depend on its
  batch). A value in [0, 1) is used as is.
* Constant ``p`` with the mean threshold: nothing is strictly above the mean, so that (image,
  level) keeps all its locations (the map carries no information). A fixed threshold has no such
  fallback: a level with every ``p <= THRESHOLD`` yields no proposal.
* Exactness: truncated candidates get the lowest finite logit before detectron2's top-k / NMS
  and are removed afterwards; being the lowest they never displace, suppress or outrank a kept
  candidate, so the result is what top-k + NMS give on the kept candidates alone.
* Focal-loss normaliser: the number of positive locations, but at least 1/200 of the batch's
  locations (Guided Anchoring's normaliser): with one to three lesions a slice, dividing by the
  positives alone makes the loss diverge.
* Initial ``p``: ``MODEL.TRPN.PRIOR_PROB`` (0.01) everywhere, RetinaNet's focal-loss prior.

Training logs ``trpn/truncated_frac_<level>``. In inference the module keeps the last
confidence maps (``last_conf_maps[level]``: N x H x W in [0, 1]), thresholds (``last_eps``) and
keep masks (``last_keep_masks``) for drawing.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

__all__ = ["TRPN", "build_conf_head"]

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


@PROPOSAL_GENERATOR_REGISTRY.register()
class TRPN(RPN):
    """TruncatedRPN: detectron2's :class:`RPN` with a learned location confidence that gates
    the head's input (p * I) and truncates proposal candidates at locations with p <= eps."""

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
                anchor matched to a lesion) or "not_background" (foreground or ignored, i.e. an
                anchor with IoU above the RPN's negative threshold).
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
        self.conf_head = conf_head
        self.threshold = float(threshold)
        self.loc_loss_weight = float(loc_loss_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        if gate not in ("p", "max_norm", "none"):
            raise ValueError(f"MODEL.TRPN.GATE={gate!r}: must be 'p', 'max_norm' or 'none'")
        if conf_positives not in ("foreground", "not_background"):
            raise ValueError(
                f"MODEL.TRPN.CONF_POSITIVES={conf_positives!r}: must be 'foreground' or 'not_background'"
            )
        self.gate = gate
        self.conf_positives = conf_positives
        # Filled by the last inference forward, for visualization.
        self.last_conf_maps: Dict[str, torch.Tensor] = {}
        self.last_eps: Dict[str, torch.Tensor] = {}
        self.last_keep_masks: Dict[str, torch.Tensor] = {}
        # Per-image "anchor matched to a gt" masks, recorded before subsampling (see below).
        self._matched_pos: Optional[List[torch.Tensor]] = None

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

    # ------------------------------------------------------------------ truncation
    def location_keep_masks(
        self, conf: List[torch.Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Decide which locations survive truncation.

        Args:
            conf: per level, p of shape (N, 1, H, W) in [0, 1].
            image_sizes: (h, w) of each image before padding.
        Returns:
            keep (per level, N x H x W bool), eps (per level, N), valid (per level, N x H x W
            bool: the location lies inside its image).
        """
        sizes = torch.as_tensor(image_sizes, device=conf[0].device, dtype=torch.float32)
        keeps, epss, valids = [], [], []
        for p, stride in zip(conf, self.anchor_generator.strides):
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
        return keeps, epss, valids

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
            peak = (p[:, 0] * valid).flatten(1).amax(1).clamp(min=1e-6).detach()
            out.append(p / peak[:, None, None, None] * x)
        return out

    # ------------------------------------------------------------------ training
    def _subsample_labels(self, label: torch.Tensor) -> torch.Tensor:
        # label_and_sample_anchors calls this once per image with the matcher's labels: record
        # the foreground anchors before subsampling drops some of them to "ignore".
        if self._matched_pos is not None:
            self._matched_pos.append(label == 1 if self.conf_positives == "foreground" else label != 0)
        return super()._subsample_labels(label)

    def conf_loss(
        self,
        conf_logits: List[torch.Tensor],
        matched_pos: List[torch.Tensor],
        num_anchors: List[int],
    ) -> torch.Tensor:
        """Sigmoid focal loss on the confidence logits; a location is positive when one of its
        anchors is matched to a ground truth. Normalised by the number of positive locations,
        but by at least (number of locations) / 200 (see the module docstring).

        Args:
            conf_logits: per level, (N, 1, H, W) logits.
            matched_pos: per image, (sum_l H_l * W_l * A_l,) bool over the concatenated anchors.
            num_anchors: per level, the number of anchors A_l at each location.
        """
        pos = torch.stack(matched_pos)  # N x R
        n = pos.shape[0]
        targets, offset = [], 0
        for z, a in zip(conf_logits, num_anchors):
            h, w = z.shape[-2:]
            num = h * w * a
            targets.append(pos[:, offset : offset + num].reshape(n, h, w, a).any(-1).flatten(1))
            offset += num
        if offset != pos.shape[1]:
            raise ValueError(f"TRPN: {pos.shape[1]} matched anchors, {offset} expected from maps")
        target = torch.cat(targets, dim=1).to(conf_logits[0].dtype)
        logits = torch.cat([z.flatten(1) for z in conf_logits], dim=1)
        loss = sigmoid_focal_loss(
            logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        return loss / target.sum().clamp(min=target.numel() * _MIN_NORMALIZER_PER_LOCATION)

    def _log_truncation(self, keeps: List[torch.Tensor], valids: List[torch.Tensor]) -> None:
        storage = get_event_storage()
        for name, keep, valid in zip(self.in_features, keeps, valids):
            cut = (~keep & valid).sum()
            frac = cut.float() / valid.sum().clamp(min=1)
            storage.put_scalar(f"trpn/truncated_frac_{name}", frac.item())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ):
        """Same inputs and outputs as :meth:`RPN.forward`; adds ``loss_trpn_conf`` to the losses
        when LOC_LOSS_WEIGHT > 0."""
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)

        conf_logits = [self.conf_head(x) for x in feats]
        conf = [torch.sigmoid(z) for z in conf_logits]
        with torch.no_grad():
            keeps, epss, valids = self.location_keep_masks(conf, images.image_sizes)
        pred_objectness_logits, pred_anchor_deltas = self.rpn_head(self.gated(feats, conf, valids))
        # Same layout as RPN: anchor index runs over (Hi, Wi, A).
        pred_objectness_logits = [s.permute(0, 2, 3, 1).flatten(1) for s in pred_objectness_logits]
        box_dim = self.anchor_generator.box_dim
        pred_anchor_deltas = [
            x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, -2)
            for x in pred_anchor_deltas
        ]

        if self.training:
            if gt_instances is None:
                raise ValueError("TRPN requires gt_instances in training")
            self._matched_pos = []
            try:
                gt_labels, gt_boxes = self.label_and_sample_anchors(anchors, gt_instances)
                matched_pos = self._matched_pos
            finally:
                self._matched_pos = None
            losses = self.losses(
                anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
            )
            if self.loc_loss_weight > 0:
                num_anchors = [s.shape[1] // (z.shape[-2] * z.shape[-1])
                               for s, z in zip(pred_objectness_logits, conf_logits)]
                losses["loss_trpn_conf"] = self.loc_loss_weight * self.conf_loss(
                    conf_logits, matched_pos, num_anchors
                )
            self._log_truncation(keeps, valids)
        else:
            losses = {}
            self.last_conf_maps = {f: p[:, 0].detach() for f, p in zip(self.in_features, conf)}
            self.last_eps = {f: e for f, e in zip(self.in_features, epss)}
            self.last_keep_masks = {f: k for f, k in zip(self.in_features, keeps)}
        proposals = self.predict_proposals(
            anchors, pred_objectness_logits, pred_anchor_deltas, images.image_sizes, keeps
        )
        return proposals, losses

    def predict_proposals(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
        keep_masks: Optional[List[torch.Tensor]] = None,
    ) -> List[Instances]:
        """:meth:`RPN.predict_proposals` restricted to the anchors of kept locations.

        Args:
            keep_masks: per level, (N, H, W) bool from :meth:`location_keep_masks`; None
                keeps every location (plain RPN).
        """
        if keep_masks is None:
            return super().predict_proposals(
                anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes
            )
        with torch.no_grad():
            pred_proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            sentinel = torch.finfo(pred_objectness_logits[0].dtype).min
            masked = []
            for logits, keep in zip(pred_objectness_logits, keep_masks):
                n, h, w = keep.shape
                a = logits.shape[1] // (h * w)
                keep_a = keep[..., None].expand(n, h, w, a).reshape(n, -1)
                masked.append(logits.masked_fill(~keep_a, sentinel))
            results = find_top_rpn_proposals(
                pred_proposals,
                masked,
                image_sizes,
                self.nms_thresh,
                self.pre_nms_topk[self.training],
                self.post_nms_topk[self.training],
                self.min_box_size,
                self.training,
            )
            # Truncated candidates sort last everywhere: dropping them afterwards is exact.
            return [r[r.objectness_logits > sentinel] for r in results]
