"""docs/extending.md, followed as a user would: its blocks headed by a file name are written into a
temporary folder (my_extension.py, the three entry scripts, a genotype), my_extension is imported,
the page's other Python blocks run, and its commands run on a tiny dataset in the page's own
format (cases.json + PNG slices written by its write_slices), with keys added that make them
seconds long.

Then what each recipe promises is checked against expectations computed here: the new op in a
searchable head of the new space (shapes, gradients, strides), genotypes of the space (derived,
hand-written, random, written by search_net.py) building heads that hold the op and train, and
the new datasets through the mapper and LesionEvaluator (a hand-worked FROC). Every name the page
registers is removed at the end. The registry's refusals: tests/test_alb_registry.py.
"""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from elixir_d2.data import CTDatasetMapper, load_deeplesion_dicts
from elixir_d2.evaluation import LesionEvaluator
from elixir_d2.modeling.alb import (
    SEARCH_SPACES,
    alb_op_names,
    build_op,
    check_alb_op,
    derive_genotype,
    edge_inputs,
    get_search_space,
    load_genotype,
    save_genotype,
    unregister_alb_op,
    unregister_search_space,
)
from elixir_d2.modeling.box_head import ALBHead, ALBSearchHead
from elixir_d2.search import sample_random_genotype

from reliability_helpers import SIZE, build_cfg, write_tiny_deeplesion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "extending.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FILE_HEADER = re.compile(r"# (\w+\.(?:py|yaml))(?: \(continued\))?$")
SPACE, OP = "elixir_conv3", "conv_3x3"
# The page's space written out: the paper's 9 ops in their order, then the new one.
SPACE_OPS = [
    "none",
    "skip_connect",
    "avg_pool_3x3",
    "conv_1x1",
    "asym_conv_3",
    "dil_conv_3x3_r2",
    "dil_conv_3x3_r3",
    "dw_conv_7x7",
    "region_nonlocal",
    OP,
]
WINDOW = (-300.0, 500.0)  # the quickstart's INPUT.HU_WINDOW
SLICES = 5  # per case of the page's format; pixel spacing and slice interval: the page's example
# Tiny runs of the page's commands: 64 px, 2 images a step, few RoIs, one epoch / two iterations.
TINY = [
    "INPUT.MAX_IMAGE_SIZE",
    "64",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.BASE_LR",
    "0.01",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.STEPS",
    "()",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "32",
    "TEST.DETECTIONS_PER_IMAGE",
    "20",
    "SEARCH.EPOCHS",
    "1",
    "SEARCH.WARMUP_EPOCHS",
    "0",
    "SEED",
    "0",
]
MY_CT = ["DATASETS.TRAIN", "('my_ct_train',)", "DATASETS.TEST", "('my_ct_test',)"]


def doc_blocks():
    """(language, text) of every fenced block of the page, in order."""
    with open(DOC, encoding="utf-8") as f:
        return FENCE.findall(f.read())


def doc_commands():
    """Each command of the page's bash blocks as an argv (continuations joined)."""
    text = "\n".join(body for lang, body in doc_blocks() if lang == "bash")
    return [
        shlex.split(line, comments=True)
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip()
    ]


def hu_volume(key, box):
    """SLICES x SIZE x SIZE HU: 40 + 10 z everywhere (so each stacked slice is recognisable), a
    200 HU disc filling ``box`` on the key slice, smaller on its neighbours."""
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    cx, cy, r = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2
    vol = np.stack([np.full((SIZE, SIZE), 40.0 + 10 * z) for z in range(SLICES)])
    for z in (key - 1, key, key + 1):
        vol[z][(xx - cx) ** 2 + (yy - cy) ** 2 < (r * (1.0 if z == key else 0.7)) ** 2] = 200.0
    return vol


def write_my_ct(ext, root):
    """The page's format, its example entry's spacings: 4 train and 2 test cases p001..p006, one
    lesion each (on slice 1, 2 or 3), written with the page's write_slices."""
    example = json.loads(next(body for lang, body in doc_blocks() if lang == "json"))[0]
    rng = np.random.default_rng(0)
    cases = []
    for k in range(6):
        key, r = 1 + k % 3, float(rng.uniform(7, 11))
        cx, cy = rng.uniform(20, 44, size=2)
        box = [cx - r, cy - r, cx + r, cy + r]
        case_id = f"p{k + 1:03d}"
        ext.write_slices(hu_volume(key, box), os.path.join(root, "slices", case_id))
        cases.append(
            dict(
                example,
                id=case_id,
                split="train" if k < 4 else "test",
                num_slices=SLICES,
                lesions=[{"slice": key, "box": box}],
            )
        )
    with open(os.path.join(root, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f)
    return cases


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """The page followed in a temporary folder (the working directory while the module runs)."""
    tmp = tmp_path_factory.mktemp("extending")
    files = {}
    runnable = []
    for lang, body in doc_blocks():
        header = FILE_HEADER.match(body.splitlines()[0])
        if header:
            files[header.group(1)] = files.get(header.group(1), "") + body + "\n"
        elif lang == "python":
            runnable.append(body)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    os.symlink(os.path.join(REPO, "configs"), tmp / "configs")  # the commands name configs/...
    datasets = set(DatasetCatalog.list())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(tmp / "datasets"))
        mp.chdir(tmp)
        mp.syspath_prepend(str(tmp))
        try:
            module = importlib.import_module("my_extension")
            for k, body in enumerate(runnable):
                exec(compile(body, f"{DOC}, python block {k}", "exec"), {"__name__": "doc"})
            module.cases = write_my_ct(module, module.MY_CT)
            module.deeplesion_root = write_tiny_deeplesion(str(tmp / "datasets" / "MyLesions"))
            module.files, module.tmp = files, tmp
            yield module
        finally:
            for name in set(DatasetCatalog.list()) - datasets:
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            if SPACE in SEARCH_SPACES:
                unregister_search_space(SPACE)
            if OP in alb_op_names():
                unregister_alb_op(OP)
            for name in ("my_extension", "my_train_net", "my_search_net", "my_predict_net"):
                sys.modules.pop(name, None)


def test_the_page_has_its_files_and_the_scripts_wrap_the_entry_points(ext):
    from elixir_d2.commands import search, train

    import predict_net

    assert set(ext.files) == {
        "my_extension.py",
        "my_train_net.py",
        "my_search_net.py",
        "my_predict_net.py",
        "conv3_genotype.yaml",
    }
    assert importlib.import_module("my_train_net").cli is train.cli
    assert importlib.import_module("my_search_net").cli is search.cli
    assert importlib.import_module("my_predict_net").predict_net is predict_net
    assert get_search_space(SPACE) == SPACE_OPS and OP in alb_op_names()
    # The built-in spaces are as they were.
    assert get_search_space("elixir") == SPACE_OPS[:-1] and len(get_search_space("darts")) == 8


def test_the_new_op_passes_check_alb_op_and_maps_shapes_as_a_head_needs(ext):
    check_alb_op(OP)
    x = torch.randn(5, 8, 7, 6)
    assert build_op(OP, 8, 12, 2, "GN")(x, [3, 2]).shape == (5, 12, 4, 3)  # ceil(7/2), ceil(6/2)
    assert build_op(OP, 8, 8, 1, "")(x, None).shape == (5, 8, 7, 6)


def _search_head():
    torch.manual_seed(0)
    return ALBSearchHead(
        ShapeSpec(channels=16, height=7, width=7),
        space=SPACE,
        channels=4,
        stem_channels=16,
        norm="BN",
    )


def test_a_searchable_head_of_the_new_space_runs_the_op_on_every_edge(ext):
    head = _search_head()
    col = SPACE_OPS.index(OP)
    assert head.op_names == SPACE_OPS and head.alpha_normal.shape == (14, 10)
    edges = edge_inputs(4)
    for kind, block in zip(head.block_types, head.blocks):
        assert len(block.mixed_ops) == len(edges) == 14
        for (_, j), mixed in zip(edges, block.mixed_ops):
            conv = mixed.ops[col]
            assert type(conv) is ext.Conv3x3
            stride = 2 if kind == "reduce" and j < 2 else 1  # ALB_r edges leaving the inputs
            assert conv.conv.stride == (stride, stride)
    x = torch.randn(5, 16, 7, 7)
    features, _ = head(x, [3, 2])
    # P = branches x D of the last block: D = 4, doubled by each of the two ALB_r.
    assert features.shape == (5, 4 * 4 * 2 * 2)
    features.square().mean().backward()
    assert head.alpha_normal.grad[:, col].abs().min() > 0
    assert head.alpha_reduce.grad[:, col].abs().min() > 0
    assert all(
        m.conv.weight.grad.abs().sum() > 0 for m in head.modules() if isinstance(m, ext.Conv3x3)
    )


def _train_step(head, x, counts):
    """One SGD step of ``head`` (+ a linear read-out) on a fixed target; the loss before, and
    whether every Conv3x3 weight moved."""
    from my_extension import Conv3x3

    readout = torch.nn.Linear(head.output_shape.channels, 1)
    params = list(head.parameters()) + list(readout.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    convs = [m.conv.weight for m in head.modules() if isinstance(m, Conv3x3)]
    before = [w.detach().clone() for w in convs]
    loss = (readout(head(x, counts)[0]).squeeze(1) - torch.arange(len(x)).float()).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), all(not torch.equal(w, b) for w, b in zip(convs, before))


def test_genotypes_that_use_the_op_build_heads_holding_it_and_train(ext, tmp_path):
    head = _search_head()
    with torch.no_grad():  # alphas that favour the new op on every edge
        for alpha in head.arch_parameters():
            alpha[:, SPACE_OPS.index(OP)] = 3.0
    derived = head.genotype()
    assert derived == derive_genotype(head.alpha_normal, head.alpha_reduce, SPACE, 4)
    assert {op for op, _ in derived.normal + derived.reduce} == {OP} and derived.space == SPACE
    save_genotype(derived, str(tmp_path / "derived.yaml"))
    assert load_genotype(str(tmp_path / "derived.yaml")) == derived

    hand = load_genotype("conv3_genotype.yaml")  # the page's hand-written genotype
    assert hand.space == SPACE
    for genotype in (derived, hand):
        alb = ALBHead(
            ShapeSpec(channels=16, height=7, width=7),
            genotype=genotype,
            channels=4,
            stem_channels=16,
            norm="BN",
        )
        # One ALB and two ALB_r: the op's pairs in "normal" once, those in "reduce" twice.
        expected = sum(op == OP for op, _ in genotype.normal) + 2 * sum(
            op == OP for op, _ in genotype.reduce
        )
        assert sum(isinstance(m, ext.Conv3x3) for m in alb.modules()) == expected > 0
        loss, moved = _train_step(alb, torch.randn(5, 16, 7, 7), [3, 2])
        assert np.isfinite(loss) and moved


def test_random_genotypes_of_the_new_space_draw_its_ops(ext):
    samples = [sample_random_genotype(SPACE, 4, seed=s) for s in range(30)]
    drawn = {op for g in samples for op, _ in g.normal + g.reduce}
    assert drawn == set(SPACE_OPS) - {"none"}  # all 9 real ops, the new one included
    assert all(g.space == SPACE for g in samples)


def test_the_random_command_through_the_wrapper_script(ext):
    """The page's --random command as a command line: only my_search_net.py's import of
    my_extension makes the space known to that process."""
    argv = next(c for c in doc_commands() if "--random" in c)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        DETECTRON2_DATASETS=str(ext.tmp / "datasets"),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=ext.tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = argv[argv.index("OUTPUT_DIR") + 1]
    seed = int(argv[argv.index("SEED") + 1])
    written = load_genotype(os.path.join(ext.tmp, out, "genotype.yaml"))
    assert written == sample_random_genotype(SPACE, 4, seed=seed)


def test_deeplesion_layout_under_a_new_prefix(ext):
    root = ext.deeplesion_root
    names = [f"mylesions_{s}" for s in ("train", "val", "test", "val_typed", "test_typed")]
    for name in names:
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "lesion" and meta.dataset_root == root
    train = DatasetCatalog.get("mylesions_train")
    assert train == load_deeplesion_dicts(root, "train") and len(train) == 4
    mapped = CTDatasetMapper(build_cfg(["INPUT.MAX_IMAGE_SIZE", "512"]), is_train=False)(train[0])
    # 2 mm pixels resampled to the quickstart's 0.75 mm: 64 px -> round(64 * 2 / 0.75) = 171.
    assert mapped["image"].shape == (3, 171, 171)


def _windowed(hu):
    return (hu - WINDOW[0]) * 255.0 / (WINDOW[1] - WINDOW[0])


def test_own_format_records_and_what_the_mapper_makes_of_them(ext):
    for split, cases in (("train", ext.cases[:4]), ("test", ext.cases[4:])):
        records = DatasetCatalog.get(f"my_ct_{split}")
        assert MetadataCatalog.get(f"my_ct_{split}").evaluator_type == "lesion"
        assert [r["image_id"] for r in records] == list(range(len(cases)))
        for record, case in zip(records, cases):
            key = case["lesions"][0]["slice"]
            assert (record["height"], record["width"], record["slice_idx"]) == (SIZE, SIZE, key)
            assert record["slice_range"] == (0, SLICES - 1)
            assert record["annotations"][0]["bbox"] == case["lesions"][0]["box"]
    case = ext.cases[0]
    px_mm, intv_mm = case["pixel_spacing_mm"], case["slice_interval_mm"]
    assert (px_mm, intv_mm) == (0.7, 2.5)  # the page's example: resampled and interpolated
    cfg = build_cfg(MY_CT)
    record = DatasetCatalog.get("my_ct_train")[0]
    key = record["slice_idx"]
    image = CTDatasetMapper(cfg, is_train=False)(record)["image"]
    side = round(SIZE * px_mm / cfg.INPUT.NORM_SPACING_MM)  # 64 px of 0.7 mm at 0.75 mm: 60
    assert image.shape == (3, side, side)
    # The corner holds background only, 40 + 10 z HU on slice z (linear in z, so the interpolated
    # neighbours 2 mm = 0.8 slice below and above the key are 40 + 10 (key -+ 0.8) HU).
    expected = [_windowed(40.0 + 10 * (key + o / intv_mm)) for o in (-2.0, 0.0, 2.0)]
    np.testing.assert_allclose(image[:, 0, 0].numpy(), expected, rtol=1e-5)
    train = CTDatasetMapper(cfg, is_train=True, flip_prob=0.0)(record)["instances"]
    # the 192 px lesion crop holds the whole slice: the box only follows the resampling
    np.testing.assert_allclose(
        train.gt_boxes.tensor.numpy(),
        [np.multiply(record["annotations"][0]["bbox"], side / SIZE)],
        atol=1e-3,
    )


def test_lesion_evaluator_on_the_own_format_hand_worked(ext):
    """Test images A and B, one lesion each. Ranked: FP (A, 0.9), FP (A, 0.85), hit (A, 0.8), hit
    (B, 0.5): the curve is (0, 0), (0.5, 0), (1, 1) in FPs per image, so the sensitivity is 0 at
    0.5 FPs per image, 100% from 1 on, and the mean over 0.5, 1, 2, 4 is 75%."""
    records = DatasetCatalog.get("my_ct_test")
    a, b = (r["annotations"][0]["bbox"] for r in records)
    preds = [([[0, 0, 4, 4], [60, 60, 64, 64], a], [0.9, 0.85, 0.8]), ([b], [0.5])]
    evaluator = LesionEvaluator("my_ct_test", None, distributed=False)
    evaluator.reset()
    for record, (boxes, scores) in zip(records, preds):
        inst = Instances(
            (SIZE, SIZE),
            pred_boxes=Boxes(torch.tensor(boxes)),
            scores=torch.tensor(scores),
            pred_classes=torch.zeros(len(scores), dtype=torch.int64),
        )
        evaluator.process([record], [{"instances": inst}])
    m = evaluator.evaluate()["lesion"]
    for crit in ("iou", "iobb"):
        assert m[f"sens@0.5_{crit}"] == 0.0
        assert [m[f"sens@{f}_{crit}"] for f in (1, 2, 3, 4, 6, 8)] == [100.0] * 6
        assert m[f"mean_sens_{crit}"] == 75.0
    assert (m["num_images"], m["num_lesions"]) == (2.0, 2.0)


def _run(argv, *extra):
    """The page's command ``argv`` through its wrapper script, in this process, opts added."""
    module = importlib.import_module(os.path.splitext(argv[1])[0])
    if argv[1] == "my_predict_net.py":
        assert module.predict_net.main([*argv[2:], *extra]) == 0
    else:
        module.cli([*argv[2:], *TINY, *extra])


def _out(argv):
    return argv[argv.index("OUTPUT_DIR") + 1]


def test_the_pages_commands_search_train_predict_and_evaluate(ext):
    search, from_search, random_cmd, by_hand, predict, fpn = doc_commands()
    assert [c[1] for c in (search, from_search, by_hand, predict, fpn)] == [
        "my_search_net.py",
        "my_train_net.py",
        "my_train_net.py",
        "my_predict_net.py",
        "my_train_net.py",
    ]
    assert "--random" in random_cmd and "conv3_genotype.yaml" in by_hand
    _run(search, *MY_CT, "MODEL.WEIGHTS", "")  # no trained FPN here: random frozen parts
    searched = load_genotype(os.path.join(_out(search), "genotype.yaml"))
    assert searched.space == SPACE
    with open(os.path.join(_out(search), "alphas.json"), encoding="utf-8") as f:
        assert json.load(f)["ops"] == SPACE_OPS
    # Trained from the searched genotype (1 step, no evaluation), then from the hand-written one.
    _run(from_search, *MY_CT, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1")
    ckpt = torch.load(os.path.join(_out(from_search), "model_final.pth"), weights_only=False)
    assert ckpt["alb_genotype"] == searched.to_dict()
    for argv in (by_hand, fpn):
        _run(argv, *MY_CT, "SOLVER.MAX_ITER", "2")
        with open(
            os.path.join(_out(argv), "inference", "my_ct_test", "lesion_metrics.json"),
            encoding="utf-8",
        ) as f:
            metrics = json.load(f)
        assert metrics["counts"]["num_images"] == 2 and metrics["counts"]["num_lesions"] == 2
        assert all(0.0 <= metrics["metrics"][f"sens@{f}_iou"] <= 100.0 for f in (0.5, 1, 4, 8))
    ckpt = torch.load(os.path.join(_out(by_hand), "model_final.pth"), weights_only=False)
    hand = yaml.safe_load(ext.files["conv3_genotype.yaml"])
    assert ckpt["alb_genotype"] == {k: hand[k] for k in ("space", "branches", "normal", "reduce")}
    # Only a Conv3x3 has a "conv" of its own among the ops (the built-in convs are "convs.k"):
    # the checkpoint holds one per pair of the op, in one ALB and two ALB_r.
    n_conv = sum(op == OP for op, _ in hand["normal"]) + 2 * sum(
        op == OP for op, _ in hand["reduce"]
    )
    conv = re.compile(r"roi_heads\.box_head\.blocks\.\d+\.ops\.\d+\.conv\.weight")
    assert sum(bool(conv.fullmatch(k)) for k in ckpt["model"]) == n_conv == 6
    # Prediction takes the genotype (space elixir_conv3) from that checkpoint.
    _run(predict)
    out = predict[predict.index("--output") + 1]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["failed"] == [] and len(summary["cases"]) == 1
    case = summary["cases"][0]
    spacing = float(predict[predict.index("--spacing") + 1])
    side = round(SIZE * spacing / 0.75)  # resampled to the quickstart's 0.75 mm: 60 px
    assert (case["case"], case["slices"], case["model_input_size"]) == (
        "p001",
        SLICES,
        [[side, side]],
    )
