"""Tests of the forward-hook captures (elixir_d2/modeling/hooks.py, capture.py): what a model
computed on the way to its detections, read within a ``with`` block, never left on modules."""

import os

import pytest
import torch

from detectron2.modeling import build_model

from elixir_d2 import load_config
from elixir_d2.modeling.alb.genotype import load_genotype
from elixir_d2.modeling.capture import TRPNConfidence, capture
from elixir_d2.modeling.hooks import capture_outputs

from genotype_helpers import tiny_alb_head

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE3 = os.path.join(REPO, "configs", "genotypes", "figure3.yaml")
SMALL = ["MODEL.RPN.POST_NMS_TOPK_TEST", "30", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def _model(config):
    torch.manual_seed(0)
    cfg = load_config(
        os.path.join(REPO, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *SMALL]
    )
    return build_model(cfg).eval()


def _images(n=2, size=64):
    torch.manual_seed(1)
    return [
        {"image": torch.rand(3, size, size) * 255, "height": size, "width": size} for _ in range(n)
    ]


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _head(genotype=FIGURE3):
    return tiny_alb_head(load_genotype(genotype))


def test_asking_for_what_the_model_lacks_is_a_clear_error_at_entry(tmp_path):
    fpn = _model("configs/quickstart/fpn.yaml")  # RPN and the 2-fc box head
    with pytest.raises(ValueError, match="the model has no TRPN proposal generator"):
        with capture(fpn, "trpn_confidence"):
            pytest.fail("the block must not run")
    with pytest.raises(ValueError, match="no box head with region_nonlocal relations"):
        with capture(fpn, "relations"):
            pytest.fail("the block must not run")
    with pytest.raises(ValueError, match="unknown 'conf_maps'.*trpn_confidence"):
        with capture(fpn, "conf_maps"):
            pass
    with open(FIGURE3, encoding="utf-8") as f:  # the same layout with no region_nonlocal edge
        (tmp_path / "none.yaml").write_text(
            f.read().replace("region_nonlocal", "conv_1x1"), encoding="utf-8"
        )
    with pytest.raises(ValueError, match="ALBHead has no region_nonlocal edge"):
        with capture(_head(str(tmp_path / "none.yaml")), "relations"):
            pass
    assert _hooks(fpn) == 0


def test_captures_of_a_model_match_its_outputs_one_record_per_forward():
    model = _model("configs/quickstart/elixirnet.yaml")  # TRPN + ALB head
    # ``returned``: what the box head returns, (features, per-image E), per forward.
    with (
        torch.no_grad(),
        capture(model, "relations") as relations,
        capture(model, "proposals") as proposals,
        capture(model, "trpn_confidence") as confidence,
        capture_outputs(model.roi_heads.box_head) as returned,
    ):
        model(_images())
        model(_images(1))
    assert len(relations) == len(proposals) == len(confidence) == len(returned) == 2
    for rels, props, out in zip(relations, proposals, returned):
        assert [tuple(e.shape) for e in rels] == [(len(p), len(p)) for p in props]
        for e, e_head in zip(rels, out[1]):
            assert torch.equal(e, e_head) and not e.requires_grad
            torch.testing.assert_close(e.sum(dim=1), torch.ones(len(e)))
    conf = confidence[0]
    assert isinstance(conf, TRPNConfidence) and list(conf.conf_maps) == [
        "p2",
        "p3",
        "p4",
        "p5",
        "p6",
    ]
    assert conf.conf_maps["p2"].shape == (2, 16, 16) and conf.eps["p2"].shape == (2,)
    assert _hooks(model) == 0


def test_hooks_are_removed_when_the_block_raises():
    head = _head()
    op = head.relation_op()
    with pytest.raises(RuntimeError, match="inside"):
        with capture(head, "relations"):
            assert len(op.graph._forward_hooks) == 1
            raise RuntimeError("inside the block")
    assert _hooks(head) == 0
    x = torch.randn(5, 16, 7, 7)
    _, rel = head(x, [2, 3])  # the head's own capture of E, also scoped to its forward
    assert [tuple(e.shape) for e in rel] == [(2, 2), (3, 3)] and _hooks(head) == 0
