"""LesionEvaluator on hand-made datasets: hand-computed metrics, files, typed sets, gloo gather."""

import json
import math
import os
import socket
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from elixir_d2.evaluation import LesionEvaluator, format_froc_table
from elixir_d2.evaluation.lesion_evaluator import coco_ap
from elixir_d2.launch import release_process_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ann(box, diameter=None, noisy=False, category_id=0):
    ann = {
        "bbox": list(map(float, box)),
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category_id,
        "lesion_type": category_id + 1,
        "noisy": noisy,
    }
    if diameter is not None:
        ann["diameter_mm"] = (float(diameter), float(diameter) / 2)
    return ann


def binary_records():
    """4 images; image 1 also holds a Possibly_noisy lesion, image 4 none."""
    return [
        {
            "image_id": 11,
            "height": 200,
            "width": 200,
            "file_name": "a.png",
            "annotations": [_ann([10, 10, 30, 30], 8), _ann([50, 50, 70, 70], 12, noisy=True)],
        },
        {
            "image_id": 12,
            "height": 200,
            "width": 200,
            "file_name": "b.png",
            "annotations": [_ann([100, 100, 140, 140], 20)],
        },
        {
            "image_id": 13,
            "height": 200,
            "width": 200,
            "file_name": "c.png",
            "annotations": [_ann([0, 0, 60, 60], 40)],
        },
        {"image_id": 14, "height": 200, "width": 200, "file_name": "d.png", "annotations": []},
    ]


def binary_predictions():
    """image_id -> [(box, score, class)]. IoU ranking: hit A .95, FP .9, FP .7, FP .5 (on the
    noisy lesion, tied with and ranked before hit C .5 by dataset order), FP .4 (IoU 1/3 with D,
    IoBB 1: a hit under IoBB), FP .3, 12 FPs .12-.01, hit D .005 (a duplicate under IoBB)."""
    far = [[150 + i, 10, 160 + i, 20] for i in range(12)]
    return {
        11: [([10, 10, 30, 30], 0.95), ([50, 50, 70, 70], 0.5)],
        12: [([0, 0, 5, 5], 0.9), ([100, 100, 140, 150], 0.5)],
        13: [([0, 0, 60, 20], 0.4), ([0, 0, 60, 60], 0.005)],
        14: [([150, 150, 160, 160], 0.7), ([170, 170, 180, 180], 0.3)]
        + [(b, round(0.12 - 0.01 * i, 2)) for i, b in enumerate(far)],
    }


def typed_records():
    return [
        {
            "image_id": 1,
            "height": 200,
            "width": 200,
            "file_name": "a.png",
            "annotations": [
                _ann([0, 0, 10, 10], category_id=0),
                _ann([50, 50, 60, 60], category_id=1),
            ],
        },
        {
            "image_id": 2,
            "height": 200,
            "width": 200,
            "file_name": "b.png",
            "annotations": [_ann([0, 0, 10, 10], category_id=1)],
        },
    ]


def typed_predictions():
    """Type 0: one hit, no FP (curve never reaches 3 FPs/image). Type 1: FP .8 (on the type-0
    lesion: a duplicate class-agnostically), hit .7, 6 FPs .6-.1, hit .05."""
    return {
        1: [([0, 0, 10, 10], 0.9, 0), ([0, 0, 10, 10], 0.8, 1), ([50, 50, 60, 60], 0.7, 1)],
        2: [([100, 100 + 10 * i, 110, 110 + 10 * i], round(0.6 - 0.1 * i, 1), 1) for i in range(6)]
        + [([0, 0, 10, 10], 0.05, 1)],
    }


def register(name, records, classes):
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=list(classes), evaluator_type="lesion")
    return name


def to_io(image_id, preds):
    inst = Instances((200, 200))
    inst.pred_boxes = Boxes(torch.tensor([p[0] for p in preds], dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([p[1] for p in preds], dtype=torch.float32)
    inst.pred_classes = torch.tensor([p[2] if len(p) > 2 else 0 for p in preds], dtype=torch.int64)
    return [{"image_id": image_id}], [{"instances": inst}]


def run(evaluator, predictions, image_ids):
    evaluator.reset()
    for i in image_ids:
        evaluator.process(*to_io(i, predictions[i]))
    return evaluator.evaluate()


@pytest.fixture(scope="module")
def binary_name():
    return register(f"lesion_eval_binary_{uuid.uuid4().hex[:8]}", binary_records(), ["lesion"])


@pytest.fixture(scope="module")
def typed_name():
    return register(f"lesion_eval_typed_{uuid.uuid4().hex[:8]}", typed_records(), ["a", "b type"])


def test_binary_metrics_match_hand_computation(binary_name, tmp_path):
    ev = LesionEvaluator(binary_name, str(tmp_path), distributed=False)
    res = run(ev, binary_predictions(), [14, 12, 13, 11])  # processing order must not matter
    m = res["lesion"]
    third = 100.0 / 3
    iou = {
        "0.5": third,
        "1": 2 * third,
        "2": 2 * third,
        "3": 2 * third,
        "4": 2 * third,
        "6": 100.0,
        "8": 100.0,
    }
    iobb = {"0.5": third, "1": 100.0, "2": 100.0, "3": 100.0, "4": 100.0, "6": 100.0, "8": 100.0}
    for f in iou:
        assert m[f"sens@{f}_iou"] == pytest.approx(iou[f]), f
        assert m[f"sens@{f}_iobb"] == pytest.approx(iobb[f]), f
    assert m["mean_sens_iou"] == pytest.approx(700.0 / 12)
    assert m["mean_sens_iobb"] == pytest.approx(1000.0 / 12)
    # At 3 FPs/image (12 FPs) lesions A (<10 mm) and C (10-30) are found, D (>30) is not yet.
    assert m["sens@3_iou_size<10"] == pytest.approx(100.0)
    assert m["sens@3_iou_size10to30"] == pytest.approx(100.0)
    assert m["sens@3_iou_size>30"] == pytest.approx(0.0)
    assert (m["num_images"], m["num_lesions"], m["num_noisy_left_out"]) == (4, 3, 1)
    assert 0.0 < m["AP50"] <= 100.0 and 0.0 < m["AP"] <= m["AP50"]
    assert not any(k.endswith("_b_type") for k in m)  # binary set: no per-type metric

    # Files: froc.csv (paper layout), lesion_metrics.json, froc.png.
    text = (tmp_path / "froc.csv").read_text(encoding="utf-8")
    rows = [line.split(",") for line in text.strip().splitlines()]
    assert rows[0][:3] == ["criterion", "sens@0.5", "sens@1"] and [r[0] for r in rows[1:]] == [
        "iou",
        "iobb",
    ]
    assert float(rows[1][2]) == pytest.approx(2 * third, abs=1e-4)
    payload = json.loads((tmp_path / "lesion_metrics.json").read_text(encoding="utf-8"))
    assert (
        payload["counts"]["num_noisy_left_out"] == 1 and payload["counts"]["num_detections"] == 20
    )
    assert payload["max_fp_per_image"] == {"iou": 17 / 4, "iobb": 16 / 4}
    assert payload["per_size_sens@3_iou"]["size>30"] == 0.0
    assert (tmp_path / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_froc_inputs_file_holds_what_was_evaluated(binary_name, tmp_path):
    """froc_inputs.json: the evaluated images in dataset order (the noisy lesion left out, the
    image without lesions kept), patients as the bootstrap's unit, and enough to recompute the
    hand-computed FROC above without the model."""
    from elixir_d2.evaluation.froc import compute_froc
    from elixir_d2.evaluation.froc_inputs import read_froc_inputs

    records = binary_records()
    for r, patient in zip(records, (5, 5, 6, 7)):
        r["patient"] = patient
    name = register(f"lesion_eval_patients_{uuid.uuid4().hex[:8]}", records, ["lesion"])
    run(
        LesionEvaluator(name, str(tmp_path), distributed=False),
        binary_predictions(),
        [14, 12, 13, 11],
    )
    got = read_froc_inputs(str(tmp_path / "froc_inputs.json"))
    assert got.image_ids == [11, 12, 13, 14] and got.patients == [5, 5, 6, 7]
    assert got.convention == "continuous"
    assert [len(g) for g in got.gt_boxes] == [1, 1, 1, 0]
    assert got.gt_boxes[0].tolist() == [[10, 10, 30, 30]]
    assert [len(s) for s in got.pred_scores] == [2, 2, 2, 14]
    res = compute_froc(got.pred_boxes, got.pred_scores, got.gt_boxes, fps=(0.5, 1.0, 6.0))
    assert res["sensitivity"] == {
        0.5: pytest.approx(1 / 3),
        1.0: pytest.approx(2 / 3),
        6.0: pytest.approx(1.0),
    }
    (tmp_path / "bad.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        read_froc_inputs(str(tmp_path / "bad.json"))


def test_typed_metrics_are_class_aware_and_none_below_3_fps(typed_name, tmp_path):
    ev = LesionEvaluator(typed_name, str(tmp_path), distributed=False)
    m = run(ev, typed_predictions(), [1, 2])["lesion"]
    assert math.isnan(m["sens@3_iou_a"])  # type a: no FP at all, never reaches 3 FPs/image
    assert m["sens@3_iou_b_type"] == pytest.approx(50.0)  # 6 FPs / 2 images: 1 of 2 found
    # Class-agnostic FROC: the class-b box on lesion a is a duplicate, not an FP.
    assert m["sens@0.5_iou"] == pytest.approx(200.0 / 3)
    assert m["sens@2_iou"] == pytest.approx(200.0 / 3)
    assert m["sens@3_iou"] == pytest.approx(100.0)  # 6 FPs / 2 images: the last point
    assert all(math.isnan(m[f"sens@3_iou_{b}"]) for b in ("size<10", "size10to30", "size>30"))
    assert "AP_typed" in m
    payload = json.loads((tmp_path / "lesion_metrics.json").read_text(encoding="utf-8"))
    assert payload["per_type_sens@3_iou"] == {"a": None, "b_type": pytest.approx(50.0)}
    assert payload["metrics"]["sens@3_iou_a"] is None
    assert payload["counts"]["num_lesions_without_size"] == 3


def test_max_dets_per_image_keeps_the_top_scores(typed_name):
    ev = LesionEvaluator(typed_name, None, distributed=False, max_dets_per_image=2)
    m = run(ev, typed_predictions(), [1, 2])["lesion"]
    # Kept: image 1 .9 (hit a), .8 (duplicate); image 2 .6, .5 (FPs): 1 of 3 lesions, 1 FP/image.
    assert m["sens@1_iou"] == pytest.approx(100.0 / 3) and m["sens@8_iou"] == pytest.approx(
        100.0 / 3
    )


def test_bad_predictions(binary_name):
    ev = LesionEvaluator(binary_name, None, distributed=False)
    assert ev.evaluate() == {}  # nothing processed: nothing to evaluate, no crash
    with pytest.raises(ValueError, match="image_id 99 not in dataset"):
        run(ev, {99: [([0, 0, 1, 1], 0.5)]}, [99])
    ev.reset()
    ev.process(*to_io(11, [([0, 0, 1, 1], 0.5)]))
    ev.process(*to_io(11, [([0, 0, 1, 1], 0.5)]))
    with pytest.raises(ValueError, match="image_id 11 .* predicted twice"):
        ev.evaluate()
    with pytest.raises(ValueError, match=r"prediction 0 for image_id 11 .* NaN"):
        run(ev, {11: [([0, 0, float("nan"), 1], 0.5)]}, [11])
    # Only image 11 processed: the other 3 images are left out (and logged), not counted.
    m = run(ev, {11: []}, [11])["lesion"]
    assert (m["num_images"], m["num_lesions"], m["sens@8_iou"], m["AP"]) == (1, 1, 0.0, 0.0)


def test_coco_ap_by_hand():
    gt = [np.array([[0, 0, 100, 100]], dtype=float)]
    # IoU 0.72: matched at thresholds .50-.70 (5 of 10) -> AP 50, AP50 100.
    det = [np.array([[0, 0, 100, 72]], dtype=float)]
    one = [np.array([0])]
    assert coco_ap(gt, one, det, [np.array([0.9])], one) == pytest.approx((50.0, 100.0))
    assert coco_ap(gt, one, gt, [np.array([0.9])], one) == pytest.approx((100.0, 100.0))
    assert coco_ap(gt, one, [np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0, dtype=int)]) == (
        0.0,
        0.0,
    )
    # Class-aware: right box, wrong class -> 0; category-agnostic -> 100.
    assert coco_ap(gt, one, gt, [np.array([0.9])], [np.array([1])], num_classes=2) == (0.0, 0.0)
    assert coco_ap(gt, one, gt, [np.array([0.9])], [np.array([1])], num_classes=1)[
        1
    ] == pytest.approx(100.0)


def test_format_froc_table_paper_layout():
    rows = {
        "FPN": {
            "sens@0.5_iou": 60.57,
            "sens@1_iou": 70.34,
            "sens@8_iou": 85.67,
            "AP": 31.5,
            "sens@0.5_iobb": 62.17,
        },
        "ElixirNet": {"lesion": {"sens@0.5_iou": float("nan"), "AP": 35.25}},
    }
    table = format_froc_table(rows, "iou").splitlines()
    assert table[2] == "| Method | 0.5 | 1 | 2 | 3 | 4 | 6 | 8 | mAP |"
    assert table[4] == "| FPN | 60.57 | 70.34 | - | - | - | - | 85.67 | 31.5 |"
    assert table[5] == "| ElixirNet | - | - | - | - | - | - | - | 35.2 |"
    assert "IoBB" in format_froc_table(rows, "iobb").splitlines()[0]
    assert "| FPN | 62.17 |" in format_froc_table(rows, "iobb")


# ---------------------------------------------------------------- 2 processes, gloo
def _worker(rank, port, name, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        register(name, binary_records(), ["lesion"])
        ev = LesionEvaluator(
            name, os.path.join(out_dir, "files") if rank == 0 else None, distributed=True
        )
        # Rank 0 gets images 12 and 14, rank 1 images 11 and 13: gathered in an order that
        # differs from the dataset's (the .5 tie would then move sens@0.5).
        res = run(ev, binary_predictions(), [12, 14] if rank == 0 else [11, 13])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(res, f)
    finally:
        release_process_groups()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_numbers(binary_name, tmp_path):
    single = run(
        LesionEvaluator(binary_name, None, distributed=False),
        binary_predictions(),
        [11, 12, 13, 14],
    )
    name = f"lesion_eval_gloo_{uuid.uuid4().hex[:8]}"
    # spawn: a forked child inherits the thread pools earlier tests started in this process
    # without their threads, and aborted at exit ("terminate called without an active exception");
    # release_process_groups: a group left cached by detectron2's comm did the same.
    mp.start_processes(
        _worker, args=(_free_port(), name, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    rank0 = json.loads((tmp_path / "rank0.json").read_text(encoding="utf-8"))
    assert json.loads((tmp_path / "rank1.json").read_text(encoding="utf-8")) == {}
    assert rank0["lesion"].keys() == single["lesion"].keys()
    for k, v in single["lesion"].items():
        assert rank0["lesion"][k] == pytest.approx(v, nan_ok=True), k
    assert rank0["lesion"]["sens@0.5_iou"] == pytest.approx(100.0 / 3)
    assert (tmp_path / "files" / "lesion_metrics.json").exists()


def test_built_from_config(binary_name, tmp_path):
    from detectron2.config import get_cfg

    from elixir_d2 import add_elixirnet_config

    cfg = get_cfg()
    add_elixirnet_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.DETECTIONS_PER_IMAGE = 1
    cfg.TEST.FROC_FPS = (1.0, 2.0)
    ev = LesionEvaluator(cfg, binary_name)  # @configurable: cfg first
    m = run(ev, binary_predictions(), [11, 12, 13, 14])["lesion"]
    # Top-1 per image: hit A .95, FP .9, FP .4 (IoU), FP .7 -> 1 of 3 lesions; only the 2 FP points.
    assert [k for k in m if k.startswith("sens@") and k.count("_") == 1] == [
        "sens@1_iou",
        "sens@2_iou",
        "sens@1_iobb",
        "sens@2_iobb",
    ]
    assert m["sens@1_iou"] == pytest.approx(100.0 / 3)
    assert (tmp_path / "inference" / binary_name / "froc.csv").exists()


def test_froc_convention_passed_through_from_config(tmp_path):
    from detectron2.config import get_cfg

    from elixir_d2 import add_elixirnet_config
    from elixir_d2.trainer import build_lesion_evaluator

    name = register(
        f"lesion_eval_conv_{uuid.uuid4().hex[:8]}",
        [
            {
                "image_id": 1,
                "height": 200,
                "width": 200,
                "file_name": "a.png",
                "annotations": [_ann([0, 0, 10, 10], 5)],
            }
        ],
        ["lesion"],
    )
    # Lesion [0,0,10,10], detection [0,0,10,21]: overlap 100/210 in continuous coordinates (an FP)
    # and 121/242 = 0.5 in the authors' +1-pixel counts (a hit), for IoU and IoBB alike.
    preds = {1: [([0, 0, 10, 21], 0.9)]}
    cfg = get_cfg()
    add_elixirnet_config(cfg)
    assert cfg.TEST.FROC_CONVENTION == "continuous"
    cfg.TEST.FROC_FPS = (1.0,)
    for convention, expected in (("continuous", 0.0), ("deeplesion", 100.0)):
        cfg.TEST.FROC_CONVENTION = convention
        cfg.OUTPUT_DIR = str(tmp_path / convention)
        for ev in (LesionEvaluator(cfg, name), build_lesion_evaluator(cfg, name)):
            m = run(ev, preds, [1])["lesion"]
            assert (m["sens@1_iou"], m["sens@1_iobb"]) == (expected, expected), convention
        payload = json.loads(
            (tmp_path / convention / "inference" / name / "lesion_metrics.json").read_text(
                encoding="utf-8"
            )
        )
        assert payload["froc_convention"] == convention
    cfg.TEST.FROC_CONVENTION = "3DCE"
    with pytest.raises(ValueError, match=r"TEST\.FROC_CONVENTION.*'3DCE'"):
        LesionEvaluator(cfg, name)


def test_train_net_refuses_an_unknown_froc_convention_by_name():
    from detectron2.engine import default_argument_parser

    from elixir_d2.cli import UserInputError

    import train_net

    args = default_argument_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO, "configs", "quickstart", "fpn.yaml"),
            "TEST.FROC_CONVENTION",
            "mulan",
        ]
    )
    with pytest.raises(UserInputError, match=r"TEST\.FROC_CONVENTION must be one of .*'mulan'"):
        train_net.check_inputs(args)


def test_paper_configs_read_the_froc_as_deeplesion_quickstart_configs_continuous():
    from elixir_d2 import load_config

    from config_files import CONFIGS, shipped_configs

    configs = shipped_configs()
    quick = [c for c in configs if c.startswith("quickstart" + os.sep)]
    assert len(quick) >= 10 and len(configs) - len(quick) >= 20
    for c in configs:
        expected = "continuous" if c in quick else "deeplesion"
        assert load_config(os.path.join(CONFIGS, c)).TEST.FROC_CONVENTION == expected, c


def test_predict_net_refuses_an_unknown_froc_convention_before_the_run(tmp_path):
    """predict_net reads the FROC only at the end of a --gt run: the key is checked first."""
    from elixir_d2.cli import UserInputError

    import predict_net

    args = predict_net.build_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO, "configs", "quickstart", "fpn.yaml"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "TEST.FROC_CONVENTION",
            "mulan",
        ]
    )
    with pytest.raises(UserInputError, match=r"TEST\.FROC_CONVENTION must be one of .*'mulan'"):
        predict_net.setup_cfg(args)
    assert not (tmp_path / "out").exists()
