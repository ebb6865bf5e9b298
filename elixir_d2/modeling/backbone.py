"""Deformable ResNet backbones (the paper's Deformv2 baseline) without detectron2's C++ ops.

detectron2 v0.6 already knows where deformable convolutions go: ``build_resnet_backbone`` puts a
``DeformBottleneckBlock`` in every stage flagged by ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``
(``DEFORM_MODULATED`` picks DCNv2, ``DEFORM_NUM_GROUPS`` the offset groups). Only the conv op
itself (``detectron2.layers.DeformConv`` / ``ModulatedDeformConv``) needs ``detectron2._C``, and
the modulated one only on CUDA. So the backbones here are built by detectron2's own builders, then
each deformable conv is swapped for :class:`TorchvisionDeformConv`, which holds the very same
parameters (state-dict keys unchanged: ``conv2_offset.*``, ``conv2.weight``, ``conv2.norm.*``)
and computes the same function through ``torchvision.ops.deform_conv2d``. Both ops read the
offsets in the layout of the original DCN kernels: for offset group g and kernel point
k = i * kw + j, channel g*2*K + 2k holds dy and g*2*K + 2k + 1 holds dx; the mask has G*K channels.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from detectron2.config import CfgNode
from detectron2.layers import DeformConv, ModulatedDeformConv, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock, build_resnet_backbone

from ..env import compiled_ops

__all__ = [
    "TorchvisionDeformConv",
    "TorchvisionDeformBottleneckBlock",
    "convert_deform_convs",
    "use_detectron2_deform_conv",
    "build_deformable_resnet_backbone",
    "build_deformable_resnet_fpn_backbone",
]

logger = logging.getLogger(__name__)

DEFORM_IMPLS = ("auto", "detectron2", "torchvision")


class TorchvisionDeformConv(nn.Module):
    """Drop-in for detectron2's ``DeformConv`` and ``ModulatedDeformConv`` over torchvision.

    Same constructor arguments, attributes (``weight``, ``bias``, ``norm``, ``activation``) and
    call signatures: ``forward(x, offset)`` is DCNv1, ``forward(x, offset, mask)`` is DCNv2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
        activation=None,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"TorchvisionDeformConv: in_channels={in_channels} and out_channels={out_channels}"
                f" must both be divisible by groups={groups}"
            )
        if in_channels % deformable_groups:
            raise ValueError(
                f"TorchvisionDeformConv: in_channels={in_channels} must be divisible by"
                f" deformable_groups={deformable_groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.norm = norm
        self.activation = activation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    @classmethod
    def from_detectron2(cls, conv: nn.Module) -> "TorchvisionDeformConv":
        """The same layer as detectron2's ``conv``, sharing its parameter and norm objects."""
        if not isinstance(conv, (DeformConv, ModulatedDeformConv)):
            raise ValueError(
                f"expected a detectron2 DeformConv/ModulatedDeformConv, got {type(conv)}"
            )
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            deformable_groups=conv.deformable_groups,
            bias=False,
            norm=conv.norm,
            activation=conv.activation,
        )
        # Keep the Parameter objects themselves: weights initialised (or loaded) on the
        # detectron2 layer stay, and optimisers built earlier still point at them.
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def _check(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        k = self.kernel_size[0] * self.kernel_size[1] * self.deformable_groups
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"TorchvisionDeformConv: input of shape {tuple(x.shape)}, expected"
                f" (N, {self.in_channels}, H, W)"
            )
        if offset.dim() != 4 or offset.shape[1] != 2 * k:
            raise ValueError(
                f"TorchvisionDeformConv: offset of shape {tuple(offset.shape)}, expected 2 *"
                f" deformable_groups * kh * kw = {2 * k} channels"
            )
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != k):
            raise ValueError(
                f"TorchvisionDeformConv: mask of shape {tuple(mask.shape)}, expected"
                f" deformable_groups * kh * kw = {k} channels"
            )

    def forward(
        self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        self._check(x, offset, mask)
        if x.numel() == 0:
            # An empty batch gives an empty output of the right shape, as detectron2's layers do.
            out_hw = [
                (i + 2 * p - (d * (k - 1) + 1)) // s + 1
                for i, p, d, k, s in zip(
                    x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride
                )
            ]
            return x.new_zeros(x.shape[0], self.out_channels, *out_hw)
        x = deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels},"
            f" kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding},"
            f" dilation={self.dilation}, groups={self.groups},"
            f" deformable_groups={self.deformable_groups}, bias={self.bias is not None}"
        )


class TorchvisionDeformBottleneckBlock(DeformBottleneckBlock):
    """detectron2's ``DeformBottleneckBlock`` (same arguments, keys and forward) whose deformable
    conv runs through torchvision; usable as ``block_class`` of ``ResNet.make_stage``."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self.conv2 = TorchvisionDeformConv.from_detectron2(self.conv2)


def convert_deform_convs(module: nn.Module) -> int:
    """Replace, in place, every detectron2 ``DeformConv`` / ``ModulatedDeformConv`` inside
    ``module`` by a :class:`TorchvisionDeformConv` with the same parameters. Returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, (DeformConv, ModulatedDeformConv)):
            setattr(module, name, TorchvisionDeformConv.from_detectron2(child))
            count += 1
        else:
            count += convert_deform_convs(child)
    return count


def use_detectron2_deform_conv(cfg: CfgNode) -> bool:
    """Whether the deformable backbone keeps detectron2's own DeformConv ops.

    ``MODEL.RESNETS.DEFORM_IMPL``: "torchvision" never; "detectron2" always (fails at run time
    without its C++ ops); "auto" when the op the config needs is compiled and the model runs on
    CUDA (detectron2's modulated op has no CPU kernel and its CPU DCNv1 has one offset group only).
    """
    impl = cfg.MODEL.RESNETS.DEFORM_IMPL
    if impl not in DEFORM_IMPLS:
        raise ValueError(f"MODEL.RESNETS.DEFORM_IMPL = {impl!r}; expected one of {DEFORM_IMPLS}")
    if impl != "auto":
        return impl == "detectron2"
    modulated = cfg.MODEL.RESNETS.DEFORM_MODULATED
    op = "modulated_deform_conv_forward" if modulated else "deform_conv_forward"
    return compiled_ops()[op] and str(cfg.MODEL.DEVICE).startswith("cuda")


def _check_deform_cfg(cfg: CfgNode) -> None:
    on = list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    if len(on) != 4:
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE = {on}: expected 4 flags (res2, res3, res4, res5)"
        )
    if any(on) and cfg.MODEL.RESNETS.DEPTH in (18, 34):
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE = {on} with MODEL.RESNETS.DEPTH ="
            f" {cfg.MODEL.RESNETS.DEPTH}: detectron2 puts deformable convs in bottleneck blocks"
            " only (depth 50, 101, 152)"
        )


def _finish(cfg: CfgNode, backbone: Backbone) -> Backbone:
    if use_detectron2_deform_conv(cfg):
        impl, n = (
            "detectron2",
            sum(isinstance(m, (DeformConv, ModulatedDeformConv)) for m in backbone.modules()),
        )
    else:
        impl, n = "torchvision", convert_deform_convs(backbone)
    kind = "modulated (DCNv2)" if cfg.MODEL.RESNETS.DEFORM_MODULATED else "DCNv1"
    logger.info(
        f"Deformable backbone: {n} {kind} convs ({impl} op), stages"
        f" {list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)}, {cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS}"
        " offset group(s)"
    )
    return backbone


@BACKBONE_REGISTRY.register()
def build_deformable_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ``build_resnet_backbone`` with deformable convs that run without its C++ ops."""
    _check_deform_cfg(cfg)
    return _finish(cfg, build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_deformable_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ``build_resnet_fpn_backbone`` with deformable convs that run without its C++
    ops (the paper's Deformv2 baseline: DCNv2 in res3-res5 under FPN)."""
    _check_deform_cfg(cfg)
    return _finish(cfg, build_resnet_fpn_backbone(cfg, input_shape))
