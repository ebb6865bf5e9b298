"""Relation Transfer Module (paper section "Relation Transfer Module", Table 4; docs/design.md,
Relation Transfer Module).

The binary classifier's weights M = [W | b] (2 x (P+1), lesion and background rows) are taken as
category-wise semantic embeddings. Each RoI maps onto them softly, with Gamma = softmax of its
binary scores (N x 2); the relation graph E of its image (N_i x N_i, from the Auto-lesion Block's
region_nonlocal, or computed the same way by RTM itself when the head has none) propagates them
among the proposals of that image:

    f_E = E Gamma M W_E        (W_E: (P+1) x MODEL.RTM.EMBED_DIM)

and [f, f_E] feeds a multi-type classifier and box regressor over MODEL.RTM.NUM_TYPES lesion
types. M is detached: RTM reads the binary classifier, it never trains it (the binary predictor
trains only through its own loss). Since every row of E sums to 1, f_E_i = u + a_i v with
a_i = sum_j E_ij Gamma_j0 (the relation-weighted lesion probability of i's neighbourhood) and
u, v fixed by M W_E: RTM adds that neighbourhood evidence to the region feature.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from .alb.ops import autocast_off, check_num_per_image, region_relations

__all__ = ["RelationTransferModule", "semantic_embeddings"]


def semantic_embeddings(binary_predictor: FastRCNNOutputLayers) -> torch.Tensor:
    """M = [W | b] of the binary classifier (2 x (P+1)), detached from the autograd graph."""
    cls_score = binary_predictor.cls_score
    if cls_score.out_features != 2:
        raise ValueError(
            f"RTM needs a binary classifier (lesion + background = 2 outputs), got "
            f"{cls_score.out_features} outputs: build the box predictor with NUM_CLASSES 1"
        )
    return torch.cat([cls_score.weight, cls_score.bias[:, None]], dim=1).detach()


class RelationTransferModule(nn.Module):
    """W_E, the optional own relation embedding phi, and the multi-type predictor over [f, f_E].

    ``forward(features, binary_predictor, relations)`` returns the multi-type predictor's
    (scores, deltas). ``relations`` are per-image E; when the box head provides none,
    :meth:`own_relations` computes them from the pooled RoI features (needs ``relation_channels``).
    """

    @configurable
    def __init__(
        self,
        *,
        feature_dim: int,
        embed_dim: int,
        predictor: FastRCNNOutputLayers,
        relation_channels: Optional[int] = None,
    ):
        """
        Args:
            feature_dim: P, the size of the box head's output f.
            embed_dim: E, the output size of W_E.
            predictor: multi-type predictor taking P + E features.
            relation_channels: channels C of the pooled RoI features when RTM computes its own
                E (phi = FC + ReLU to C/2, as region_nonlocal); None when the head provides E.
        """
        super().__init__()
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        # Rows of M are f-space vectors plus a bias entry: variance-preserving init from P+1.
        self.w_e = nn.Parameter(torch.randn(feature_dim + 1, embed_dim) / (feature_dim + 1) ** 0.5)
        self.predictor = predictor
        self.phi = None
        if relation_channels is not None:
            self.phi = nn.Linear(relation_channels, max(relation_channels // 2, 1))

    @property
    def has_own_relations(self) -> bool:
        """Whether RTM computes E itself (:meth:`own_relations`) rather than taking the box
        head's region_nonlocal graph."""
        return self.phi is not None

    @classmethod
    def from_config(
        cls, cfg, feature_shape: ShapeSpec, relation_channels: Optional[int] = None
    ) -> Dict:
        num_types = cfg.MODEL.RTM.NUM_TYPES
        if num_types < 1 or cfg.MODEL.RTM.EMBED_DIM < 1:
            raise ValueError(
                f"MODEL.RTM.NUM_TYPES ({num_types}) and MODEL.RTM.EMBED_DIM "
                f"({cfg.MODEL.RTM.EMBED_DIM}) must be positive"
            )
        p = feature_shape.channels * (feature_shape.height or 1) * (feature_shape.width or 1)
        e = cfg.MODEL.RTM.EMBED_DIM
        type_cfg = cfg.clone()
        type_cfg.defrost()
        type_cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_types
        return {
            "feature_dim": p,
            "embed_dim": e,
            "predictor": FastRCNNOutputLayers(type_cfg, ShapeSpec(channels=p + e)),
            "relation_channels": relation_channels,
        }

    def own_relations(
        self, pooled: torch.Tensor, num_per_image: Sequence[int]
    ) -> List[torch.Tensor]:
        """E per image from pooled RoI features (N, C, R, R), as region_nonlocal computes it:
        spatial mean, phi = FC + ReLU, E = softmax_rows(phi phi^T) within each image."""
        if self.phi is None:
            raise ValueError(
                "RTM was built without its own relation embedding (relation_channels=None): "
                "the box head must provide E (a region_nonlocal edge)"
            )
        with autocast_off(pooled):  # float32, as region_nonlocal's (see region_relations)
            x = (
                pooled.mean(dim=(2, 3), dtype=torch.float32)
                if pooled.dim() == 4
                else pooled.float()
            )
            phi = F.relu(self.phi(x))
        return region_relations(phi, num_per_image)

    def transfer(
        self,
        features: torch.Tensor,
        binary_predictor: FastRCNNOutputLayers,
        relations: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """f_E = E Gamma M W_E for the (N, P) features, image by image (E never mixes images);
        computed in float32, returned in the features' dtype."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"RTM expects (N, {self.feature_dim}) box features, got {tuple(features.shape)}"
            )
        m = semantic_embeddings(binary_predictor)
        if m.shape[1] != self.feature_dim + 1:
            raise ValueError(
                f"binary classifier M is {tuple(m.shape)} but RTM's features have P = "
                f"{self.feature_dim} (M must be 2 x (P+1))"
            )
        counts = check_num_per_image([len(e) for e in relations], len(features), "RTM")
        # float32 whatever autocast says: the binary scores feed a softmax (float16 overflows to
        # inf - inf = NaN, bfloat16 rounds them coarsely) and E's rows sum to 1 only in float32.
        # The result goes back to the features' dtype for the predictor.
        with autocast_off(features):
            f, m = features.float(), m.float()
            # Binary scores s = [f, 1] M^T: the same values as the binary classifier's output,
            # but through the detached M, so no gradient reaches the binary classifier from here.
            gamma = torch.softmax(F.linear(f, m[:, :-1], m[:, -1]), dim=1)
            node = gamma @ (m @ self.w_e.float())  # (N, E): Gamma M W_E (M W_E is 2 x E)
            out = []
            for e, node_i in zip(relations, node.split(counts)):
                if e.shape != (len(node_i), len(node_i)):
                    raise ValueError(
                        f"RTM: relation matrix {tuple(e.shape)} for {len(node_i)} RoIs"
                    )
                out.append(e.float() @ node_i)
            f_e = torch.cat(out, dim=0) if out else node
        return f_e.to(features.dtype)

    def forward(
        self,
        features: torch.Tensor,
        binary_predictor: FastRCNNOutputLayers,
        relations: Sequence[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Multi-type (scores (N, T+1), deltas) from [f, f_E]."""
        f_e = self.transfer(features, binary_predictor, relations)
        return self.predictor(torch.cat([features, f_e], dim=1))
