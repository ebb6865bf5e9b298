"""Mixed precision (issue 16.4): region_nonlocal's relation softmax, MixedOp's weighted sum and
RTM's transfer stay float32 under autocast, and the search steps run under it.

Reduced precision is exercised on the CPU with bfloat16 (and float16 where this torch's CPU
autocast has it) and, when CUDA is present, with float16 / bfloat16 on the GPU. References are
computed independently in float64. The inputs are large enough that the same computations done
in the autocast dtype overflow (float16) or lose the logits' differences (bfloat16); each test
checks that the naive computation does fail on them, so it tests what it claims.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from elixir_d2.modeling.alb.cells import MixedOp
from elixir_d2.modeling.alb.ops import RegionNonLocal, region_relations
from elixir_d2.modeling.hooks import capture_outputs
from elixir_d2.modeling.rtm import RelationTransferModule

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_float16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


def _cases():
    cases = [("cpu", torch.bfloat16)]
    if _cpu_float16_autocast():
        cases.append(("cpu", torch.float16))
    if torch.cuda.is_available():
        cases.append(("cuda", torch.float16))
        if torch.cuda.is_bf16_supported():
            cases.append(("cuda", torch.bfloat16))
    return cases


CASES = _cases()
IDS = [f"{d}-{str(t).split('.')[-1]}" for d, t in CASES]
COUNTS = [4, 6]


def _assert_stochastic_rows(e: torch.Tensor) -> None:
    assert e.dtype == torch.float32 and torch.isfinite(e).all()
    torch.testing.assert_close(e.sum(dim=1), torch.ones(len(e), device=e.device), atol=1e-5, rtol=0)


def _large_phi(device, k=16):
    # Rows close to one vector of norm^2 = 78400 > float16's 65504: logits phi_i phi_j^T
    # overflow float16, and their O(1) differences are below bfloat16's spacing (512) there.
    g = torch.Generator().manual_seed(0)
    return (torch.full((k,), 70.0) + 0.02 * torch.randn(sum(COUNTS), k, generator=g)).to(device)


def _reference_relations(phi: torch.Tensor):
    return [torch.softmax(p @ p.t(), dim=1) for p in phi.double().cpu().split(COUNTS)]


# ------------------------------------------------------------------------- region_nonlocal
@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("phi_in_autocast_dtype", [False, True])
def test_region_relations_large_logits_under_autocast(device, dtype, phi_in_autocast_dtype):
    phi = _large_phi(device)
    if phi_in_autocast_dtype:  # as an FC under autocast would hand it over
        phi = phi.to(dtype)
    with torch.autocast(device_type=device, dtype=dtype):
        relations = region_relations(phi, COUNTS)
        naive = [torch.softmax(p @ p.t(), dim=1) for p in phi.split(COUNTS)]
    reference = _reference_relations(phi)
    for e, ref, bad in zip(relations, reference, naive):
        _assert_stochastic_rows(e)
        # float32 logits of ~8e4 carry ~1e-2 of absolute rounding, hence the tolerance.
        torch.testing.assert_close(e.double().cpu(), ref, atol=1e-2, rtol=0)
        # (phi rounded to bfloat16 has lost its differences already: nothing left to get wrong)
        if not (phi_in_autocast_dtype and dtype == torch.bfloat16):
            assert not torch.isfinite(bad).all() or (bad.double().cpu() - ref).abs().max() > 0.1
    # Autocast changes nothing: the same values as the float32 computation without it.
    plain = region_relations(phi, COUNTS)
    assert all(torch.equal(a, b) for a, b in zip(relations, plain))


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_region_nonlocal_op_under_autocast(device, dtype):
    torch.manual_seed(0)
    op = RegionNonLocal(16, 16, stride=2).to(device)
    with torch.no_grad():  # phi of ~100 per entry: logits of ~8e4
        op.phi.weight.uniform_(0.0, 0.2)
    # RoI features of magnitude ~60, in the autocast dtype as a conv before the op gives them.
    x = (60 + 0.5 * torch.randn(sum(COUNTS), 16, 7, 7)).to(device=device, dtype=dtype)
    with torch.autocast(device_type=device, dtype=dtype), capture_outputs(op.graph) as graphs:
        y = op(x, COUNTS)
    assert y.dtype == dtype and y.shape == (10, 16, 4, 4) and torch.isfinite(y).all()
    # Independent float64 reference of equation 2, from the module's weights.
    w = {k: v.detach().double().cpu() for k, v in op.state_dict().items()}
    pooled = x.double().cpu().mean(dim=(2, 3))
    phi = F.relu(pooled @ w["phi.weight"].t() + w["phi.bias"])
    psi = F.relu(pooled @ w["psi.weight"].t() + w["psi.bias"])
    assert (phi @ phi.t()).max() > 65504  # the logits do overflow float16
    rows = []
    for e, ref_phi, ref_psi in zip(graphs[0], phi.split(COUNTS), psi.split(COUNTS)):
        _assert_stochastic_rows(e)
        ref_e = torch.softmax(ref_phi @ ref_phi.t(), dim=1)
        torch.testing.assert_close(e.double().cpu(), ref_e, atol=1e-2, rtol=0)
        rows.append(F.relu((ref_e @ ref_psi) @ w["w.weight"].t()))
    ref_y = torch.cat(rows) @ w["g.weight"].t() + w["g.bias"]
    scale = ref_y.abs().max()
    torch.testing.assert_close(
        y[:, :, 0, 0].double().cpu() / scale, ref_y / scale, atol=2e-2, rtol=0
    )
    y.float().sum().backward()
    grads = [p.grad for p in op.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- MixedOp
@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_mixed_op_sum_and_alpha_gradient_in_float32(device, dtype):
    torch.manual_seed(0)
    mixed = MixedOp(["none", "skip_connect", "avg_pool_3x3"], 16, 16, 1, norm="GN").to(device)
    alpha = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3], device=device))
    # Sum of the skip op's output: 8 * 16 * 49 * 60 ~ 3.8e5, beyond float16.
    x = (60 + torch.rand(8, 16, 7, 7)).to(device=device, dtype=dtype)
    with torch.autocast(device_type=device, dtype=dtype):
        weights = torch.softmax(alpha, dim=-1)  # as ALBSearchHead computes them
        out = mixed(x, weights, [8])
        op_sums = torch.stack([op(x, [8]).double().sum() for op in mixed.ops]).cpu()
    assert weights.dtype == torch.float32 and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert op_sums.max() > 65504
    w = torch.softmax(alpha.detach().double().cpu(), dim=0)
    expected = w * (op_sums - (w * op_sums).sum())  # softmax Jacobian^T applied to d out / d w
    assert torch.isfinite(alpha.grad).all()
    torch.testing.assert_close(alpha.grad.double().cpu(), expected, rtol=1e-3, atol=1e-2)


# --------------------------------------------------------------------------------- RTM
def _predictor(channels, num_classes, device):
    head = FastRCNNOutputLayers(
        ShapeSpec(channels=channels),
        num_classes=num_classes,
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
    )
    return head.to(device)


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_rtm_transfer_and_forward_under_autocast(device, dtype):
    torch.manual_seed(0)
    p, emb, types = 32, 8, 3
    rtm = RelationTransferModule(
        feature_dim=p,
        embed_dim=emb,
        predictor=_predictor(p + emb, types, device),
        relation_channels=16,
    ).to(device)
    binary = _predictor(p, 1, device)
    with torch.no_grad():
        binary.cls_score.weight.normal_()
    # Binary logits of ~1e5: beyond float16 in the naive Gamma = softmax(f M^T).
    f = (2e4 * torch.randn(sum(COUNTS), p)).to(device=device, dtype=dtype)
    pooled = (60 + 5 * torch.randn(sum(COUNTS), 16, 7, 7)).to(device=device, dtype=dtype)
    with torch.autocast(device_type=device, dtype=dtype):
        relations = rtm.own_relations(pooled, COUNTS)
        f_e = rtm.transfer(f, binary, relations)
        scores, deltas = rtm(f, binary, relations)
    for e in relations:
        _assert_stochastic_rows(e)
    assert f_e.dtype == dtype and torch.isfinite(f_e).all()
    assert torch.isfinite(scores).all() and torch.isfinite(deltas).all()
    # float64 reference: f_E = E softmax(f W^T + b) [W | b] W_E, image by image.
    w = binary.cls_score.weight.detach().double().cpu()
    b = binary.cls_score.bias.detach().double().cpu()
    f64 = f.double().cpu()
    assert (f64 @ w.t()).abs().max() > 65504
    m = torch.cat([w, b[:, None]], dim=1)
    node = torch.softmax(f64 @ w.t() + b, dim=1) @ m @ rtm.w_e.detach().double().cpu()
    ref = torch.cat([e.double().cpu() @ n for e, n in zip(relations, node.split(COUNTS))])
    scale = ref.abs().max()
    torch.testing.assert_close(f_e.double().cpu() / scale, ref / scale, atol=1e-2, rtol=0)
    (scores.float().sum() + deltas.float().sum()).backward()
    # RTM's own parameters train through the float32 path. (The predictor's weight gradient,
    # a sum of features of 2e4 in half precision, may overflow: the GradScaler's business.)
    for param in (rtm.w_e, rtm.phi.weight, rtm.phi.bias):
        assert param.grad is not None and torch.isfinite(param.grad).all()


def test_depthwise_convs_compute_in_float32_under_autocast():
    from elixir_d2.modeling.alb.ops import DepthwiseConv2d, build_op
    from elixir_d2.modeling.box_head import ALBStem

    torch.manual_seed(0)
    conv = DepthwiseConv2d(8, 8, 7, stride=2, padding=3, groups=8, bias=True)
    x = torch.randn(5, 8, 7, 7).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    ref = F.conv2d(
        x.detach().float(), conv.weight.detach(), conv.bias.detach(), stride=2, padding=3, groups=8
    )
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # float32 on the same inputs, exactly
    y.sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # an ordinary conv outside autocast
    xf = torch.randn(5, 8, 7, 7)
    torch.testing.assert_close(
        conv(xf), F.conv2d(xf, conv.weight, conv.bias, stride=2, padding=3, groups=8)
    )
    # the depthwise convs of the ALB ops and of the head's stem are these; dense ones are not
    kinds = {type(m) for m in build_op("dw_conv_7x7", 8, 8, 2, "BN").modules()}
    assert DepthwiseConv2d in kinds
    dense = build_op("conv_1x1", 8, 16, 1, "BN")
    assert all(type(m) is not DepthwiseConv2d for m in dense.modules())
    assert isinstance(ALBStem("sep_conv_3x3", 32, 16, "BN").conv, DepthwiseConv2d)
