"""Baseline backbones: the torchvision deformable conv, the Deformv2 / FRCNN-C4 configs."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ModulatedDeformConv, ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import (
    BottleneckBlock,
    DeformBottleneckBlock,
    build_resnet_backbone,
)
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from elixir_d2 import load_config
from elixir_d2.modeling import backbone as bb
from elixir_d2.modeling.backbone import (
    TorchvisionDeformBottleneckBlock,
    TorchvisionDeformConv,
    build_deformable_resnet_backbone,
    convert_deform_convs,
    use_detectron2_deform_conv,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _cfg(name, *opts):
    return load_config(
        os.path.join(CONFIGS, name), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts]
    )


# ------------------------------------------------------------------ independent reference
def _bilinear(img, y, x):
    """Bilinear sample of img (C, H, W) at (y, x): corners outside the image count as zero and a
    point at or beyond one pixel outside gives zero (the DCN kernels' rule)."""
    _, h, w = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return img.new_zeros(img.shape[0])
    y0, x0 = math.floor(y), math.floor(x)
    out = img.new_zeros(img.shape[0])
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * img[:, yy, xx]
    return out


def _reference_deform_conv(x, offset, weight, mask=None, stride=1, padding=0, dilation=1, dg=1):
    """Deformable conv by explicit loops. Offset layout of the DCN papers' kernels: for offset
    group g and kernel point k = i * kw + j, channel g*2K + 2k is dy and g*2K + 2k + 1 is dx."""
    x, offset, weight = x.double(), offset.double(), weight.double()
    n_img, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    k_pts = kh * kw
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    cpg = c // dg
    out = torch.zeros(n_img, o, ho, wo, dtype=torch.float64)
    for n in range(n_img):
        for oy in range(ho):
            for ox in range(wo):
                for g in range(dg):
                    chans = slice(g * cpg, (g + 1) * cpg)
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = offset[n, g * 2 * k_pts + 2 * k, oy, ox].item()
                            dx = offset[n, g * 2 * k_pts + 2 * k + 1, oy, ox].item()
                            m = 1.0 if mask is None else mask[n, g * k_pts + k, oy, ox].item()
                            py = oy * stride - padding + i * dilation + dy
                            px = ox * stride - padding + j * dilation + dx
                            v = _bilinear(x[n, chans], py, px)
                            out[n, :, oy, ox] += m * (weight[:, chans, i, j] @ v)
    return out


# ------------------------------------------------------------------ the conv layer
@pytest.mark.parametrize(
    "stride,padding,dilation,groups,dg",
    [(1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 2, 2, 1, 2), (1, 1, 1, 2, 2)],
)
def test_zero_offsets_unit_mask_equal_plain_conv(stride, padding, dilation, groups, dg):
    torch.manual_seed(0)
    conv = TorchvisionDeformConv(
        4,
        6,
        3,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        deformable_groups=dg,
        bias=True,
    )
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, 7, 7)
    expected = F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation, groups)
    hw = expected.shape[-2:]
    offset = torch.zeros(2, 2 * dg * 9, *hw)
    mask = torch.ones(2, dg * 9, *hw)
    torch.testing.assert_close(conv(x, offset, mask), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(conv(x, offset), expected, atol=1e-5, rtol=0)  # DCNv1 call


def test_integer_offset_equals_shifted_conv():
    # Every sampling point moved by (dy, dx) = (0, 1): each 3x3 window of the zero-padded image
    # slides one column right, i.e. a plain conv over the image padded 0 left / 2 right.
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    conv = TorchvisionDeformConv(1, 1, 3, padding=1)
    offset = torch.zeros(1, 18, 4, 4)
    offset[:, 1::2] = 1.0  # dx channels
    expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), conv.weight)
    torch.testing.assert_close(conv(x, offset), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(conv(x, offset, torch.ones(1, 9, 4, 4)), expected, atol=1e-5, rtol=0)
    # By hand at the top-left output: window rows -1..1, columns 0..2 of x.
    w = conv.weight.detach()[0, 0]
    by_hand = sum(w[i, j] * x[0, 0, i - 1, j] for i in (1, 2) for j in range(3))
    torch.testing.assert_close(conv(x, offset)[0, 0, 0, 0], by_hand, atol=1e-5, rtol=0)

    # (dy, dx) = (1, 0): windows slide one row down; a mask of 0.25 scales the result.
    offset = torch.zeros(1, 18, 4, 4)
    offset[:, 0::2] = 1.0  # dy channels
    got = conv(x, offset, torch.full((1, 9, 4, 4), 0.25))
    expected = 0.25 * F.conv2d(F.pad(x, (1, 1, 0, 2)), conv.weight)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_half_pixel_offset_averages_neighbours():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    conv = TorchvisionDeformConv(1, 1, 3, padding=1)
    offset = torch.zeros(1, 18, 4, 4)
    offset[:, 1::2] = 0.5
    # Bilinear at half a column: the mean of the windows at shifts 0 and 1.
    expected = (
        F.conv2d(F.pad(x, (1, 1, 1, 1)), conv.weight)
        + F.conv2d(F.pad(x, (0, 2, 1, 1)), conv.weight)
    ) / 2
    torch.testing.assert_close(conv(x, offset), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("modulated", [True, False])
def test_random_offsets_match_loop_reference(modulated):
    torch.manual_seed(1)
    conv = TorchvisionDeformConv(4, 3, 3, stride=2, padding=1, deformable_groups=2)
    x = torch.randn(1, 4, 6, 6)
    offset = torch.empty(1, 36, 3, 3).uniform_(-2.0, 2.0)
    mask = torch.rand(1, 18, 3, 3) if modulated else None
    weight = conv.weight.detach()
    expected = _reference_deform_conv(x, offset, weight, mask, stride=2, padding=1, dg=2)
    torch.testing.assert_close(conv(x, offset, mask).double(), expected, atol=1e-5, rtol=0)


def test_bad_offset_or_mask_shape_is_a_clear_error():
    conv = TorchvisionDeformConv(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="offset"):
        conv(x, torch.zeros(1, 9, 5, 5))
    with pytest.raises(ValueError, match="mask"):
        conv(x, torch.zeros(1, 18, 5, 5), torch.ones(1, 18, 5, 5))
    with pytest.raises(ValueError, match="deformable_groups"):
        TorchvisionDeformConv(6, 6, 3, deformable_groups=4)


# ------------------------------------------------------------------ the block
def test_block_keys_match_detectron2_and_init_is_half_plain_conv():
    torch.manual_seed(2)
    kw = dict(bottleneck_channels=4, stride=2, norm="", deform_modulated=True)
    d2_block = DeformBottleneckBlock(8, 16, **kw)
    block = TorchvisionDeformBottleneckBlock(8, 16, **kw)
    assert list(block.state_dict()) == list(d2_block.state_dict())
    block.load_state_dict(d2_block.state_dict())  # a detectron2 checkpoint transfers as is

    # Offset conv starts at zero: offsets 0 and mask sigmoid(0) = 1/2, i.e. the plain block
    # whose 3x3 conv weight is halved.
    plain = BottleneckBlock(8, 16, bottleneck_channels=4, stride=2, norm="")
    sd = {k: v for k, v in block.state_dict().items() if not k.startswith("conv2_offset")}
    sd["conv2.weight"] = sd["conv2.weight"] * 0.5
    plain.load_state_dict(sd)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(block(x), plain(x), atol=1e-5, rtol=0)

    # The offset branch learns: gradients reach conv2_offset from the zero start.
    block(x).square().sum().backward()
    assert block.conv2_offset.weight.grad.abs().sum() > 0


def _resnet_cfg(*opts):
    return _cfg(
        "deformv2_R_50_FPN_deeplesion.yaml",
        "MODEL.RESNETS.OUT_FEATURES",
        '["res2","res3","res4","res5"]',
        *opts,
    )


def test_deformable_backbone_is_detectron2_resnet_with_swapped_convs():
    cfg = _resnet_cfg()
    torch.manual_seed(3)
    ref = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    torch.manual_seed(3)
    net = build_deformable_resnet_backbone(cfg, ShapeSpec(channels=3))
    # Same keys and, built from the same seed, the same initial values as detectron2's R-50.
    ref_sd, sd = ref.state_dict(), net.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    swapped = [n for n, m in net.named_modules() if isinstance(m, TorchvisionDeformConv)]
    # res3-res5 of R-50 have 4 + 6 + 3 bottlenecks; res2 has none.
    assert len(swapped) == 13
    assert all(n.endswith(".conv2") and not n.startswith("res2") for n in swapped)
    assert not any(isinstance(m, ModulatedDeformConv) for m in net.modules())
    assert convert_deform_convs(net) == 0


def test_impl_choice(monkeypatch):
    monkeypatch.setattr(
        bb,
        "compiled_ops",
        lambda: {"modulated_deform_conv_forward": True, "deform_conv_forward": False},
    )
    assert use_detectron2_deform_conv(_resnet_cfg("MODEL.DEVICE", "cuda"))
    assert not use_detectron2_deform_conv(_resnet_cfg())  # CPU: no detectron2 kernel
    assert not use_detectron2_deform_conv(
        _resnet_cfg("MODEL.DEVICE", "cuda", "MODEL.RESNETS.DEFORM_MODULATED", False)
    )
    assert not use_detectron2_deform_conv(
        _resnet_cfg("MODEL.DEVICE", "cuda", "MODEL.RESNETS.DEFORM_IMPL", "torchvision")
    )
    with pytest.raises(ValueError, match="DEFORM_IMPL"):
        use_detectron2_deform_conv(_resnet_cfg("MODEL.RESNETS.DEFORM_IMPL", "cudnn"))
    # With the compiled op, "auto" on CUDA keeps detectron2's layers untouched.
    cfg = _resnet_cfg("MODEL.DEVICE", "cuda")
    net = build_deformable_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert sum(isinstance(m, ModulatedDeformConv) for m in net.modules()) == 13


def test_deform_on_basic_block_resnet_is_refused():
    cfg = _cfg("quickstart/fpn.yaml", "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False,True,True,True]")
    with pytest.raises(ValueError, match="DEPTH = 18"):
        build_deformable_resnet_backbone(cfg, ShapeSpec(channels=3))


# ------------------------------------------------------------------ the configs
def _train_step(model, size=64):
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 24.0, 36.0, 38.0]]))
    inst.gt_classes = torch.tensor([0])
    image = torch.rand(3, size, size) * 255
    batch = [{"image": image, "instances": inst, "height": size, "width": size}]
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    return losses


@pytest.mark.parametrize("name", ["quickstart/faster_rcnn_C4.yaml", "quickstart/deformv2.yaml"])
def test_quickstart_baselines_train_step(name):
    torch.manual_seed(4)
    model = build_model(_cfg(name))
    losses = _train_step(model)
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} <= set(losses)
    offsets = [m for n, m in model.named_modules() if n.endswith("conv2_offset")]
    if "deformv2" in name:
        assert len(offsets) == 13 and any(m.weight.grad.abs().sum() > 0 for m in offsets)
        assert sum(isinstance(m, TorchvisionDeformConv) for m in model.modules()) == 13
    else:
        assert not offsets
        assert type(model.roi_heads).__name__ == "Res5ROIHeads"
        assert model.backbone.output_shape().keys() == {"res4"}


def test_deform_offset_lr_factor_scales_only_offset_layers_through_the_schedule():
    from detectron2.solver import build_lr_scheduler

    from elixir_d2.trainer import build_optimizer

    cfg = _cfg(
        "quickstart/deformv2.yaml",
        "SOLVER.DEFORM_OFFSET_LR_FACTOR",
        0.1,
        "SOLVER.BASE_LR",
        0.02,
        "SOLVER.WARMUP_ITERS",
        10,
        "SOLVER.STEPS",
        (20,),
    )
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lr_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    # 13 DCNv2 blocks in res3-res5, each with one offset/mask conv (weight and bias).
    offset_names = [n for n in names if ".conv2_offset." in n]
    assert len(offset_names) == 26
    assert len(lr_of) == len(names)  # every trainable parameter is in exactly one group
    for it in range(25):
        # detectron2's linear warmup from WARMUP_FACTOR (1e-3) over 10 iterations, x0.1 at 20.
        warm = 0.001 + 0.999 * it / 10 if it < 10 else 1.0
        base = 0.02 * warm * (0.1 if it >= 20 else 1.0)
        for n, p in names.items():
            want = base * (0.1 if ".conv2_offset." in n else 1.0)
            assert lr_of[id(p)]["lr"] == pytest.approx(want, rel=1e-6), (it, n)
        optimizer.step()
        scheduler.step()

    bad = _cfg("quickstart/deformv2.yaml", "SOLVER.DEFORM_OFFSET_LR_FACTOR", 0.0)
    with pytest.raises(ValueError, match="DEFORM_OFFSET_LR_FACTOR"):
        build_optimizer(bad, model)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_full_r50_baselines_build_train_and_param_counts():
    torch.manual_seed(5)
    fpn = build_model(_cfg("fpn_R_50_deeplesion.yaml"))
    deform = build_model(_cfg("deformv2_R_50_FPN_deeplesion.yaml"))
    # Few RoIs: res5 runs on each of them in C4.
    c4_cfg = _cfg("faster_rcnn_R_50_C4_deeplesion.yaml", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 8)
    c4 = build_model(c4_cfg)
    for model in (fpn, deform, c4):
        _train_step(model)
    # Deformv2 adds one 3x3 offset/mask conv (27 outputs, with bias) per res3-res5 bottleneck:
    # 4 blocks at 128, 6 at 256 and 3 at 512 bottleneck channels.
    extra = sum(n * (c * 9 * 27 + 27) for n, c in ((4, 128), (6, 256), (3, 512)))
    assert extra == 871263
    assert _n_params(deform) - _n_params(fpn) == extra
    assert 0 < extra < 2_000_000  # paper Table 1: 41.4M -> 42.2M (+0.8M)
    # Paper Table 1 sizes (M): FRCNN 33.0, FPN 41.4, Deformv2 42.2 (one decimal).
    for model, paper in ((c4, 33.0), (fpn, 41.4), (deform, 42.2)):
        assert abs(_n_params(model) / 1e6 - paper) < 0.15
    # C4: one anchor level of 15 anchors and res5 in the head, 2-class outputs.
    assert c4.proposal_generator.rpn_head.objectness_logits.out_channels == 15
    assert c4.roi_heads.box_predictor.cls_score.out_features == 2


def test_kits19_configs_are_the_deeplesion_models_on_kits19():
    for kits, deeplesion in (
        ("fpn_R_50_kits19.yaml", "fpn_R_50_deeplesion.yaml"),
        ("deformv2_R_50_FPN_kits19.yaml", "deformv2_R_50_FPN_deeplesion.yaml"),
    ):
        k, d = _cfg(kits), _cfg(deeplesion)
        assert k.DATASETS.TRAIN == ("kits19_train",) and k.DATASETS.TEST == ("kits19_test",)
        assert k.MODEL == d.MODEL and k.INPUT == d.INPUT
        # 12 epochs of 13,147 slices at batch 8, lr drops after epochs 8 and 11.
        assert k.SOLVER.IMS_PER_BATCH == 8
        assert k.SOLVER.MAX_ITER == 12 * 13147 // 8
        assert tuple(k.SOLVER.STEPS) == (8 * 13147 // 8, 11 * 13147 // 8)
        assert k.OUTPUT_DIR != d.OUTPUT_DIR
