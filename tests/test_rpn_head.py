"""LeakyRPNHead (elixir_d2/modeling/rpn_head.py): built from the config, values and gradients
by hand where every hidden unit is off."""
import pytest
import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead

from elixir_d2 import load_config
from elixir_d2.modeling.rpn_head import LeakyRPNHead


def _heads():
    """Both heads on one 1-channel level, one anchor, hidden conv all -1 (so a ones input drives
    every hidden pre-activation negative: -9 at the centre of a 3 x 3 image), readout weight 2."""
    out = []
    for head in (StandardRPNHead(in_channels=1, num_anchors=1),
                 LeakyRPNHead(in_channels=1, num_anchors=1, negative_slope=0.1)):
        with torch.no_grad():
            head.conv.weight.fill_(-1.0)
            head.conv.bias.zero_()
            head.objectness_logits.weight.fill_(2.0)
            head.objectness_logits.bias.zero_()
        out.append(head)
    return out


def test_where_every_hidden_unit_is_off_only_the_leaky_head_has_a_gradient():
    x = torch.ones(1, 1, 3, 3)
    for head, slope in zip(_heads(), (0.0, 0.1)):
        logits, _ = head([x])
        centre = logits[0][0, 0, 1, 1]
        # Pre-activation at the centre: 9 inputs x -1; the readout multiplies by 2.
        assert centre.item() == pytest.approx(2.0 * slope * -9.0)
        centre.backward()
        # d centre / d hidden bias = readout weight x activation slope there.
        assert head.conv.bias.grad.item() == pytest.approx(2.0 * slope)


def test_built_from_the_config_for_rpn_and_trpn():
    for name in ("fpn", "elixirnet"):
        cfg = load_config(f"configs/quickstart/{name}.yaml",
                          ["MODEL.RPN.HEAD_NAME", "LeakyRPNHead", "MODEL.RPN.LEAKY_SLOPE", "0.2"])
        head = build_model(cfg).proposal_generator.rpn_head
        assert isinstance(head, LeakyRPNHead)
        assert isinstance(head.conv.activation, nn.LeakyReLU)
        assert head.conv.activation.negative_slope == 0.2
        # StandardRPNHead's init of its hidden conv still applies.
        bias, weight = head.conv.bias.detach(), head.conv.weight.detach()
        assert float(bias.abs().max()) == 0.0 and float(weight.std()) < 0.02


@pytest.mark.parametrize("slope", [0.0, 1.0, -0.1])
def test_slope_outside_zero_one_is_refused(slope):
    with pytest.raises(ValueError, match="LEAKY_SLOPE"):
        LeakyRPNHead(in_channels=1, num_anchors=1, negative_slope=slope)
