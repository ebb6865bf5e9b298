"""Tiny end to end run: synthetic DeepLesion-format data -> train_net.py train -> --eval-only."""

import json
import os
import subprocess
import sys

import pytest

from elixir_d2.data import register_deeplesion
from elixir_d2.data.synthetic import generate_deeplesion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("e2e") / "synthetic")
    generate_deeplesion(
        root,
        num_patients=8,
        slices_per_series=(8, 10),
        keys_per_series=(1, 2),
        image_size=64,
        seed=3,
    )
    register_deeplesion(root, prefix="e2e")
    return root


def test_prepare_deeplesion_checker_runs(tiny_set):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "datasets/prepare_deeplesion.py"), "--root", tiny_set],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "0 missing key slices" in out and "test :" in out


def test_train_then_eval_only(tiny_set, tmp_path):
    from detectron2.engine import default_argument_parser

    import train_net

    common = [
        "DATASETS.TRAIN",
        "('e2e_train',)",
        "DATASETS.TEST",
        "('e2e_test',)",
        "OUTPUT_DIR",
        str(tmp_path),
        "INPUT.MAX_IMAGE_SIZE",
        "96",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.MAX_ITER",
        "4",
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.STEPS",
        "(3,)",
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
    ]
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs/quickstart/fpn.yaml")] + common
    )
    train_net.main(args)
    weights = tmp_path / "model_final.pth"
    assert weights.exists()
    # the training log really went through 4 iterations (0..3) with finite losses
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json", encoding="utf-8")]
    losses = {m["iteration"]: m["total_loss"] for m in metrics if "total_loss" in m}
    assert max(losses) == 3 and all(v == v for v in losses.values())

    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs/quickstart/fpn.yaml"), "--eval-only"]
        + common
        + ["MODEL.WEIGHTS", str(weights)]
    )
    res = train_net.main(args)
    lesion = res["lesion"]
    for key in ("sens@0.5_iou", "sens@8_iobb", "mean_sens_iou", "AP", "AP50", "num_images"):
        assert key in lesion
    assert 0.0 <= lesion["sens@8_iou"] <= 100.0
    out_dir = tmp_path / "inference" / "e2e_test"
    assert {"froc.csv", "froc.png", "lesion_metrics.json"} <= set(os.listdir(out_dir))
