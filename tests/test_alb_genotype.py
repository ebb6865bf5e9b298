"""Tests of the ALB genotype: YAML round trip, validation errors, derivation from alphas."""

import os

import numpy as np
import pytest
import torch
import yaml

from elixir_d2.modeling.alb.genotype import (
    GenotypeError,
    derive_genotype,
    genotype_from_dict,
    load_genotype,
    save_genotype,
)
from elixir_d2.modeling.alb.spaces import DARTS_OPS, ELIXIR_OPS

ROOT = os.path.join(os.path.dirname(__file__), "..")
DEFAULT = os.path.join(ROOT, "configs", "genotypes", "figure3.yaml")

NORMAL = [
    ["dil_conv_3x3_r2", 1],
    ["region_nonlocal", 0],
    ["conv_1x1", 2],
    ["skip_connect", 1],
    ["dw_conv_7x7", 3],
    ["avg_pool_3x3", 0],
    ["asym_conv_3", 4],
    ["dil_conv_3x3_r3", 2],
]
REDUCE = [
    ["avg_pool_3x3", 0],
    ["dw_conv_7x7", 1],
    ["asym_conv_3", 2],
    ["skip_connect", 0],
    ["conv_1x1", 1],
    ["region_nonlocal", 3],
    ["skip_connect", 4],
    ["dil_conv_3x3_r2", 0],
]


def _data(**over):
    d = {
        "space": "elixir",
        "branches": 4,
        "normal": [list(p) for p in NORMAL],
        "reduce": [list(p) for p in REDUCE],
    }
    d.update(over)
    return d


def _write(tmp_path, data, name="g.yaml"):
    path = str(tmp_path / name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_yaml_round_trip(tmp_path):
    g = genotype_from_dict(_data())
    path = str(tmp_path / "out.yaml")
    save_genotype(g, path, comment="searched on nothing\nsecond line")
    text = open(path, encoding="utf-8").read()
    assert text.startswith("# searched on nothing\n# second line\n")
    assert yaml.safe_load(text) == _data()  # plain YAML a person can read and edit
    g2 = load_genotype(path)
    assert g2 == g
    assert g2.normal[1] == ("region_nonlocal", 0) and g2.reduce[7] == ("dil_conv_3x3_r2", 0)


def test_default_genotype_is_a_labelled_placeholder():
    g = load_genotype(DEFAULT)
    normal_ops = {op for op, _ in g.normal}
    assert g.space == "elixir" and g.branches == 4
    assert "region_nonlocal" in normal_ops
    assert normal_ops & {"dil_conv_3x3_r2", "dil_conv_3x3_r3"}
    header = "".join(
        line for line in open(DEFAULT, encoding="utf-8") if line.startswith("#")
    ).lower()
    assert "hand-written" in header and "figure 3" in header and "not a search result" in header
    assert yaml.safe_load(open(DEFAULT, encoding="utf-8"))["provenance"]["searched"] is False


@pytest.mark.parametrize(
    "data,pattern",
    [
        (
            _data(normal=[*NORMAL[:3], ["sep_conv_3x3", 1], *NORMAL[4:]]),
            r"g\.yaml: normal\[3\] = \[sep_conv_3x3, 1\] \(branch 1\): unknown op 'sep_conv_3x3'",
        ),
        (_data(reduce=[*REDUCE[:5], ["none", 1], *REDUCE[6:]]), r"reduce\[5\].*unknown op 'none'"),
        # Branch 0 sees only the block inputs 0 and 1.
        (
            _data(normal=[["conv_1x1", 2], *NORMAL[1:]]),
            r"normal\[0\] = \[conv_1x1, 2\] \(branch 0\): input index 2 does not exist; "
            r"valid: 0\.\.1",
        ),
        (_data(reduce=[*REDUCE[:7], ["conv_1x1", 6]]), r"reduce\[7\].*index 6.*valid: 0\.\.4"),
        (_data(normal=[*NORMAL[:2], ["conv_1x1", -1], *NORMAL[3:]]), r"normal\[2\].*index -1"),
        (_data(normal=[*NORMAL[:2], ["conv_1x1", "1"], *NORMAL[3:]]), r"normal\[2\].*index '1'"),
        (_data(normal=NORMAL[:6]), r"'normal' has 6 .* 4 branches need 8"),
        (_data(branches=3), r"'normal' has 8 .* 3 branches need 6"),
        (_data(branches=0), r"'branches' must be a positive int"),
        (_data(space="nasnet"), r"unknown search space 'nasnet'"),
        (_data(space="darts"), r"normal\[0\].*unknown op 'dil_conv_3x3_r2' for space 'darts'"),
        (_data(normal=[*NORMAL[:7], ["conv_1x1"]]), r"normal\[7\] = \['conv_1x1'\] is not an"),
        (_data(extra=1), r"unknown keys \['extra'\]"),
        ({"space": "elixir", "normal": NORMAL}, r"missing key 'reduce'"),
        ([1, 2], r"must be a mapping"),
    ],
)
def test_validation_errors_name_file_and_entry(tmp_path, data, pattern):
    path = _write(tmp_path, data)
    with pytest.raises(GenotypeError, match=pattern) as info:
        load_genotype(path)
    assert path in str(info.value)


def test_invalid_yaml_and_missing_path(tmp_path):
    path = _write(tmp_path, "normal: [[conv_1x1, 0]\n")
    with pytest.raises(GenotypeError, match="not valid YAML"):
        load_genotype(path)
    with pytest.raises(GenotypeError, match="MODEL.ALB.GENOTYPE is empty"):
        load_genotype("")


def test_darts_genotype_valid():
    pairs = [["sep_conv_3x3", 0], ["max_pool_3x3", 1]] * 4
    g = genotype_from_dict({"space": "darts", "normal": pairs, "reduce": pairs})
    assert g.space == "darts" and g.normal[1] == ("max_pool_3x3", 1)


def _alphas(choices, ops, branches=4, base=0.0):
    """Alphas (num_edges x num_ops) with ``choices[(branch, input)] = (op, value)`` set."""
    rows = [(b, j) for b in range(branches) for j in range(2 + b)]
    a = np.full((len(rows), len(ops)), base)
    for (b, j), (op, value) in choices.items():
        a[rows.index((b, j)), ops.index(op)] = value
    return a


def test_derive_picks_what_the_alphas_say():
    ops = ELIXIR_OPS
    normal = _alphas(
        {
            (0, 0): ("conv_1x1", 2.0),
            (0, 1): ("dil_conv_3x3_r2", 3.0),
            # Branch 1: input 0 is dominated by `none`, which never counts; inputs 1 and 2 win.
            (1, 0): ("none", 9.0),
            (1, 1): ("region_nonlocal", 1.0),
            (1, 2): ("avg_pool_3x3", 1.5),
            (2, 0): ("asym_conv_3", 0.5),
            (2, 1): ("skip_connect", 0.4),
            (2, 3): ("dw_conv_7x7", 2.5),
            (3, 1): ("dil_conv_3x3_r3", 1.2),
            (3, 4): ("conv_1x1", 4.0),
            (3, 2): ("skip_connect", 1.1),
        },
        ops,
    )
    # On edge (3, 4) a second op is close behind: argmax must still pick conv_1x1 (and its
    # softmax weight, ~0.49, still beats edges (3, 1) ~0.29 and (3, 2) ~0.27).
    normal[9 + 4, ops.index("dw_conv_7x7")] = 3.9
    reduce = _alphas(
        {
            (0, 0): ("avg_pool_3x3", 1.0),
            (0, 1): ("dw_conv_7x7", 1.0),
            (1, 2): ("conv_1x1", 1.0),
            (1, 0): ("skip_connect", 0.9),
            (2, 3): ("region_nonlocal", 1.0),
            (2, 1): ("asym_conv_3", 0.8),
            (3, 0): ("dil_conv_3x3_r2", 1.0),
            (3, 3): ("conv_1x1", 0.7),
        },
        ops,
    )
    g = derive_genotype(torch.tensor(normal), reduce, "elixir")
    assert g.normal == (
        ("conv_1x1", 0),
        ("dil_conv_3x3_r2", 1),
        ("region_nonlocal", 1),
        ("avg_pool_3x3", 2),
        ("asym_conv_3", 0),
        ("dw_conv_7x7", 3),
        ("dil_conv_3x3_r3", 1),
        ("conv_1x1", 4),
    )
    assert g.reduce == (
        ("avg_pool_3x3", 0),
        ("dw_conv_7x7", 1),
        ("skip_connect", 0),
        ("conv_1x1", 2),
        ("asym_conv_3", 1),
        ("region_nonlocal", 3),
        ("dil_conv_3x3_r2", 0),
        ("conv_1x1", 3),
    )


def test_derive_ranks_edges_by_softmax_weight_not_raw_alpha():
    ops = DARTS_OPS
    # Branch 1 (rows 2, 3, 4 = inputs 0, 1, 2). Input 0 has the largest raw alpha (5) but shares
    # it with a close second op, so its softmax weight is lowest; inputs 1 and 2 are kept.
    a = np.zeros((14, len(ops)))
    a[2, ops.index("sep_conv_3x3")] = 5.0
    a[2, ops.index("sep_conv_5x5")] = 4.9
    a[3, ops.index("skip_connect")] = 3.0
    a[4, ops.index("max_pool_3x3")] = 2.5
    g = derive_genotype(a, a, "darts")
    w2 = np.exp([5.0, 4.9]).max() / (np.exp(5.0) + np.exp(4.9) + len(ops) - 2)
    w3 = np.exp(3.0) / (np.exp(3.0) + len(ops) - 1)
    w4 = np.exp(2.5) / (np.exp(2.5) + len(ops) - 1)
    assert w3 > w4 > w2  # the expected ranking, computed here
    assert g.normal[2:4] == (("skip_connect", 1), ("max_pool_3x3", 2))


def test_derive_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"alpha_normal has shape \(14, 8\)"):
        derive_genotype(np.zeros((14, 8)), np.zeros((14, 9)), "elixir")
