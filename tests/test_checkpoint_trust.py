"""Checkpoints a researcher can trust: the ALB genotype travels with the weights, --resume survives
a deleted checkpoint, .pkl weights cannot run code."""

import logging
import os
import pickle

import numpy as np
import pytest
import torch
import yaml

from elixir_d2 import load_config
from elixir_d2.checkpoint import AtomicCheckpointer, CheckpointError
from elixir_d2.cli import MissingFileError, UserInputError
from elixir_d2.modeling.alb.genotype import genotype_to_yaml, load_genotype
from elixir_d2.modeling.genotype_source import (
    GENOTYPE_KEY,
    fill_genotype_from_checkpoint,
    resolve_genotype_config,
)

from genotype_helpers import swap_dilation, tiny_alb_head

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE3 = os.path.join(REPO, "configs", "genotypes", "figure3.yaml")
ALB_QS = os.path.join(REPO, "configs", "quickstart", "alb.yaml")


# ------------------------------------------------------------------------------------ genotype
def test_checkpoint_stores_the_genotype_and_refuses_another(tmp_path):
    figure3 = load_genotype(FIGURE3)
    other = swap_dilation(figure3)
    assert other != figure3
    # Without the check this load succeeds silently: the state dicts match key for key.
    assert {k: v.shape for k, v in tiny_alb_head(figure3).state_dict().items()} == {
        k: v.shape for k, v in tiny_alb_head(other).state_dict().items()
    }
    AtomicCheckpointer(tiny_alb_head(figure3), str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")
    assert torch.load(path, weights_only=True)[GENOTYPE_KEY] == figure3.to_dict()
    AtomicCheckpointer(tiny_alb_head(figure3)).load(path)  # same genotype: fine
    with pytest.raises(CheckpointError) as e:
        AtomicCheckpointer(tiny_alb_head(other)).load(path)
    msg = str(e.value)
    assert path in msg and "\n" not in msg
    assert genotype_to_yaml(figure3) in msg and genotype_to_yaml(other) in msg  # names both


def test_eval_takes_the_genotype_from_the_checkpoint_when_the_config_names_none(tmp_path):
    other = swap_dilation(load_genotype(FIGURE3))
    AtomicCheckpointer(tiny_alb_head(other), str(tmp_path)).save("model_final")
    weights = str(tmp_path / "model_final.pth")
    cfg = load_config(ALB_QS, ["MODEL.ALB.GENOTYPE", "", "MODEL.WEIGHTS", weights])
    assert fill_genotype_from_checkpoint(cfg, weights)
    assert yaml.safe_load(cfg.MODEL.ALB.GENOTYPE_YAML) == other.to_dict()
    # A config that names a genotype keeps it (the load then checks it against the checkpoint).
    named = load_config(ALB_QS, ["MODEL.WEIGHTS", weights])
    assert not fill_genotype_from_checkpoint(named, weights) and named.MODEL.ALB.GENOTYPE_YAML == ""
    # A checkpoint without a genotype: one line saying what to pass.
    torch.save({"model": {}}, str(tmp_path / "old.pth"))
    empty = load_config(ALB_QS, ["MODEL.ALB.GENOTYPE", ""])
    with pytest.raises(UserInputError, match=r"old\.pth holds no genotype.*MODEL\.ALB\.GENOTYPE"):
        fill_genotype_from_checkpoint(empty, str(tmp_path / "old.pth"))


def test_run_config_records_the_resolved_genotype_and_build_logs_its_origin(tmp_path):
    cfg = load_config(ALB_QS)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("detectron2.elixir_d2.genotype")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        resolve_genotype_config(cfg)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert yaml.safe_load(cfg.MODEL.ALB.GENOTYPE_YAML) == load_genotype(FIGURE3).to_dict()
    text = " ".join(r.getMessage() for r in records)
    assert "figure3.yaml" in text and "not searched" in text
    # The dumped config (what config.yaml holds) rebuilds the same structure...
    dumped = tmp_path / "config.yaml"
    dumped.write_text(cfg.dump(), encoding="utf-8")
    again = load_config(str(dumped))
    assert yaml.safe_load(again.MODEL.ALB.GENOTYPE_YAML) == load_genotype(FIGURE3).to_dict()
    # ... and refuses a genotype file that changed since.
    changed = tmp_path / "g.yaml"
    changed.write_text(
        yaml.safe_dump(swap_dilation(load_genotype(FIGURE3)).to_dict()), encoding="utf-8"
    )
    bad = load_config(str(dumped), ["MODEL.ALB.GENOTYPE", str(changed)])
    with pytest.raises(
        UserInputError, match=r"GENOTYPE_YAML .* differs from the genotype in .*g\.yaml"
    ):
        resolve_genotype_config(bad)


# -------------------------------------------------------------------------------------- resume
def test_resume_after_a_deleted_checkpoint_falls_back_to_the_newest_complete(tmp_path, caplog):
    out = str(tmp_path)
    model = torch.nn.Linear(2, 1)
    ckpt = AtomicCheckpointer(model, out)
    for it in (1, 3, 5):
        with torch.no_grad():
            model.weight.fill_(float(it))
        ckpt.save(f"model_{it:07d}", iteration=it)
    os.remove(os.path.join(out, "model_0000005.pth"))  # last_checkpoint still names it
    with open(os.path.join(out, "model_0000004.pth"), "wb") as f:  # a truncated copy: skipped
        f.write(b"PK\x03\x04 truncated")
    fresh = torch.nn.Linear(2, 1)
    with caplog.at_level(logging.WARNING):
        extra = AtomicCheckpointer(fresh, out).resume_or_load("", resume=True)
    assert extra["iteration"] == 3 and float(fresh.weight.detach()[0, 0]) == 3.0
    assert any(
        "model_0000005.pth, which is missing; resuming from model_0000003.pth" in r.getMessage()
        for r in caplog.records
    )
    for name in ("model_0000001.pth", "model_0000003.pth"):
        os.remove(os.path.join(out, name))
    with pytest.raises(
        MissingFileError,
        match=r"last_checkpoint names model_0000005\.pth.*delete .*last_checkpoint",
    ):
        AtomicCheckpointer(torch.nn.Linear(2, 1), out).resume_or_load("", resume=True)


# ------------------------------------------------------------------------------------- pickles
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pkl_weights_do_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "R-50.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"w": _RunsCode(marker)}, "__author__": "x"}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"R-50\.pkl asks to load (posix|os|nt)\.system"):
        AtomicCheckpointer(torch.nn.Linear(2, 1)).load(str(evil))
    assert not marker.exists()
    # The same payload through plain pickle does run: the test would catch a permissive loader.
    with open(evil, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pkl_weights_still_load(tmp_path, protocol):
    w = np.arange(2, dtype=np.float32).reshape(1, 2)
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:  # Caffe2 layout: a plain dict of arrays, with a momentum blob
        pickle.dump(
            {"blobs": {"weight": w, "bias": np.float32(0.5).reshape(1), "weight_momentum": w}},
            f,
            protocol=protocol,
        )
    data = AtomicCheckpointer(torch.nn.Linear(2, 1))._load_file(str(path))
    assert data["matching_heuristics"] and set(data["model"]) == {"weight", "bias"}
    np.testing.assert_array_equal(data["model"]["weight"], w)


def test_missing_weights_is_one_line(tmp_path):
    with pytest.raises(MissingFileError, match=r"weights file /nonexistent\.pth not found"):
        AtomicCheckpointer(torch.nn.Linear(2, 1)).load("/nonexistent.pth")
