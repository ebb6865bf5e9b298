"""An RPN head whose hidden conv keeps a gradient where it is off: a leaky ReLU.

detectron2's :class:`StandardRPNHead` reads objectness and box deltas from ReLU(conv3x3(x)).
Trained from scratch on CT slices, where a few lesions face thousands of background anchors, the
objectness weights all turn negative: the head learns to score background, and a lesion scores
highest where every hidden unit is off. There the ReLU passes no gradient, so neither loss can turn
the units back on, and the box deltas at the lesion are the delta conv's bias alone.
docs/design.md, "Decisions where the paper is silent" / RPN head, has the measurements.
"""
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead

__all__ = ["LeakyRPNHead"]


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
        return Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1,
                      activation=nn.LeakyReLU(self.negative_slope))
