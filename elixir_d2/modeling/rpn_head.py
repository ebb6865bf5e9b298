"""RPN heads for short from-scratch training: a leaky ReLU, or a norm before the ReLU.

detectron2's :class:`StandardRPNHead` reads objectness and box deltas from ReLU(conv3x3(x)), every
conv started from N(0, 0.01^2). Trained from scratch for a few hundred iterations on CT slices,
where a few lesions face thousands of background anchors, its hidden conv and delta conv stay
close to that start, and the objectness weights all turn negative: the head scores background, and
a lesion scores highest where every hidden unit is off. There the ReLU passes no gradient, and
the box deltas at the lesion are the delta conv's bias alone.

- :class:`LeakyRPNHead` keeps a gradient where a unit is off.
- :class:`NormRPNHead` normalises the hidden conv's output before the ReLU: whatever the conv's
  scale, each hidden unit is centred and of unit spread over the batch (BatchNorm in training), so
  it is on at some locations and off at others.

docs/design.md, "Decisions where the paper is silent" / RPN head, has the measurements.
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead

__all__ = ["LeakyRPNHead", "NormRPNHead"]


@RPN_HEAD_REGISTRY.register()
class LeakyRPNHead(StandardRPNHead):
    """:class:`StandardRPNHead` with ``LeakyReLU(negative_slope)`` after each hidden conv."""

    @configurable
    def __init__(self, *, negative_slope: float = 0.1, **kwargs):
        if not 0.0 < negative_slope < 1.0:
            raise ValueError(f"MODEL.RPN.LEAKY_SLOPE={negative_slope} must be in (0, 1)")
        # Read by _get_rpn_conv, which StandardRPNHead.__init__ calls.
        self.negative_slope = float(negative_slope)
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["negative_slope"] = cfg.MODEL.RPN.LEAKY_SLOPE
        return ret

    def _get_rpn_conv(self, in_channels: int, out_channels: int) -> nn.Module:
        # StandardRPNHead.__init__ initialises it as its own hidden conv.
        return Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=1,
            padding=1,
            activation=nn.LeakyReLU(self.negative_slope),
        )


@RPN_HEAD_REGISTRY.register()
class NormRPNHead(StandardRPNHead):
    """:class:`StandardRPNHead` with a normalisation (``MODEL.RPN.HEAD_NORM``) between its hidden
    conv and the ReLU. The conv is shared across feature levels as in detectron2; the norm is too,
    or one per level with ``MODEL.RPN.HEAD_NORM_PER_LEVEL`` (BatchNorm's running statistics of a
    level then serve that level at test)."""

    @configurable
    def __init__(self, *, norm: str = "BN", num_levels: int = 1, per_level: bool = False, **kwargs):
        if not norm:
            raise ValueError("NormRPNHead needs MODEL.RPN.HEAD_NORM (e.g. 'BN'), got ''")
        if len(kwargs.get("conv_dims", (-1,))) != 1:
            raise ValueError(
                f"NormRPNHead has one hidden conv; MODEL.RPN.CONV_DIMS="
                f"{kwargs['conv_dims']} asks for more"
            )
        super().__init__(**kwargs)
        channels = self.conv.out_channels
        self.num_levels = num_levels
        self.norms = nn.ModuleList(
            get_norm(norm, channels) for _ in range(num_levels if per_level else 1)
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["norm"] = cfg.MODEL.RPN.HEAD_NORM
        ret["num_levels"] = len(input_shape)
        ret["per_level"] = cfg.MODEL.RPN.HEAD_NORM_PER_LEVEL
        return ret

    def _get_rpn_conv(self, in_channels: int, out_channels: int) -> nn.Module:
        return Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, features: List[torch.Tensor]):
        if len(features) != self.num_levels:
            raise ValueError(
                f"NormRPNHead was built for {self.num_levels} feature levels, got {len(features)}"
            )
        logits, deltas = [], []
        for level, x in enumerate(features):
            norm = self.norms[level if len(self.norms) > 1 else 0]
            t = F.relu(_normalise(norm, self.conv(x)))
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def _normalise(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, except for a BatchNorm in training given one value per channel (a 1 x 1 map of
    one image, e.g. P6 of an input under 128 px), which has no batch statistics: that level is
    normalised with the running ones, left as they are."""
    one_value = x.shape[0] * x.shape[2] * x.shape[3] == 1
    if one_value and norm.training and isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(
            x,
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            training=False,
            eps=norm.eps,
        )
    return norm(x)
