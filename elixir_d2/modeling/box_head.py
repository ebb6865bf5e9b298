"""ROI box heads built from Auto-lesion Blocks: ``ALBHead`` (fixed genotype) and
``ALBSearchHead`` (mixed ops + architecture parameters).

Layout (docs/design.md, Auto-lesion Block): RoI feature (C x 7 x 7) -> stem to
MODEL.ALB.STEM_CHANNELS -> blocks of
MODEL.ALB.BLOCKS (default ALB, ALB_r, ALB_r; D = MODEL.ALB.CHANNELS, doubled by each ALB_r) ->
global average pool -> P = B x D_last features, fed to detectron2's FastRCNNOutputLayers.
With D = 32: 128 @ 7x7 -> 128 @ 7x7 -> 256 @ 4x4 -> 512 @ 2x2 -> P = 512.

Both heads follow :class:`RelationBoxHead`, the contract ElixirROIHeads relies on:
``forward(x, num_per_image) -> (features, relations)``, with the proposal count of each image so
region_nonlocal never relates proposals of different images, and ``pointwise_before_pooling``.
"""

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY

from .alb.cells import GenotypeBlock, SearchBlock
from .alb.genotype import Genotype, derive_genotype, edge_inputs
from .alb.ops import (
    DepthwiseConv2d,
    RegionNonLocal,
    channels_last,
    conv_norm,
    get_search_space,
    make_norm,
)
from .genotype_source import genotype_from_config, resolve_genotype_path  # noqa: F401 (re-exported)
from .hooks import capture_outputs

__all__ = ["ALBHead", "ALBSearchHead", "ALBStem", "RelationBoxHead", "resolve_genotype_path"]


class RelationBoxHead(nn.Module):
    """Box head whose RoIs know their image: the interface ElixirROIHeads calls.

    ``forward(x, num_per_image)`` takes the (N, C, R, R) RoI features of all images, image after
    image, and the number of RoIs of each image; it returns the (N, P) features for the box
    predictor and, per image, the N_i x N_i relation matrix E among its RoIs ([] when the head
    relates none). With ``pointwise_before_pooling`` True, the caller applies
    :meth:`pointwise_maps` to the feature maps and pools the RoIs from its output.
    """

    pointwise_before_pooling: bool = False

    def relation_op(self) -> Optional[RegionNonLocal]:
        """The region_nonlocal whose E the head returns, or None if it relates no RoIs."""
        return None

    def pointwise_maps(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The head's first (pointwise) layer on whole feature maps, before RoIAlign."""
        raise NotImplementedError(
            f"{type(self).__name__} has no pointwise layer to run before pooling"
        )

    def forward(
        self, x: torch.Tensor, num_per_image: Sequence[int]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        raise NotImplementedError


class ALBStem(nn.Module):
    """The 3x3 conv reducing the RoI feature to ``c_out`` channels, then Norm; returns a
    channels_last tensor (oneDNN's CPU convs, depthwise convs and pools run 2-10x faster on these
    small maps in channels_last than in NCHW, measured; values are the same).

    ``kind``: "conv_3x3" is the paper's dense conv. "sep_conv_3x3" (default) factorises it into a
    pointwise 1x1 to ``c_out`` and a depthwise 3x3: same receptive field and output channels,
    about 1/9 of the cost. Why: on 512 RoIs of 256x7x7 the dense conv alone costs 7.4 GMAC, more
    than FPN's whole 2-fc head (7.1 GMAC), and measured alone it is already slower than that head
    on the CPU, so the time target (ALB head no slower than the 2-fc head) cannot be met with it;
    see projects/benchmarks/alb_head.py.
    """

    def __init__(self, kind: str, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.kind = kind
        if kind == "conv_3x3":
            self.pointwise = None
            self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm)
        elif kind == "sep_conv_3x3":
            # Pointwise first: the depthwise conv then runs on c_out (< c_in) channels.
            self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
            self.conv = DepthwiseConv2d(c_out, c_out, 3, padding=1, groups=c_out, bias=not norm)
        else:
            raise ValueError(
                f"Unknown MODEL.ALB.STEM {kind!r}; expected 'sep_conv_3x3' or 'conv_3x3'"
            )
        self.norm = make_norm(norm, c_out, affine=True)

    def pointwise_maps(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The pointwise conv applied to whole (N, C, H, W) feature maps, for RoIAlign to pool
        afterwards: a bias-free 1x1 conv is linear per pixel and RoIAlign is a per-channel
        weighted average of pixels (zero outside the map), so the two commute exactly."""
        if self.pointwise is None:
            raise ValueError(f"ALBStem {self.kind!r} has no pointwise conv to apply before pooling")
        return [self.pointwise(m) for m in maps]

    def forward(self, x: torch.Tensor, pointwise_before_pooling: bool = False) -> torch.Tensor:
        """``x``: (N, C_in, R, R) RoI features, or (N, c_out, R, R) RoIs pooled from the maps of
        :meth:`pointwise_maps` when ``pointwise_before_pooling``."""
        if pointwise_before_pooling and self.pointwise is None:
            raise ValueError(
                f"ALBStem {self.kind!r}: pointwise before pooling needs the sep_conv_3x3 stem"
            )
        if self.pointwise is not None and not pointwise_before_pooling:
            # The 1x1 conv as one batched matmul reading NCHW and writing channels_last: no
            # layout copy (measured ~15% faster than conv + copy).
            n, c, h, w = x.shape
            weight = self.pointwise.weight.view(-1, c)
            y = torch.matmul(x.reshape(n, c, h * w).transpose(1, 2), weight.t())
            x = y.view(n, h, w, -1).permute(0, 3, 1, 2)
        x = channels_last(x)
        return conv_norm(self.conv, self.norm, x)


def _check_blocks(blocks: Sequence[str]) -> List[str]:
    blocks = list(blocks)
    if not blocks or any(b not in ("normal", "reduce") for b in blocks):
        raise ValueError(
            f"MODEL.ALB.BLOCKS = {blocks}: expected a non-empty list of 'normal' / 'reduce'"
        )
    return blocks


def _layout_from_config(cfg, input_shape: ShapeSpec) -> Dict:
    """The from_config arguments shared by the fixed and the searchable head."""
    return {
        "input_shape": input_shape,
        "blocks": list(cfg.MODEL.ALB.BLOCKS),
        "channels": cfg.MODEL.ALB.CHANNELS,
        "stem_channels": cfg.MODEL.ALB.STEM_CHANNELS,
        "stem": cfg.MODEL.ALB.STEM,
        "norm": cfg.MODEL.ALB.NORM,
        "pointwise_before_pooling": cfg.MODEL.ALB.POINTWISE_BEFORE_POOLING,
    }


class _ALBHeadBase(RelationBoxHead):
    """Stem, block chain and global pooling shared by the fixed and searchable heads.
    ``pointwise_before_pooling`` holds only with the sep_conv_3x3 stem (the dense stem has no
    pointwise layer; the option is then ignored, as MODEL.ALB.POINTWISE_BEFORE_POOLING says)."""

    def __init__(
        self,
        input_shape: ShapeSpec,
        blocks: Sequence[str],
        channels: int,
        stem_channels: int,
        stem: str,
        branches: int,
        norm: str,
        affine: bool,
        pointwise_before_pooling: bool,
    ):
        super().__init__()
        self.block_types = _check_blocks(blocks)
        self.branches = branches
        self._norm = norm
        self.stem = ALBStem(stem, input_shape.channels, stem_channels, norm)
        self.pointwise_before_pooling = bool(pointwise_before_pooling) and (
            self.stem.pointwise is not None
        )
        self.blocks = nn.ModuleList()
        c_pp = c_p = stem_channels
        d, reduction_prev = channels, False
        for kind in self.block_types:
            reduction = kind == "reduce"
            if reduction:
                d *= 2
            self.blocks.append(self._make_block(kind, c_pp, c_p, d, reduction, reduction_prev))
            c_pp, c_p = c_p, self.blocks[-1].out_channels
            reduction_prev = reduction
        self._out_channels = c_p

    def _make_block(self, kind, c_pp, c_p, d, reduction, reduction_prev) -> nn.Module:
        raise NotImplementedError

    def _run_block(self, i: int, s0, s1, num_per_image) -> torch.Tensor:
        raise NotImplementedError

    @property
    @torch.jit.unused
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._out_channels)

    def pointwise_maps(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The stem's pointwise conv on the feature maps the RoIs are pooled from."""
        return self.stem.pointwise_maps(maps)

    def relation_op(self) -> Optional[RegionNonLocal]:
        """The first region_nonlocal of the first block that has one (the ALB in the default
        layout): its E is the head's relation graph. None if the head has none."""
        for block in self.blocks:
            ops = block.relation_ops()
            if ops:
                return ops[0]
        return None

    def forward(
        self, x: torch.Tensor, num_per_image: Optional[Sequence[int]] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``x``: (N, C, R, R) RoI features (pooled from :meth:`pointwise_maps` maps when
        ``pointwise_before_pooling``); returns (N, P) features and the per-image E."""
        if num_per_image is None:
            # Without counts every RoI would count as one image's: refuse rather than mix images.
            raise ValueError(
                f"{type(self).__name__} needs num_per_image (proposals per image); "
                "use MODEL.ROI_HEADS.NAME 'ElixirROIHeads'"
            )
        relation_op = self.relation_op()
        # E leaves the op as its graph's forward output, in the autograd graph (RTM trains
        # through it): the op keeps nothing between calls.
        graphs = (
            capture_outputs(relation_op.graph)
            if relation_op is not None
            else contextlib.nullcontext([])
        )
        with graphs as relations:
            s = self.stem(x, self.pointwise_before_pooling)  # channels_last, see ALBStem
            # Blocks take rectified inputs (cells.py): each output is rectified once here, not
            # once per block that reads it. The head's features are the last output, unrectified.
            r0 = r1 = F.relu(s)
            for i in range(len(self.blocks)):
                s = self._run_block(i, r0, r1, num_per_image)
                if i + 1 < len(self.blocks):
                    r0, r1 = r1, F.relu(s)
        return F.adaptive_avg_pool2d(s, 1).flatten(1), list(relations[0]) if relations else []


@ROI_BOX_HEAD_REGISTRY.register()
class ALBHead(_ALBHeadBase):
    """Fixed Auto-lesion head built from a genotype (MODEL.ALB.GENOTYPE)."""

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        genotype: Genotype,
        blocks: Sequence[str] = ("normal", "reduce", "reduce"),
        channels: int = 32,
        stem_channels: int = 128,
        stem: str = "sep_conv_3x3",
        norm: str = "BN",
        pointwise_before_pooling: bool = False,
    ):
        """
        Args:
            input_shape: shape of the pooled RoI feature.
            genotype: the ALB / ALB_r structures (validated).
            blocks: "normal" (ALB) / "reduce" (ALB_r) sequence.
            channels: D of the first block (doubled by each ALB_r).
            stem_channels: output channels of the stem conv (= 4 D keeps ALB's channels).
            stem: "sep_conv_3x3" or "conv_3x3", see :class:`ALBStem`.
            norm: "BN", "GN" or "" inside ops.
            pointwise_before_pooling: see :class:`RelationBoxHead`.
        """
        self.genotype = genotype.validate()
        super().__init__(
            input_shape,
            blocks,
            channels,
            stem_channels,
            stem,
            genotype.branches,
            norm,
            affine=True,
            pointwise_before_pooling=pointwise_before_pooling,
        )

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> Dict:
        genotype = genotype_from_config(cfg)  # logs the file and whether it was searched
        if genotype.space != cfg.MODEL.ALB.SEARCH_SPACE:
            raise ValueError(
                f"{cfg.MODEL.ALB.GENOTYPE}: genotype of space {genotype.space!r} but "
                f"MODEL.ALB.SEARCH_SPACE is {cfg.MODEL.ALB.SEARCH_SPACE!r}"
            )
        if genotype.branches != cfg.MODEL.ALB.BRANCHES:
            raise ValueError(
                f"{cfg.MODEL.ALB.GENOTYPE}: genotype has {genotype.branches} branches but "
                f"MODEL.ALB.BRANCHES is {cfg.MODEL.ALB.BRANCHES}"
            )
        return {**_layout_from_config(cfg, input_shape), "genotype": genotype}

    def _make_block(self, kind, c_pp, c_p, d, reduction, reduction_prev):
        return GenotypeBlock(
            self.genotype.pairs(kind),
            c_pp,
            c_p,
            d,
            reduction,
            reduction_prev,
            self.branches,
            self._norm,
            affine=True,
        )

    def _run_block(self, i, s0, s1, num_per_image):
        return self.blocks[i](s0, s1, num_per_image)


@ROI_BOX_HEAD_REGISTRY.register()
class ALBSearchHead(_ALBHeadBase):
    """Searchable Auto-lesion head: mixed ops on every edge, weighted by softmax(alpha).

    ``alpha_normal`` / ``alpha_reduce`` (num_edges x num_ops) are shared by all blocks of their
    type, as in DARTS; :meth:`arch_parameters` and :meth:`weight_parameters` separate them from
    the network weights for the alternating optimisation.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        space: str = "elixir",
        blocks: Sequence[str] = ("normal", "reduce", "reduce"),
        channels: int = 16,
        stem_channels: int = 64,
        stem: str = "sep_conv_3x3",
        branches: int = 4,
        norm: str = "BN",
        pointwise_before_pooling: bool = False,
    ):
        """Arguments as :class:`ALBHead`, with the search ``space`` and ``branches`` instead
        of a genotype. Norms inside ops have no affine parameters while searching (DARTS)."""
        self.space = space
        self.op_names = get_search_space(space)
        super().__init__(
            input_shape,
            blocks,
            channels,
            stem_channels,
            stem,
            branches,
            norm,
            affine=False,
            pointwise_before_pooling=pointwise_before_pooling,
        )
        shape = (len(edge_inputs(branches)), len(self.op_names))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape))

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> Dict:
        return {
            **_layout_from_config(cfg, input_shape),
            "space": cfg.MODEL.ALB.SEARCH_SPACE,
            "branches": cfg.MODEL.ALB.BRANCHES,
        }

    def _make_block(self, kind, c_pp, c_p, d, reduction, reduction_prev):
        return SearchBlock(
            self.op_names,
            c_pp,
            c_p,
            d,
            reduction,
            reduction_prev,
            self.branches,
            self._norm,
            affine=False,
        )

    def _run_block(self, i, s0, s1, num_per_image):
        alpha = self.alpha_reduce if self.block_types[i] == "reduce" else self.alpha_normal
        return self.blocks[i](s0, s1, F.softmax(alpha, dim=-1), num_per_image)

    def arch_parameters(self) -> List[nn.Parameter]:
        """The architecture parameters [alpha_normal, alpha_reduce]."""
        return [self.alpha_normal, self.alpha_reduce]

    def weight_parameters(self) -> List[nn.Parameter]:
        """Every parameter of the head except the alphas."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def genotype(self) -> Genotype:
        """Discretise the current alphas (see :func:`derive_genotype`)."""
        return derive_genotype(self.alpha_normal, self.alpha_reduce, self.space, self.branches)
