"""Tests of ALBHead / ALBSearchHead (box_head.py), ElixirROIHeads (roi_heads.py) and the ALB
configs: layout of docs/design.md (Auto-lesion Block), per-image relations, search parameters,
end-to-end forward."""

import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from elixir_d2 import load_config
from elixir_d2.modeling.alb.genotype import load_genotype
from elixir_d2.modeling.alb.ops import RegionNonLocal
from elixir_d2.modeling.alb.spaces import ELIXIR_OPS
from elixir_d2.modeling.box_head import ALBHead, ALBSearchHead, ALBStem
from elixir_d2.modeling.hooks import capture_outputs
from elixir_d2.modeling.roi_heads import ElixirROIHeads

from genotype_helpers import tiny_alb_head

torch.set_num_threads(1)
ROOT = os.path.join(os.path.dirname(__file__), "..")
DEFAULT = os.path.join(ROOT, "configs", "genotypes", "figure3.yaml")


def _cfg(path, *opts):
    return load_config(
        os.path.join(ROOT, path), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts]
    )


def _block_shapes(head, x, counts):
    shapes = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
        for b in head.blocks
    ]
    out, _ = head(x, counts)
    for h in hooks:
        h.remove()
    return out, shapes


def test_alb_head_layout_of_the_paper():
    g = load_genotype(DEFAULT)
    head = ALBHead(ShapeSpec(channels=256, height=7, width=7), genotype=g, norm="BN").eval()
    assert head.output_shape.channels == 512
    with torch.no_grad():
        out, shapes = _block_shapes(head, torch.randn(6, 256, 7, 7), [2, 4])
    # D = 32: ALB 128 @ 7x7, ALB_r 256 @ 4x4, ALB_r 512 @ 2x2, global pool -> P = 512.
    assert shapes == [(128, 7, 7), (256, 4, 4), (512, 2, 2)]
    assert out.shape == (6, 512)
    # Stem: 256 -> 128, with the 3x3 spatial extent (depthwise-separable by default).
    assert head.stem.conv.kernel_size == (3, 3) and head.stem.conv.out_channels == 128
    dense = ALBHead(ShapeSpec(channels=256, height=7, width=7), genotype=g, stem="conv_3x3")
    assert dense.stem.conv.in_channels == 256 and dense.stem.conv.kernel_size == (3, 3)


@pytest.mark.parametrize("search", [False, True])
def test_head_rectifies_each_block_output_once_same_values_as_darts_preprocessing(search):
    # Reference: DARTS' cells, where each block's two preprocessing convs apply their own ReLU
    # to the raw outputs of the previous blocks, and the head pools the last raw output. The
    # head rectifies each output once and hands blocks rectified inputs: values and gradients
    # must be those of the reference.
    import copy

    torch.manual_seed(0)
    shape = ShapeSpec(channels=8, height=7, width=7)
    if search:
        head = ALBSearchHead(shape, channels=2, stem_channels=8, norm="BN")
    else:
        head = ALBHead(
            shape, genotype=load_genotype(DEFAULT), channels=2, stem_channels=8, norm="BN"
        )
    ref = copy.deepcopy(head)
    for block in ref.blocks:
        block.pre0.relu = block.pre1.relu = True
    x = torch.randn(5, 8, 7, 7)
    counts = [2, 3]
    x_head, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = head(x_head, counts)
    s0 = s1 = ref.stem(x_ref)
    for i, block in enumerate(ref.blocks):
        if search:
            kind = ref.block_types[i]
            alpha = ref.alpha_reduce if kind == "reduce" else ref.alpha_normal
            s0, s1 = s1, block(s0, s1, F.softmax(alpha, dim=-1), counts)
        else:
            s0, s1 = s1, block(s0, s1, counts)
    expected = s1.mean(dim=(2, 3))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x_head.grad, x_ref.grad, rtol=1e-4, atol=1e-6)


def test_mixed_op_sum_keeps_channels_last():
    # The none op's zeros and region_nonlocal's broadcast output are not channels_last; the
    # mixed op's sum must still be (the head's convs are fast on that layout only).
    from elixir_d2.modeling.alb.cells import MixedOp

    mixed = MixedOp(ELIXIR_OPS, 4, 4, 1, norm="BN")
    x = torch.randn(3, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.softmax(torch.randn(len(ELIXIR_OPS)), dim=0)
    y = mixed(x, w, [1, 2])
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = sum(wk * op(x, [1, 2]) for wk, op in zip(w, mixed.ops))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_stem_values():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 7, 7)
    sep = ALBStem("sep_conv_3x3", 16, 8, norm="").eval()
    ref = F.conv2d(
        F.conv2d(x, sep.pointwise.weight), sep.conv.weight, sep.conv.bias, padding=1, groups=8
    )
    y = sep(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dense = ALBStem("conv_3x3", 16, 8, norm="").eval()
    torch.testing.assert_close(
        dense(x), F.conv2d(x, dense.conv.weight, dense.conv.bias, padding=1), rtol=1e-4, atol=1e-5
    )


def test_stem_pointwise_before_roi_align_gives_the_same_roi_features():
    """RoIAlign(1x1 conv(maps)) == 1x1 conv(RoIAlign(maps)), checked against torchvision's
    roi_align directly, with boxes reaching past the map border (zero samples)."""
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    stem = ALBStem("sep_conv_3x3", 16, 8, norm="BN").eval()
    stem.norm.running_mean.uniform_(-1, 1)
    stem.norm.running_var.uniform_(0.5, 2.0)
    maps = torch.randn(2, 16, 12, 10)
    rois = torch.tensor(
        [
            [0, 1.0, 2.0, 9.0, 11.0],
            [1, -3.0, -2.0, 5.0, 4.0],
            [1, 6.0, 7.0, 14.0, 15.5],
            [0, 3.3, 3.3, 3.9, 4.1],
        ]
    )
    pool = dict(output_size=7, spatial_scale=0.5, sampling_ratio=0, aligned=True)
    after = F.conv2d(roi_align(maps, rois, **pool), stem.pointwise.weight)
    before = roi_align(stem.pointwise_maps([maps])[0], rois, **pool)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            stem(before, pointwise_before_pooling=True),
            stem(roi_align(maps, rois, **pool)),
            rtol=1e-4,
            atol=1e-5,
        )
    dense = ALBStem("conv_3x3", 16, 8, norm="")
    assert dense.pointwise is None
    with pytest.raises(ValueError, match="no pointwise conv"):
        dense.pointwise_maps([maps])
    with pytest.raises(ValueError, match="needs the sep_conv_3x3 stem"):
        dense(torch.randn(2, 16, 7, 7), pointwise_before_pooling=True)


def test_roi_heads_pointwise_before_pooling_same_outputs_and_losses(tmp_path):
    def build(flag, *opts):
        cfg = _cfg(
            "configs/quickstart/elixirnet.yaml",
            "MODEL.ALB.GENOTYPE",
            DEFAULT,
            "MODEL.ALB.NORM",
            "GN",
            "MODEL.ALB.STEM_CHANNELS",
            "32",
            "MODEL.ALB.POINTWISE_BEFORE_POOLING",
            str(flag),
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "30",
            "MODEL.TRPN.THRESHOLD",
            "0.0",
            *opts,
        )
        torch.manual_seed(0)
        return build_model(cfg)

    pre, post = build(True), build(False)
    post.load_state_dict(pre.state_dict())
    assert pre.roi_heads.box_head.pointwise_before_pooling
    assert not post.roi_heads.box_head.pointwise_before_pooling
    seen = []
    pre.roi_heads.box_pooler.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    pre.eval(), post.eval()
    with torch.no_grad():
        a, b = pre(_images())[0]["instances"], post(_images())[0]["instances"]
    # RoIAlign pooled the stem's 32 channels instead of the FPN's 64.
    assert pre.backbone.output_shape()["p2"].channels == 64
    assert seen[0][1] == pre.roi_heads.box_head.stem.conv.in_channels == 32
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    pre.train(), post.train()
    losses = []
    for m in (pre, post):
        torch.manual_seed(1)  # same proposal sampling
        with EventStorage(0):
            losses.append(m(_images()))
    for k in losses[0]:
        torch.testing.assert_close(losses[0][k], losses[1][k], rtol=1e-4, atol=1e-5)
    # Not with the dense stem (nothing to move) nor when RTM pools its own relations from the
    # 256-channel RoI features (a head without region_nonlocal).
    assert not build(True, "MODEL.ALB.STEM", "conv_3x3").roi_heads.box_head.pointwise_before_pooling
    no_relations = tmp_path / "no_nonlocal.yaml"
    with open(DEFAULT, encoding="utf-8") as f:
        no_relations.write_text(f.read().replace("region_nonlocal", "conv_1x1"), encoding="utf-8")
    rtm = build(
        True,
        "MODEL.ALB.GENOTYPE",
        str(no_relations),
        "MODEL.RTM.ENABLED",
        "True",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "8",
    )
    assert rtm.roi_heads.rtm.phi.in_features == 64 and rtm.roi_heads.rtm.has_own_relations
    assert not rtm.roi_heads.box_head.pointwise_before_pooling
    with EventStorage(0):
        assert all(torch.isfinite(v) for v in rtm(_images()).values())


def test_alb_head_relations_are_per_image_and_never_mix():
    torch.manual_seed(0)
    head = tiny_alb_head(load_genotype(DEFAULT))  # GN: per-RoI statistics only
    a, b = torch.randn(3, 16, 7, 7), torch.randn(5, 16, 7, 7)
    first = [m for m in head.blocks[0].modules() if isinstance(m, RegionNonLocal)][0]
    assert head.relation_op() is first
    with capture_outputs(first.graph) as graphs:
        y, rel = head(torch.cat([a, b]), [3, 5])
    assert [tuple(e.shape) for e in rel] == [(3, 3), (5, 5)]
    assert all(e is f for e, f in zip(rel, graphs[0]))  # E of the ALB's region_nonlocal
    perm = torch.tensor([4, 2, 0, 3, 1])
    y2, _ = head(torch.cat([a, 2.0 * b[perm] - 1.0]), [3, 5])
    torch.testing.assert_close(y2[:3], y[:3])
    with pytest.raises(ValueError, match="ElixirROIHeads"):
        head(torch.cat([a, b]))


def test_search_head_parameters_and_genotype():
    torch.manual_seed(0)
    head = ALBSearchHead(ShapeSpec(channels=8, height=7, width=7), channels=2, stem_channels=8)
    arch = head.arch_parameters()
    assert [tuple(p.shape) for p in arch] == [(14, len(ELIXIR_OPS))] * 2
    weights = head.weight_parameters()
    ids = {id(p) for p in weights}
    assert not ids & {id(p) for p in arch}
    assert len(ids) + 2 == len(list(head.parameters()))
    out, _ = head(torch.randn(5, 8, 7, 7), [2, 3])
    assert out.shape == (5, head.output_shape.channels) == (5, 32)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in arch)
    # Strong alphas on chosen (edge, op) pairs: the head's genotype follows them.
    with torch.no_grad():
        head.alpha_normal.zero_()
        head.alpha_reduce.zero_()
        for row, op in [
            (0, "dil_conv_3x3_r2"),
            (1, "region_nonlocal"),
            (3, "conv_1x1"),
            (4, "skip_connect"),
            (5, "dw_conv_7x7"),
            (8, "avg_pool_3x3"),
            (10, "asym_conv_3"),
            (13, "dil_conv_3x3_r3"),
        ]:
            head.alpha_normal[row, ELIXIR_OPS.index(op)] = 5.0
            head.alpha_reduce[row, ELIXIR_OPS.index("conv_1x1")] = 5.0
    g = head.genotype()
    assert g.normal == (
        ("dil_conv_3x3_r2", 0),
        ("region_nonlocal", 1),
        ("conv_1x1", 1),
        ("skip_connect", 2),
        ("dw_conv_7x7", 0),
        ("avg_pool_3x3", 3),
        ("asym_conv_3", 1),
        ("dil_conv_3x3_r3", 4),
    )
    assert [i for _, i in g.reduce] == [0, 1, 1, 2, 0, 3, 1, 4]


def test_configs_build_the_heads(tmp_path):
    cfg = _cfg("configs/quickstart/alb.yaml", "MODEL.ALB.GENOTYPE", DEFAULT)
    model = build_model(cfg)
    assert isinstance(model.roi_heads, ElixirROIHeads)
    assert isinstance(model.roi_heads.box_head, ALBHead)
    assert model.roi_heads.box_head.output_shape.channels == 256  # D = 16 -> P = 16 D
    assert model.roi_heads.box_predictor.cls_score.in_features == 256
    search = _cfg("configs/quickstart/alb.yaml", "MODEL.ROI_BOX_HEAD.NAME", "ALBSearchHead")
    assert isinstance(build_model(search).roi_heads.box_head, ALBSearchHead)
    for opts, pattern in [
        (["MODEL.ALB.SEARCH_SPACE", "darts"], "space 'elixir' but MODEL.ALB.SEARCH_SPACE"),
        (["MODEL.ALB.BRANCHES", 3], "4 branches but MODEL.ALB.BRANCHES is 3"),
        (["MODEL.ALB.STEM", "conv_5x5"], "MODEL.ALB.STEM 'conv_5x5'"),
        (["MODEL.ALB.BLOCKS", ["normal", "reduction"]], "MODEL.ALB.BLOCKS"),
        (["MODEL.ALB.GENOTYPE", ""], "MODEL.ALB.GENOTYPE is empty"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            build_model(_cfg("configs/quickstart/alb.yaml", *opts))


def _images(n=2, size=64):
    torch.manual_seed(0)
    ims = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[8.0 + 4 * i, 10.0, 30.0, 28.0 + 2 * i]]))
        inst.gt_classes = torch.tensor([0])
        ims.append(
            {
                "image": torch.rand(3, size, size) * 255,
                "instances": inst,
                "height": size,
                "width": size,
            }
        )
    return ims


@pytest.mark.parametrize(
    "config,head",
    [
        ("configs/quickstart/elixirnet.yaml", ALBHead),
        ("configs/quickstart/fpn.yaml", None),  # a head without counts still works
    ],
)
def test_elixir_roi_heads_pass_proposal_counts(config, head):
    cfg = _cfg(
        config,
        "MODEL.ROI_HEADS.NAME",
        "ElixirROIHeads",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "40",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "30",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "24",
    )
    model = build_model(cfg)
    seen = []
    relations = []
    model.roi_heads.box_head.register_forward_hook(lambda m, args, out: seen.append(args))
    model.roi_heads.box_head.register_forward_hook(
        lambda m, args, out: relations.append(out[1] if isinstance(out, tuple) else None)
    )
    sampled = []
    orig = model.roi_heads.label_and_sample_proposals

    def spy(proposals, targets):
        out = orig(proposals, targets)
        sampled.append([len(p) for p in out])
        return out

    model.roi_heads.label_and_sample_proposals = spy
    with EventStorage(0):
        losses = model(_images())
    assert all(torch.isfinite(v) for v in losses.values())
    if head is None:
        assert len(seen[0]) == 1  # FastRCNNConvFCHead gets the features only
        return
    assert isinstance(model.roi_heads.box_head, head)
    counts = seen[0][1]
    assert counts == sampled[0] and sum(counts) == seen[0][0].shape[0]
    assert [e.shape[0] for e in relations[0]] == counts
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(_images())
    assert len(out) == 2 and all("instances" in o for o in out)
    assert [e.shape[0] for e in relations[-1]] == seen[-1][1]


def test_elixirnet_r50_parameter_target():
    fpn = build_model(_cfg("configs/fpn_R_50_deeplesion.yaml"))
    elixir_cfg = _cfg("configs/elixirnet_R_50_FPN_deeplesion.yaml")
    assert elixir_cfg.MODEL.PROPOSAL_GENERATOR.NAME == "TRPN"
    assert elixir_cfg.MODEL.ROI_HEADS.NAME == "ElixirROIHeads"
    elixir = build_model(elixir_cfg)
    assert elixir.roi_heads.box_head.output_shape.channels == 512
    n_fpn = sum(p.numel() for p in fpn.parameters())
    n_elixir = sum(p.numel() for p in elixir.parameters())
    # Issue 5 target (paper: 28.4M vs 41.4M); FPN's 2-fc head alone is 256*49*1024 + 1024^2.
    assert abs(n_fpn - 41.3e6) < 0.5e6
    assert n_elixir / n_fpn <= 0.70
    alb = _cfg("configs/alb_fpn_R_50_deeplesion.yaml")
    assert alb.MODEL.PROPOSAL_GENERATOR.NAME == "RPN" and alb.MODEL.ROI_BOX_HEAD.NAME == "ALBHead"
