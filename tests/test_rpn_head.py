"""LeakyRPNHead and NormRPNHead (elixir_d2/modeling/rpn_head.py): built from the config, values
and gradients by hand."""

import pytest
import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead

from elixir_d2 import load_config
from elixir_d2.modeling.rpn_head import LeakyRPNHead, NormRPNHead


def _heads():
    """Both heads on one 1-channel level, one anchor, hidden conv all -1 (so a ones input drives
    every hidden pre-activation negative: -9 at the centre of a 3 x 3 image), readout weight 2."""
    out = []
    for head in (
        StandardRPNHead(in_channels=1, num_anchors=1),
        LeakyRPNHead(in_channels=1, num_anchors=1, negative_slope=0.1),
    ):
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
        cfg = load_config(
            f"configs/quickstart/{name}.yaml",
            ["MODEL.RPN.HEAD_NAME", "LeakyRPNHead", "MODEL.RPN.LEAKY_SLOPE", "0.2"],
        )
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


def _norm_head(num_levels: int = 2, per_level: bool = True) -> NormRPNHead:
    """A 1-channel NormRPNHead whose conv passes its input through (centre tap 1) and whose
    objectness readout is the hidden unit itself, so the logits are ReLU(BN(x))."""
    head = NormRPNHead(
        in_channels=1, num_anchors=1, norm="BN", num_levels=num_levels, per_level=per_level
    )
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.weight[0, 0, 1, 1] = 1.0
        head.objectness_logits.weight.fill_(1.0)
        head.objectness_logits.bias.zero_()
    return head


def test_norm_head_normalises_each_level_by_its_own_statistics():
    head = _norm_head()
    small = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    large = 10 * small + 5  # same pattern, another scale and offset
    logits, _ = head([small, large])
    # Mean 2.5, biased variance 1.25: (x - 2.5) / sqrt(1.25 + 1e-5), then ReLU.
    expected = torch.tensor([0.0, 0.0, 0.5, 1.5]) / (1.25 + 1e-5) ** 0.5
    torch.testing.assert_close(logits[0].flatten(), expected)
    # The other level: mean 30, biased variance 125, from its own batch statistics.
    torch.testing.assert_close(
        logits[1].flatten(), torch.tensor([0.0, 0.0, 5.0, 15.0]) / (125 + 1e-5) ** 0.5
    )
    # Running statistics, momentum 0.1 from (0, 1): unbiased variances 5/3 and 500/3.
    mean0, var0 = head.norms[0].running_mean.item(), head.norms[0].running_var.item()
    mean1, var1 = head.norms[1].running_mean.item(), head.norms[1].running_var.item()
    assert (mean0, var0) == pytest.approx((0.25, 0.9 + 0.1 * 5 / 3))
    assert (mean1, var1) == pytest.approx((3.0, 0.9 + 0.1 * 500 / 3))

    # At test each level reads its own running statistics.
    head.eval()
    logits, _ = head([small, large])
    torch.testing.assert_close(
        logits[1].flatten(), torch.relu((large.flatten() - 3.0) / (var1 + 1e-5) ** 0.5)
    )


def test_shared_norm_head_blends_the_levels_running_statistics():
    head = _norm_head(per_level=False)
    small = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    logits, _ = head([small, 10 * small + 5])
    # In training each level still has its own batch statistics.
    torch.testing.assert_close(
        logits[1].flatten(), torch.tensor([0.0, 0.0, 5.0, 15.0]) / (125 + 1e-5) ** 0.5
    )
    # One running mean, updated by both levels in turn: 0.9 * (0.1 * 2.5) + 0.1 * 30.
    assert head.norms[0].running_mean.item() == pytest.approx(0.9 * 0.25 + 3.0)


@pytest.mark.parametrize("per_level,count", [("False", 1), ("True", 5)])
def test_norm_head_built_from_the_config_for_rpn_and_trpn(per_level, count):
    for name in ("fpn", "elixirnet"):
        cfg = load_config(
            f"configs/quickstart/{name}.yaml",
            ["MODEL.RPN.HEAD_NAME", "NormRPNHead", "MODEL.RPN.HEAD_NORM_PER_LEVEL", per_level],
        )
        head = build_model(cfg).proposal_generator.rpn_head
        assert isinstance(head, NormRPNHead)
        # Shared, or one per FPN level (P2-P6); over the 64 channels of the quickstart FPN.
        assert len(head.norms) == count
        assert all(isinstance(n, nn.BatchNorm2d) and n.num_features == 64 for n in head.norms)


def test_norm_head_refuses_a_bad_setup():
    with pytest.raises(ValueError, match="HEAD_NORM"):
        NormRPNHead(in_channels=1, num_anchors=1, norm="", num_levels=1)
    with pytest.raises(ValueError, match="CONV_DIMS"):
        NormRPNHead(in_channels=1, num_anchors=1, norm="BN", num_levels=1, conv_dims=[4, 4])
    with pytest.raises(ValueError, match="built for 2 feature levels, got 1"):
        _norm_head(2)([torch.ones(1, 1, 2, 2)])


def test_norm_head_trains_on_a_one_value_level_with_the_running_statistics():
    # P6 of a tiny input: one image, a 1 x 1 map, so BatchNorm has no batch statistics there.
    head = _norm_head(num_levels=2, per_level=False)
    with torch.no_grad():
        head.norms[0].running_mean.fill_(1.0)
        head.norms[0].running_var.fill_(4.0)
    small = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    logits, _ = head([small, torch.full((1, 1, 1, 1), 7.0)])
    # The 2 x 2 level first: its batch statistics, and it updates the shared running ones to
    # mean 0.9 * 1 + 0.1 * 2.5 = 1.15, variance 0.9 * 4 + 0.1 * 5/3 (unbiased) = 3.7667.
    torch.testing.assert_close(
        logits[0].flatten(), torch.tensor([0.0, 0.0, 0.5, 1.5]) / (1.25 + 1e-5) ** 0.5
    )
    var = 0.9 * 4.0 + 0.1 * 5.0 / 3.0
    # The 1 x 1 level reads those and leaves them as they are.
    assert logits[1].item() == pytest.approx((7.0 - 1.15) / (var + 1e-5) ** 0.5)
    assert head.norms[0].running_mean.item() == pytest.approx(1.15)
    assert head.norms[0].running_var.item() == pytest.approx(var)
