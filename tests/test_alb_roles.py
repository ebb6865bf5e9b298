"""The DARTS roles of the ALB code (issue 15): op names are data (alb/spaces.py, no torch), the
genotype module reads names from there, and the BatchNorm-folding fast paths (alb/fused.py) give
the values of the plain modules."""

import ast
import os

import pytest
import torch
from torch import nn

from elixir_d2.modeling.alb import fused, ops, spaces

ALB = os.path.join(os.path.dirname(__file__), "..", "elixir_d2", "modeling", "alb")


def _imports(name):
    tree = ast.parse(open(os.path.join(ALB, name), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
    return found


def test_spaces_are_data_and_genotype_reads_names_from_them():
    assert not {m for m in _imports("spaces.py") if m.split(".")[0] in ("torch", "numpy")}
    assert _imports("spaces.py") <= {"typing"}
    genotype_imports = _imports("genotype.py")
    assert ".spaces" in genotype_imports
    assert ".ops" not in genotype_imports and "torch" not in genotype_imports
    # ops re-exports the very same lists (callers that import them from ops keep working).
    assert ops.ELIXIR_OPS is spaces.ELIXIR_OPS and ops.get_search_space is spaces.get_search_space
    assert spaces.get_search_space("darts") == spaces.DARTS_OPS
    with pytest.raises(ValueError, match="SEARCH_SPACE"):
        spaces.get_search_space("nas")


def test_fused_paths_live_apart_from_the_ops():
    assert ops.conv_norm is fused.conv_norm and ops.bn_fold is fused.bn_fold
    source = open(os.path.join(ALB, "ops.py"), encoding="utf-8").read()
    assert "rsqrt" not in source and "_conv_forward" not in source


def _eval_bn(channels):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def test_concat_conv_norm_folds_each_slice():
    torch.manual_seed(0)
    a, b = nn.Conv2d(4, 3, 1, bias=False), nn.Conv2d(4, 5, 1, bias=True)
    xa, xb = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    bn = _eval_bn(8)
    ref = bn(torch.cat([a(xa), b(xb)], dim=1))
    assert fused.bn_fold(bn) is not None
    torch.testing.assert_close(fused.concat_conv_norm(bn, [(a, xa), (b, xb)]), ref)
    gn = nn.GroupNorm(2, 8)  # no fold: the plain modules run
    assert fused.bn_fold(gn) is None and fused.bn_fold(bn.train()) is None
    torch.testing.assert_close(
        fused.concat_conv_norm(gn, [(a, xa), (b, xb)]), gn(torch.cat([a(xa), b(xb)], dim=1))
    )
    with pytest.raises(ValueError, match="channels"):
        fused.conv_norm(a, gn, xa, slice(0, 3))
