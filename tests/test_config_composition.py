"""Configs compose component files (configs/components/, configs/quickstart/components/) instead of
restating them: a part's keys are written once, and no config repeats a value its bases give."""

import os

import pytest
import yaml

from detectron2.config import get_cfg

from elixir_d2 import add_elixirnet_config, load_config

from config_files import CONFIGS, shipped_configs


def _raw(rel):
    with open(os.path.join(CONFIGS, rel), encoding="utf-8") as f:
        return yaml.safe_load(f)


def _leaves(mapping, prefix=""):
    for k, v in mapping.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _files_setting(key, value):
    """Config files (components included) whose own text sets ``key`` to ``value``."""
    return [
        rel
        for rel in shipped_configs(False) + shipped_configs(True)
        if dict(_leaves({k: v for k, v in _raw(rel).items() if k != "_BASE_"})).get(key) == value
    ]


@pytest.mark.parametrize("rel", shipped_configs(False))
def test_no_config_restates_what_its_bases_give(rel, tmp_path):
    """A value a config file sets must differ from what its _BASE_ files set; restating a
    default (detectron2's or ElixirNet's) to write a recipe out in full is allowed."""
    raw = _raw(rel)
    bases = raw.get("_BASE_")
    if bases is None:
        return  # a root (Base-*.yaml): nothing to restate
    bases = bases if isinstance(bases, list) else [bases]
    here = os.path.dirname(os.path.join(CONFIGS, rel))
    only_bases = tmp_path / "bases.yaml"
    only_bases.write_text(
        yaml.safe_dump({"_BASE_": [os.path.normpath(os.path.join(here, b)) for b in bases]}),
        encoding="utf-8",
    )
    inherited = load_config(str(only_bases))
    full = load_config(os.path.join(CONFIGS, rel))
    defaults = get_cfg()
    add_elixirnet_config(defaults)
    restated = [
        key
        for key, _ in _leaves({k: v for k, v in raw.items() if k != "_BASE_"})
        if _get(full, key) == _get(inherited, key) != _get(defaults, key)
    ]
    assert restated == [], f"{rel} restates {restated}, which its _BASE_ files already give"


@pytest.mark.parametrize(
    "key,value,owner",
    [
        ("MODEL.PROPOSAL_GENERATOR.NAME", "TRPN", "components/trpn.yaml"),
        ("MODEL.ROI_BOX_HEAD.NAME", "ALBHead", "components/alb.yaml"),
        ("MODEL.ALB.GENOTYPE", "configs/genotypes/figure3.yaml", "components/alb.yaml"),
        ("MODEL.RTM.ENABLED", True, "components/rtm.yaml"),
        (
            "MODEL.FREEZE_MODULES",
            ["backbone", "proposal_generator"],
            "components/typed_finetune.yaml",
        ),
    ],
)
def test_each_part_is_written_in_one_component(key, value, owner):
    assert _files_setting(key, value) == [owner]


@pytest.mark.parametrize(
    "rel,proposals,head,channels",
    [
        ("trpn_fpn_R_50_deeplesion.yaml", "TRPN", "FastRCNNConvFCHead", 32),
        ("alb_fpn_R_50_deeplesion.yaml", "RPN", "ALBHead", 32),
        ("elixirnet_R_50_FPN_deeplesion.yaml", "TRPN", "ALBHead", 32),
        ("elixirnet_R_50_C4_deeplesion.yaml", "TRPN", "ALBHead", 32),
        ("quickstart/trpn.yaml", "TRPN", "FastRCNNConvFCHead", 32),
        ("quickstart/alb.yaml", "RPN", "ALBHead", 16),
        ("quickstart/elixirnet.yaml", "TRPN", "ALBHead", 16),
        ("quickstart/elixirnet_C4.yaml", "TRPN", "ALBHead", 16),
        ("quickstart/elixirnet_deformv2.yaml", "TRPN", "ALBHead", 16),
    ],
)
def test_composed_configs_are_the_models_they_name(rel, proposals, head, channels):
    """The paper's parts land where the file names say: D = 32 in the full tree (the paper's
    doubled D = 16), 16 in the CPU-sized quickstart; ALB configs keep the stem and blocks of the
    paper's head."""
    cfg = load_config(os.path.join(CONFIGS, rel))
    assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == proposals
    assert cfg.MODEL.ROI_BOX_HEAD.NAME == head
    if head == "ALBHead":
        assert cfg.MODEL.ALB.CHANNELS == channels
        assert cfg.MODEL.ALB.STEM_CHANNELS == channels * 4
        assert cfg.MODEL.ROI_HEADS.NAME == "ElixirROIHeads"
        assert list(cfg.MODEL.ALB.BLOCKS) == ["normal", "reduce", "reduce"]
    if proposals == "TRPN" and "C4" not in rel:
        assert (cfg.MODEL.TRPN.THRESHOLD, cfg.MODEL.TRPN.LOC_LOSS_WEIGHT) == (-1.0, 1.0)


def test_quickstart_c4_overrides_the_trpn_component():
    cfg = load_config(os.path.join(CONFIGS, "quickstart", "elixirnet_C4.yaml"))
    assert (cfg.MODEL.TRPN.GATE, cfg.MODEL.TRPN.THRESHOLD, cfg.MODEL.TRPN.LOC_LOSS_WEIGHT) == (
        "none",
        0.0,
        0.1,
    )
    assert list(cfg.MODEL.ROI_HEADS.IN_FEATURES) == ["res4"]
