"""Tests of the ALB candidate ops, mixed ops and blocks (elixir_d2/modeling/alb/{ops,cells}.py).

References are computed here independently: output sizes from ceil(H / s), region_nonlocal from
its formula written out with the module's weights, FactorizedReduce from DARTS' padded-shift
formulation, receptive fields from input gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from elixir_d2.modeling.alb.cells import GenotypeBlock, MixedOp, SearchBlock
from elixir_d2.modeling.alb.genotype import count_structures, edge_inputs, num_edges
from elixir_d2.modeling.alb.ops import FactorizedReduce, RegionNonLocal, build_op, make_norm
from elixir_d2.modeling.alb.spaces import DARTS_OPS, ELIXIR_OPS, get_search_space
from elixir_d2.modeling.hooks import capture_outputs

torch.set_num_threads(1)


def test_search_spaces_match_design():
    assert ELIXIR_OPS == [
        "none",
        "skip_connect",
        "avg_pool_3x3",
        "conv_1x1",
        "asym_conv_3",
        "dil_conv_3x3_r2",
        "dil_conv_3x3_r3",
        "dw_conv_7x7",
        "region_nonlocal",
    ]
    assert sorted(DARTS_OPS) == sorted(
        [
            "none",
            "max_pool_3x3",
            "avg_pool_3x3",
            "skip_connect",
            "sep_conv_3x3",
            "sep_conv_5x5",
            "dil_conv_3x3",
            "dil_conv_5x5",
        ]
    )
    with pytest.raises(ValueError, match="nasnet"):
        get_search_space("nasnet")


def test_search_space_size_is_the_papers():
    # Branch b chooses 2 of its 2 + b inputs: C(2,2) C(3,2) C(4,2) C(5,2) = 1 * 3 * 6 * 10.
    assert num_edges(4) == 2 + 3 + 4 + 5 == 14
    assert count_structures(8, 4) == 180 * 8**8
    assert abs(count_structures(8, 4) - 3.0e9) < 0.05e9


@pytest.mark.parametrize("name", sorted(set(ELIXIR_OPS + DARTS_OPS)))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("c_in,c_out", [(8, 8), (8, 12)])
@pytest.mark.parametrize("size", [7, 4])
def test_op_output_shape(name, stride, c_in, c_out, size):
    op = build_op(name, c_in, c_out, stride, norm="GN")
    x = torch.randn(5, c_in, size, size + 1)  # non-square: height and width handled apart
    y = op(x, [2, 3])
    assert y.shape == (5, c_out, math.ceil(size / stride), math.ceil((size + 1) / stride))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_norm_choices(norm):
    y = build_op("dil_conv_3x3_r2", 16, 16, 2, norm=norm)(torch.randn(4, 16, 7, 7), [4])
    assert y.shape == (4, 16, 4, 4)
    gn = make_norm("GN", 48)
    assert 48 % gn.num_groups == 0 and 48 // gn.num_groups >= 4


def test_bad_op_arguments():
    with pytest.raises(ValueError, match="sep_conv_7x7"):
        build_op("sep_conv_7x7", 8, 8)
    with pytest.raises(ValueError, match="stride"):
        build_op("conv_1x1", 8, 8, stride=3)
    with pytest.raises(ValueError, match="LN"):
        build_op("conv_1x1", 8, 8, norm="LN")


def test_none_is_zero_and_skip_is_identity():
    x = torch.randn(3, 8, 7, 7)
    z = build_op("none", 8, 6, 2)(x, [3])
    assert z.shape == (3, 6, 4, 4) and (z == 0).all()
    assert torch.equal(build_op("skip_connect", 8, 8, 1)(x, [3]), x)


def test_factorized_reduce_matches_darts_padded_shift():
    fr = FactorizedReduce(6, 10, norm="")
    x = torch.randn(2, 6, 7, 7)
    xr = F.relu(x)
    # DARTS: conv_b(stride 2) on x shifted by one pixel; the far edge zero-padded for odd sizes.
    shifted = F.pad(xr, (0, 1, 0, 1))[:, :, 1:, 1:]
    ref = torch.cat(
        [
            F.conv2d(xr, fr.conv_a.weight, fr.conv_a.bias, stride=2),
            F.conv2d(shifted, fr.conv_b.weight, fr.conv_b.bias, stride=2),
        ],
        dim=1,
    )
    torch.testing.assert_close(fr(x), ref)


def test_avg_pool_ignores_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = build_op("avg_pool_3x3", 1, 1, 1)(x, [1])
    assert y[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert y[0, 0, 1, 1].item() == pytest.approx(sum([0, 1, 2, 4, 5, 6, 8, 9, 10]) / 9)


def _receptive_offsets(name, size=15):
    """Input offsets (dy, dx) that reach the centre output pixel (via input gradients)."""
    op = build_op(name, 2, 2, 1, norm="")
    for p in op.parameters():  # positive weights: no accidental cancellation of a path
        p.data.uniform_(0.5, 1.0)
    x = torch.rand(1, 2, size, size, requires_grad=True)  # > 0: ReLU passes everything
    op(x, [1])[0, :, size // 2, size // 2].sum().backward()
    nz = (x.grad.abs().sum(1)[0] > 0).nonzero() - size // 2
    return {(int(a), int(b)) for a, b in nz}


@pytest.mark.parametrize(
    "name,offsets",
    [
        ("conv_1x1", [0]),
        ("dil_conv_3x3_r2", [-2, 0, 2]),
        ("dil_conv_3x3_r3", [-3, 0, 3]),
        ("asym_conv_3", [-1, 0, 1]),
        ("dw_conv_7x7", list(range(-3, 4))),
    ],
)
def test_receptive_fields(name, offsets):
    assert _receptive_offsets(name) == {(a, b) for a in offsets for b in offsets}


def _nonlocal_reference(op: RegionNonLocal, x, counts):
    """The formula of docs/design.md (Region non-local operator), written out per image with the
    module's weights."""
    outs = []
    for xi in x.split(counts):
        m = xi.mean(dim=(2, 3))
        phi = torch.relu(m @ op.phi.weight.t() + op.phi.bias)
        psi = torch.relu(m @ op.psi.weight.t() + op.psi.bias)
        e = torch.exp(phi @ phi.t())
        e = e / e.sum(dim=1, keepdim=True)
        y = torch.relu(e @ psi @ op.w.weight.t())
        outs.append(y @ op.g.weight.t() + op.g.bias)
    return torch.cat(outs)


def test_region_nonlocal_matches_formula_and_keeps_relations():
    torch.manual_seed(0)
    op = RegionNonLocal(8, 6, stride=2)
    x = torch.randn(7, 8, 7, 7)
    with capture_outputs(op.graph) as graphs:
        y = op(x, [3, 4])
    (relations,) = graphs
    ref = _nonlocal_reference(op, x, [3, 4])
    assert y.shape == (7, 6, 4, 4)
    # Broadcast over the output resolution: every pixel holds g(Y) of its RoI.
    torch.testing.assert_close(y, ref[:, :, None, None].expand(7, 6, 4, 4))
    # One N_i x N_i row-stochastic matrix per image: O(N_i^2) memory, never N x N.
    assert [tuple(e.shape) for e in relations] == [(3, 3), (4, 4)]
    for e in relations:
        torch.testing.assert_close(e.sum(dim=1), torch.ones(len(e)))


def test_region_nonlocal_never_mixes_images():
    torch.manual_seed(0)
    op = RegionNonLocal(8, 8, stride=1)
    a, b = torch.randn(4, 8, 5, 5), torch.randn(6, 8, 5, 5)
    y = op(torch.cat([a, b]), [4, 6])
    # Permute image 2's proposals (and change them): image 1's output must not move.
    perm = torch.tensor([5, 3, 0, 1, 4, 2])
    y2 = op(torch.cat([a, b[perm] * 3.0 + 1.0]), [4, 6])
    torch.testing.assert_close(y2[:4], y[:4], rtol=0, atol=0)
    # Permuting an image's own proposals permutes its outputs (equivariance).
    y3 = op(torch.cat([a, b[perm]]), [4, 6])
    torch.testing.assert_close(y3[4:], y[4:][perm])
    # Treating both images as one would relate them: the outputs differ.
    assert not torch.allclose(op(torch.cat([a, b]), [10])[:4], y[:4])


def test_region_nonlocal_counts_checked():
    op = RegionNonLocal(4, 4, 1)
    x = torch.randn(5, 4, 3, 3)
    with pytest.raises(ValueError, match="num_per_image"):
        op(x, None)
    with pytest.raises(ValueError, match="sum to the 5"):
        op(x, [2, 2])
    with capture_outputs(op.graph) as graphs:
        y = op(x, [0, 5])  # an image without proposals is fine
    assert y.shape == (5, 4, 3, 3) and [e.shape[0] for e in graphs[0]] == [0, 5]


def test_region_nonlocal_relations_are_the_softmax_affinity_by_hand():
    """A tiny input whose E is computed by hand: phi = identity FC (+ ReLU) of the RoI means,
    E_ij = exp(phi_i . phi_j) / sum_k exp(phi_i . phi_k). The graph's output, read by the hook,
    is that E, in the autograd graph (RTM trains through it); the op keeps nothing."""
    op = RegionNonLocal(2, 4, stride=1)  # hidden = 2
    with torch.no_grad():
        op.phi.weight.copy_(torch.eye(2))
        op.phi.bias.zero_()
    # Constant maps: the spatial mean of each RoI is its value. RoI 2 has a negative entry
    # (zeroed by the ReLU); image 2 has one RoI only.
    means = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -3.0], [0.5, 0.5]])
    x = means[:, :, None, None].expand(4, 2, 3, 3).clone()
    with capture_outputs(op.graph) as graphs:
        op(x, [3, 1])
    ((e1, e2),) = graphs
    phi = [[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]
    dots = [[sum(a * b for a, b in zip(pi, pj)) for pj in phi] for pi in phi]  # 1 0 1; 0 4 0; ...
    by_hand = [[math.exp(d) / sum(math.exp(v) for v in row) for d in row] for row in dots]
    torch.testing.assert_close(e1, torch.tensor(by_hand), rtol=0, atol=1e-6)
    assert e1[0].tolist() == pytest.approx(
        [math.e / (2 * math.e + 1), 1 / (2 * math.e + 1), math.e / (2 * math.e + 1)]
    )
    torch.testing.assert_close(e2, torch.ones(1, 1))
    assert e1.requires_grad and e1.grad_fn is not None
    assert not [k for k in vars(op) if k.startswith("last_")]


def test_mixed_op_is_softmax_weighted_sum():
    torch.manual_seed(0)
    mixed = MixedOp(ELIXIR_OPS, 8, 8, 2, norm="GN")
    alpha = torch.randn(len(ELIXIR_OPS))
    w = torch.softmax(alpha, dim=0)
    assert w.sum().item() == pytest.approx(1.0)
    x = torch.randn(5, 8, 7, 7)
    ref = sum(float(wk) * op(x, [2, 3]) for wk, op in zip(w, mixed.ops))
    torch.testing.assert_close(mixed(x, w, [2, 3]), ref)
    # One-hot weights select exactly one op.
    k = ELIXIR_OPS.index("dw_conv_7x7")
    torch.testing.assert_close(
        mixed(x, F.one_hot(torch.tensor(k), 9).float(), [2, 3]), mixed.ops[k](x, [2, 3])
    )
    with pytest.raises(ValueError, match="weights"):
        mixed(x, torch.ones(3), [2, 3])


def test_search_block_shapes_and_edges():
    assert edge_inputs(4)[:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    s = torch.randn(4, 16, 7, 7)
    normal = SearchBlock(ELIXIR_OPS, 16, 16, 4, reduction=False, reduction_prev=False)
    w = torch.softmax(torch.randn(14, 9), dim=-1)
    out = normal(s, s, w, [1, 3])
    assert out.shape == (4, 16, 7, 7) and len(normal.mixed_ops) == 14
    # ALB_r after ALB: D doubles (8), edges from the block inputs have stride 2.
    reduce = SearchBlock(ELIXIR_OPS, 16, 16, 8, reduction=True, reduction_prev=False)
    r = reduce(s, out, w, [1, 3])
    assert r.shape == (4, 32, 4, 4)
    strides = [m.ops[ELIXIR_OPS.index("conv_1x1")].convs[0].stride for m in reduce.mixed_ops]
    assert strides == [(2, 2) if j < 2 else (1, 1) for _, j in edge_inputs(4)]
    # Second ALB_r: its first input (7x7) is reduced to match the second (4x4).
    reduce2 = SearchBlock(ELIXIR_OPS, 16, 32, 16, reduction=True, reduction_prev=True)
    assert reduce2(out, r, w, [1, 3]).shape == (4, 64, 2, 2)


def test_genotype_block_wiring():
    # Identity ops only: the output is a sum of the preprocessed inputs fixed by the pairs
    # (index 0, 1 = block inputs, 2 + j = branch j).
    pairs = [
        ("skip_connect", 1),
        ("skip_connect", 1),
        ("skip_connect", 2),
        ("skip_connect", 0),
        ("skip_connect", 3),
        ("skip_connect", 2),
        ("skip_connect", 0),
        ("skip_connect", 4),
    ]
    block = GenotypeBlock(pairs, 6, 6, 3, reduction=False, reduction_prev=False, norm="")
    s0, s1 = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    p0, p1 = block.pre0(s0), block.pre1(s1)
    b0 = 2 * p1
    b1 = b0 + p0
    b2 = b1 + b0
    b3 = p0 + b2
    torch.testing.assert_close(block(s0, s1, [1, 1]), torch.cat([b0, b1, b2, b3], dim=1))


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def _bn_formula(bn, y):
    shape = (1, -1, 1, 1)
    return (y - bn.running_mean.view(shape)) / torch.sqrt(
        bn.running_var.view(shape) + bn.eps
    ) * bn.weight.view(shape) + bn.bias.view(shape)


def test_eval_batchnorm_folding_keeps_values():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 7, 7)
    op = build_op("dil_conv_3x3_r3", 8, 6, 2, norm="BN")
    _randomise_bn(op)
    op.eval()
    conv = op.convs[0]
    ref = _bn_formula(op.norm, F.conv2d(F.relu(x), conv.weight, None, 2, 3, 3))
    torch.testing.assert_close(op(x, [4]), ref, rtol=1e-4, atol=1e-5)
    fr = FactorizedReduce(8, 10, norm="BN")
    _randomise_bn(fr)
    fr.eval()
    xr = F.relu(x)
    shifted = F.pad(xr, (0, 1, 0, 1))[:, :, 1:, 1:]
    raw = torch.cat(
        [F.conv2d(xr, fr.conv_a.weight, stride=2), F.conv2d(shifted, fr.conv_b.weight, stride=2)],
        dim=1,
    )
    torch.testing.assert_close(fr(x), _bn_formula(fr.norm, raw), rtol=1e-4, atol=1e-5)
    # Training mode: batch statistics, so the output is normalised per channel.
    op.train()
    y = op(x, [4])
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), op.norm.bias.detach(), atol=1e-5, rtol=0)
