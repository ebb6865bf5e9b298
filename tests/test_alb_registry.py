"""The ALB extension API (elixir_d2/modeling/alb/registry.py): what register_alb_op and
register_search_space refuse, what check_alb_op catches, that unregistering restores the tables,
and that errors list the registered spaces instead of a fixed pair. The recipe that uses the API
end to end is tests/test_extending.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elixir_d2.modeling.alb import (
    SEARCH_SPACES,
    ALBOp,
    Genotype,
    GenotypeError,
    alb_op_names,
    build_op,
    check_alb_op,
    get_search_space,
    make_norm,
    register_alb_op,
    register_search_space,
    unregister_alb_op,
    unregister_search_space,
)
from elixir_d2.modeling.alb.genotype import genotype_from_yaml

OP, SPACE = "registry_test_conv", "registry_test_space"
# The 14 built-in op names, written out: the registry adds to them, never replaces one.
BUILT_IN = sorted(
    [
        "none",
        "skip_connect",
        "avg_pool_3x3",
        "max_pool_3x3",
        "conv_1x1",
        "asym_conv_3",
        "dil_conv_3x3_r2",
        "dil_conv_3x3_r3",
        "dw_conv_7x7",
        "region_nonlocal",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    ]
)


class Conv(ALBOp):
    """ReLU -> 3x3 conv (padding ``pad``) -> norm; ``pad`` 0 breaks the shape contract."""

    pad = 1

    def __init__(self, c_in, c_out, stride, norm, affine):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=self.pad, bias=not norm)
        self.norm = make_norm(norm, c_out, affine)

    def forward(self, x, num_per_image=None):
        return self.norm(self.conv(F.relu(x)))


class NoPadConv(Conv):
    pad = 0  # 7x7 -> 5x5: not what a head needs


@pytest.fixture
def registered():
    """OP and SPACE registered for one test, removed after it whatever it did."""
    register_alb_op(OP, Conv)
    register_search_space(SPACE, ["none", "skip_connect", OP])
    yield
    if SPACE in SEARCH_SPACES:
        unregister_search_space(SPACE)
    if OP in alb_op_names():
        unregister_alb_op(OP)


def test_register_and_unregister_restore_the_tables(registered):
    assert alb_op_names() == sorted(BUILT_IN + [OP])
    assert get_search_space(SPACE) == ["none", "skip_connect", OP]
    g = genotype_from_yaml(
        f"{{space: {SPACE}, branches: 1, normal: [[{OP}, 0], [skip_connect, 1]]"
        f", reduce: [[{OP}, 1], [{OP}, 0]]}}"
    )
    assert g.space == SPACE and type(build_op(OP, 4, 4)) is Conv
    with pytest.raises(ValueError, match=f"used by the search space.*{SPACE}"):
        unregister_alb_op(OP)  # the space would name an op that no longer exists
    unregister_search_space(SPACE)
    unregister_alb_op(OP)
    assert alb_op_names() == BUILT_IN and sorted(SEARCH_SPACES) == ["darts", "elixir"]
    with pytest.raises(ValueError, match=f"Unknown ALB op '{OP}'"):
        build_op(OP, 4, 4)
    with pytest.raises(GenotypeError, match=f"unknown search space '{SPACE}'"):
        g.validate()
    register_alb_op(OP, Conv)  # the name is free again
    assert OP in alb_op_names()


def test_register_alb_op_refuses_taken_names_bad_names_and_bad_builders(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_alb_op(OP, Conv)
    with pytest.raises(ValueError, match="already registered"):
        register_alb_op("skip_connect", Conv)  # a built-in op cannot be replaced
    for bad in ("", "3x3", "conv-3", "conv 3", "cönv", None):
        with pytest.raises(ValueError, match="identifier"):
            register_alb_op(bad, Conv)
    with pytest.raises(TypeError, match="callable"):
        register_alb_op("fresh_op", 3)
    with pytest.raises(TypeError, match=r"\(c_in, c_out, stride, norm, affine\)"):
        register_alb_op("fresh_op")(lambda c_in, c_out: None)
    assert alb_op_names() == sorted(BUILT_IN + [OP])
    for remove, name in ((unregister_alb_op, "skip_connect"), (unregister_search_space, "elixir")):
        with pytest.raises(ValueError, match="built in"):
            remove(name)
    with pytest.raises(ValueError, match="not registered"):
        unregister_alb_op("fresh_op")


def test_register_search_space_refuses_what_a_search_could_not_use(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_search_space(SPACE, ["none", OP])
    with pytest.raises(ValueError, match="already registered"):
        register_search_space("elixir", ["none", OP])
    for ops, match in (
        ([OP], "'none' followed"),
        (["none"], "'none' followed"),
        ([OP, "none"], "'none' followed"),
        ("none", "list of op names"),
        (["none", OP, OP], r"more than once: \['registry_test_conv'\]"),
        (["none", "conv_9x9"], r"unknown ALB ops \['conv_9x9'\]"),
    ):
        with pytest.raises(ValueError, match=match):
            register_search_space("fresh_space", ops)
    assert sorted(SEARCH_SPACES) == ["darts", "elixir", SPACE]


def test_errors_list_the_registered_spaces(registered):
    listed = rf"\['darts', 'elixir', '{SPACE}'\]"
    with pytest.raises(ValueError, match=rf"MODEL.ALB.SEARCH_SPACE.*{listed}"):
        get_search_space("nasnet")
    with pytest.raises(GenotypeError, match=rf"search space 'nasnet'; registered: {listed}"):
        Genotype(normal=(), reduce=(), space="nasnet").validate()
    with pytest.raises(GenotypeError, match=listed):
        Genotype(normal=(), reduce=(), space=["elixir"]).validate()


def test_check_alb_op_catches_a_wrong_shape_a_wrong_forward_and_a_non_module(registered):
    check_alb_op(OP)
    register_alb_op("no_pad_conv", NoPadConv)
    register_alb_op(
        "bare_conv", lambda c_in, c_out, stride, norm, a: nn.Conv2d(c_in, c_out, 1, stride)
    )
    register_alb_op("not_a_module", lambda c_in, c_out, stride, norm, affine: "conv")
    try:
        with pytest.raises(
            ValueError,
            match=r"output shape \(3, 8, 5, 5\), expected \(3, 8, 7, "
            r"7\)",
        ):
            check_alb_op("no_pad_conv")
        with pytest.raises(ValueError, match=r"Conv2d.forward must take \(x, num_per_image"):
            check_alb_op("bare_conv")  # nn.Conv2d's forward has no num_per_image
        with pytest.raises(TypeError, match="not_a_module.*returned a str"):
            build_op("not_a_module", 8, 8)
        # What check_alb_op passes, a head can run: stride 2 on 7x7 RoIs of two images.
        assert build_op(OP, 8, 12, 2, "GN")(torch.randn(3, 8, 7, 7), [2, 1]).shape == (3, 12, 4, 4)
    finally:
        for name in ("no_pad_conv", "bare_conv", "not_a_module"):
            unregister_alb_op(name)
