"""Candidate operations of the Auto-lesion Block search spaces (docs/design.md, Auto-lesion Block).

Every operation maps ``(N, C_in, H, W)`` to ``(N, C_out, ceil(H / s), ceil(W / s))`` for a stride
``s`` in {1, 2} and any ``C_in`` / ``C_out``, so that the same op can sit on a normal edge (ALB),
on a reducing edge (ALB_r) or change channel counts. Convolutions are ReLU-Conv-Norm, as in the
paper; the normalisation is chosen by ``norm`` ("BN", "GN" or "" for none).

Every op's ``forward`` takes ``(x, num_per_image)``: the number of proposals of each image, whose
sum is ``N``. Only ``region_nonlocal`` uses it (it relates the proposals of one image only); the
others accept and ignore it, so that mixed ops and blocks can call every op the same way without
hidden global state.

The op names of each search space are data in ``spaces.py``; the BatchNorm-folding fast paths that
the conv ops call are in ``fused.py``. ``registry.py`` adds ops to :data:`_BUILDERS`, the table
:func:`build_op` reads (docs/extending.md).
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Re-exported: op names live in spaces.py and BN folding in fused.py, but callers (box_head.py,
# tests) import them from here.
from .fused import bn_fold, concat_conv_norm, conv_norm
from .spaces import DARTS_OPS, ELIXIR_OPS, SEARCH_SPACES, get_search_space

__all__ = [
    "ELIXIR_OPS",
    "DARTS_OPS",
    "SEARCH_SPACES",
    "get_search_space",
    "build_op",
    "make_norm",
    "bn_fold",
    "conv_norm",
    "ALBOp",
    "Zero",
    "ReLUConvNorm",
    "FactorizedReduce",
    "RegionNonLocal",
    "RelationGraph",
    "region_relations",
    "channels_last",
    "autocast_off",
    "DepthwiseConv2d",
]


def _gn_groups(channels: int) -> int:
    # At most 32 groups (detectron2's GN default) but at least 4 channels per group: on the 2x2
    # maps of the last ALB_r a group of 1 channel would be normalised over 4 values only.
    best = 1
    for g in range(1, min(32, channels // 4) + 1):
        if channels % g == 0:
            best = g
    return best


def make_norm(norm: str, channels: int, affine: bool = True) -> nn.Module:
    """Normalisation layer for ``channels``: "BN", "GN" (groups dividing channels) or "" (none)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels, affine=affine)
    if norm == "GN":
        return nn.GroupNorm(_gn_groups(channels), channels, affine=affine)
    if norm == "":
        return nn.Identity()
    raise ValueError(f"Unknown ALB norm {norm!r} (MODEL.ALB.NORM); expected 'BN', 'GN' or ''")


class ALBOp(nn.Module):
    """Base class: ``forward(x, num_per_image)``; ``num_per_image`` is ignored unless needed."""

    def forward(self, x: torch.Tensor, num_per_image: Optional[Sequence[int]] = None):
        raise NotImplementedError


class Zero(ALBOp):
    """The ``none`` op: zeros of the output shape (it only exists while searching)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x, num_per_image=None):
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.c_out, -(-h // s), -(-w // s))


class ReLUConvNorm(ALBOp):
    """ReLU -> one or more convolutions -> Norm (the paper's ReLU-Conv-BN order). With
    ``relu=False`` the op expects an already rectified input and skips the ReLU (a block's
    preprocessing, see cells.py): ``op(relu(x))`` is then the full op on ``x``."""

    def __init__(
        self,
        convs: List[nn.Conv2d],
        c_out: int,
        norm: str,
        affine: bool = True,
        relu: bool = True,
    ):
        super().__init__()
        self.relu = relu
        self.convs = nn.Sequential(*convs)
        self.norm = make_norm(norm, c_out, affine)

    def forward(self, x, num_per_image=None):
        if self.relu:
            x = F.relu(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return conv_norm(self.convs[-1], self.norm, x)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise conv (``groups`` = channels) that trains in float32 under autocast.

    A depthwise conv has few FLOPs per byte, so half precision saves it little, and oneDNN's
    bfloat16 depthwise backward is slow, worst at stride 2: a quickstart ElixirNet with two
    stride-2 7x7 ones trained at 0.94x float32's step time in bfloat16, 0.75x with them in float32
    (docs/results/regime.md, "bfloat16 training"). The output is float32; the next conv
    casts it back under autocast. Without autocast this is an ordinary nn.Conv2d, and so is an
    eval-mode BatchNorm-folded pass (fused.py), which has no backward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with autocast_off(x):
            return super().forward(x.float())


def _conv(c_in, c_out, k, stride=1, dilation=1, groups=1, bias=False) -> nn.Conv2d:
    # "Same" padding, so stride 2 gives ceil(H / 2) for odd and even H alike.
    pad = (k - 1) * dilation // 2 if isinstance(k, int) else tuple((kk - 1) // 2 for kk in k)
    cls = DepthwiseConv2d if groups > 1 and groups == c_in == c_out else nn.Conv2d
    return cls(
        c_in, c_out, k, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=bias
    )


def conv_op(c_in, c_out, k, stride, norm, affine=True, dilation=1, relu=True) -> ReLUConvNorm:
    """Plain ReLU-Conv(k x k, dilation)-Norm (``relu``: see :class:`ReLUConvNorm`)."""
    conv = _conv(c_in, c_out, k, stride, dilation, bias=not norm)
    return ReLUConvNorm([conv], c_out, norm, affine, relu=relu)


def asym_conv_op(c_in, c_out, stride, norm, affine=True) -> ReLUConvNorm:
    """Inception-style 3x3 factorised into 1x3 then 3x1 (each carrying half the stride)."""
    return ReLUConvNorm(
        [
            _conv(c_in, c_out, (1, 3), stride=(1, stride)),
            _conv(c_out, c_out, (3, 1), stride=(stride, 1), bias=not norm),
        ],
        c_out,
        norm,
        affine,
    )


def dw_conv_op(c_in, c_out, k, stride, norm, affine=True, dilation=1) -> ReLUConvNorm:
    """Depthwise k x k (optionally dilated) then pointwise 1x1: a large kernel at low cost."""
    return ReLUConvNorm(
        [
            _conv(c_in, c_in, k, stride, dilation, groups=c_in),
            _conv(c_in, c_out, 1, bias=not norm),
        ],
        c_out,
        norm,
        affine,
    )


class SepConv(ALBOp):
    """DARTS' separable conv: two stacked ReLU-depthwise-pointwise-Norm units."""

    def __init__(self, c_in, c_out, k, stride, norm, affine=True):
        super().__init__()
        self.op1 = dw_conv_op(c_in, c_in, k, stride, norm, affine)
        self.op2 = dw_conv_op(c_in, c_out, k, 1, norm, affine)

    def forward(self, x, num_per_image=None):
        return self.op2(self.op1(x))


class FactorizedReduce(ALBOp):
    """Halve the resolution without dropping pixels: two 1x1 stride-2 convs on x and on x shifted
    by one pixel, concatenated (DARTS). The shifted copy is zero-padded at the far edge so odd
    sizes (7x7 RoI features) give ceil(H / 2) on both paths. ReLU first, unless ``relu=False``
    (input already rectified, as in :class:`ReLUConvNorm`)."""

    def __init__(self, c_in: int, c_out: int, norm: str, affine: bool = True, relu: bool = True):
        super().__init__()
        self.relu = relu
        half = c_out // 2
        self.conv_a = _conv(c_in, half, 1, stride=2, bias=not norm)
        self.conv_b = _conv(c_in, c_out - half, 1, bias=not norm)  # applied to x[1::2, 1::2]
        self.norm = make_norm(norm, c_out, affine)

    def forward(self, x, num_per_image=None):
        if self.relu:
            x = F.relu(x)
        # Subsample before convolving (a 1x1 conv commutes with it), then pad the odd-size
        # remainder: same values as convolving the padded, shifted map, at a quarter of the cost.
        h, w = -(-x.shape[2] // 2), -(-x.shape[3] // 2)
        odd = x[:, :, 1::2, 1::2]
        odd = F.pad(odd, (0, w - odd.shape[3], 0, h - odd.shape[2]))
        return concat_conv_norm(self.norm, [(self.conv_a, x), (self.conv_b, odd)])


class Identity(ALBOp):
    def forward(self, x, num_per_image=None):
        return x


class Pool(ALBOp):
    """3x3 average / max pooling; a channel change adds a 1x1 ReLU-Conv-Norm projection."""

    def __init__(self, kind: str, c_in, c_out, stride, norm, affine=True):
        super().__init__()
        if kind == "avg":
            # Padding must not count as zeros, or border pixels of a 7x7 RoI would be dimmed.
            self.pool = nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
        else:
            self.pool = nn.MaxPool2d(3, stride, padding=1)
        self.proj = conv_op(c_in, c_out, 1, 1, norm, affine) if c_in != c_out else None

    def forward(self, x, num_per_image=None):
        x = self.pool(x)
        return self.proj(x) if self.proj is not None else x


def skip_op(c_in, c_out, stride, norm, affine=True) -> ALBOp:
    """Identity when shapes allow, otherwise FactorizedReduce (stride 2) or a 1x1 projection."""
    if stride == 2:
        return FactorizedReduce(c_in, c_out, norm, affine)
    if c_in != c_out:
        return conv_op(c_in, c_out, 1, 1, norm, affine)
    return Identity()


class RelationGraph(nn.Module):
    """E = softmax_rows(phi_i phi_i^T) per image (:func:`region_relations`) as a module of its
    own, without parameters (state dicts are unchanged): its forward output is E, which a forward
    hook reads (:mod:`elixir_d2.modeling.hooks`), in the autograd graph, within the forward that
    computed it. Nothing is kept on the module afterwards."""

    def forward(self, phi: torch.Tensor, num_per_image: Sequence[int]) -> List[torch.Tensor]:
        return region_relations(phi, num_per_image)


class RegionNonLocal(ALBOp):
    """Relation among the proposals of one image (paper eq. 2; docs/design.md, Region non-local
    operator).

    For the ``N_i`` proposals of image ``i``: ``x`` = spatial mean of each RoI feature;
    ``phi, psi`` = FC + ReLU to ``C/2``; ``E = softmax_rows(phi phi^T)`` (``N_i x N_i``);
    ``Y = ReLU(E psi W)``; output ``g(Y)`` (FC to ``C_out``) broadcast over the output resolution.
    Images are processed one by one, so no relation crosses images and memory is O(N_i^2).
    E is the output of the submodule ``graph`` (:class:`RelationGraph`): the box head reads it
    through a forward hook, still in the autograd graph, so RTM using it in the same forward
    trains through it. Under autocast the op still computes in float32 (E included) and returns
    ``x``'s dtype.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        hidden = max(c_out // 2, 1)  # "output dimension is D/2" (paper)
        self.stride = stride
        self.phi = nn.Linear(c_in, hidden)
        self.psi = nn.Linear(c_in, hidden)
        self.w = nn.Linear(hidden, hidden, bias=False)
        self.g = nn.Linear(hidden, c_out)
        self.graph = RelationGraph()

    def forward(self, x, num_per_image=None):
        n, _, h, w = x.shape
        counts = check_num_per_image(num_per_image, n, "region_nonlocal")
        # In float32 whatever autocast says (see region_relations); the op works on one vector
        # per RoI, so this costs next to nothing. The output goes back to x's dtype.
        with autocast_off(x):
            pooled = x.mean(dim=(2, 3), dtype=torch.float32)
            phi = F.relu(self.phi(pooled))
            psi = F.relu(self.psi(pooled))
            relations = self.graph(phi, counts)
            outs = [F.relu(self.w(e @ psi_i)) for e, psi_i in zip(relations, psi.split(counts))]
            y = self.g(torch.cat(outs, dim=0)) if outs else self.g(psi)
        s = self.stride
        return y.to(x.dtype)[:, :, None, None].expand(-1, -1, -(-h // s), -(-w // s))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last memory format (itself when it already is; values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last)


def autocast_off(t: torch.Tensor) -> torch.autocast:
    """Context with autocast disabled on ``t``'s device, so float32 tensors stay float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def region_relations(phi: torch.Tensor, num_per_image: Sequence[int]) -> List[torch.Tensor]:
    """Per-image relation graphs ``E_i = softmax_rows(phi_i phi_i^T)`` (``N_i x N_i``), where
    ``phi_i`` are the rows of ``phi`` (N x K embeddings) of image ``i``. Shared by
    region_nonlocal and by RTM when its box head has no region_nonlocal edge.

    Always float32 (autocast off, ``phi`` cast up): the logits phi_i phi_j^T grow with the square
    of the features, overflow float16 (inf - inf gives NaN rows) and lose their differences in
    bfloat16's 8-bit mantissa, which changes which neighbours a row attends to.
    """
    counts = check_num_per_image(num_per_image, phi.shape[0], "region_relations")
    with autocast_off(phi):
        phi = phi.float()
        return [torch.softmax(p @ p.t(), dim=1) for p in phi.split(counts)]


def check_num_per_image(num_per_image: Optional[Sequence[int]], n: int, who: str) -> List[int]:
    """Validate per-image proposal counts against the batch size ``n``; return them as a list."""
    if num_per_image is None:
        raise ValueError(
            f"{who} needs the number of proposals of each image (num_per_image) so that it never "
            "relates proposals of different images; use ROI_HEADS.NAME 'ElixirROIHeads'"
        )
    counts = [int(c) for c in num_per_image]
    if any(c < 0 for c in counts) or sum(counts) != n:
        raise ValueError(
            f"{who}: num_per_image {counts} must be non-negative and sum to the {n} RoI features"
        )
    return counts


# An op builder: (c_in, c_out, stride, norm, affine) -> the op module.
OpBuilder = Callable[[int, int, int, str, bool], nn.Module]

# Every op by name: the built-in ones below, and those registry.register_alb_op adds.
_BUILDERS: Dict[str, OpBuilder] = {
    "none": lambda ci, co, s, norm, a: Zero(ci, co, s),
    "skip_connect": skip_op,
    "avg_pool_3x3": lambda ci, co, s, norm, a: Pool("avg", ci, co, s, norm, a),
    "max_pool_3x3": lambda ci, co, s, norm, a: Pool("max", ci, co, s, norm, a),
    "conv_1x1": lambda ci, co, s, norm, a: conv_op(ci, co, 1, s, norm, a),
    "asym_conv_3": asym_conv_op,
    "dil_conv_3x3_r2": lambda ci, co, s, norm, a: conv_op(ci, co, 3, s, norm, a, dilation=2),
    "dil_conv_3x3_r3": lambda ci, co, s, norm, a: conv_op(ci, co, 3, s, norm, a, dilation=3),
    "dw_conv_7x7": lambda ci, co, s, norm, a: dw_conv_op(ci, co, 7, s, norm, a),
    "region_nonlocal": lambda ci, co, s, norm, a: RegionNonLocal(ci, co, s),
    # DARTS space: its dil_conv is separable (depthwise dilated + pointwise), as in DARTS.
    "sep_conv_3x3": lambda ci, co, s, norm, a: SepConv(ci, co, 3, s, norm, a),
    "sep_conv_5x5": lambda ci, co, s, norm, a: SepConv(ci, co, 5, s, norm, a),
    "dil_conv_3x3": lambda ci, co, s, norm, a: dw_conv_op(ci, co, 3, s, norm, a, dilation=2),
    "dil_conv_5x5": lambda ci, co, s, norm, a: dw_conv_op(ci, co, 5, s, norm, a, dilation=2),
}


def build_op(
    name: str, c_in: int, c_out: int, stride: int = 1, norm: str = "GN", affine: bool = True
) -> ALBOp:
    """Build the candidate op ``name`` mapping ``c_in`` to ``c_out`` channels at ``stride``."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown ALB op {name!r}; known ops: {sorted(_BUILDERS)}")
    if stride not in (1, 2):
        raise ValueError(f"ALB op {name!r}: stride must be 1 or 2, got {stride}")
    op = _BUILDERS[name](c_in, c_out, stride, norm, affine)
    if not isinstance(op, nn.Module):  # a registered builder's mistake: say whose
        raise TypeError(
            f"ALB op {name!r}: its builder returned a {type(op).__name__}, not an nn.Module"
        )
    return op
