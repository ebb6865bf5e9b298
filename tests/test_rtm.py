"""Tests of the Relation Transfer Module (rtm.py), its wiring in ElixirROIHeads, the fine-tuning
freeze (MODEL.FREEZE_MODULES), the Table 4 printer and the quickstart protocol end to end:
binary train -> RTM fine-tune (frozen backbone / proposal generator) -> typed evaluation."""

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.engine import default_argument_parser
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from elixir_d2 import load_config
from elixir_d2.checkpoint import AtomicCheckpointer
from elixir_d2.evaluation import format_type_table
from elixir_d2.modeling.alb.ops import RegionNonLocal
from elixir_d2.modeling.freeze import freeze_modules
from elixir_d2.modeling.roi_heads import ElixirROIHeads, _binary_targets, rtm_output_mode
from elixir_d2.modeling.rtm import RelationTransferModule, semantic_embeddings
from elixir_d2.trainer import ElixirTrainer

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTM_QS = "configs/quickstart/elixirnet_rtm_finetune.yaml"
SMALL = [
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "40",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "30",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "24",
]


def _cfg(path, *opts):
    return load_config(
        os.path.join(REPO, path), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts]
    )


def _predictor(channels, num_classes):
    return FastRCNNOutputLayers(
        ShapeSpec(channels=channels),
        num_classes=num_classes,
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
    )


def _rtm(p=6, e=4, types=3, own=None):
    torch.manual_seed(0)
    rtm = RelationTransferModule(
        feature_dim=p, embed_dim=e, predictor=_predictor(p + e, types), relation_channels=own
    )
    binary = _predictor(p, 1)
    with torch.no_grad():  # detectron2 initialises the classifier near zero: make it informative
        binary.cls_score.weight.normal_()
        binary.cls_score.bias.copy_(torch.tensor([0.3, -0.2]))
        rtm.predictor.cls_score.weight.normal_()
    return rtm, binary


def _expected_f_e(f, binary, w_e, relations):
    """Hand computation of E Gamma M W_E, RoI by RoI."""
    w, b = binary.cls_score.weight.detach(), binary.cls_score.bias.detach()
    rows, start = [], 0
    for e in relations:
        n = e.shape[0]
        nodes = []
        for j in range(start, start + n):
            s = [float(f[j] @ w[c] + b[c]) for c in range(2)]
            g = [math.exp(v) / (math.exp(s[0]) + math.exp(s[1])) for v in s]
            m = [torch.cat([w[c], b[c : c + 1]]) for c in range(2)]
            nodes.append((g[0] * m[0] + g[1] * m[1]) @ w_e.detach())
        for i in range(n):
            rows.append(sum(float(e[i, j]) * nodes[j] for j in range(n)))
        start += n
    return torch.stack(rows)


def test_identity_relations_reduce_to_gamma_m_w_e_and_shapes():
    rtm, binary = _rtm()
    f = torch.randn(5, 6)
    eye = [torch.eye(2), torch.eye(3)]
    f_e = rtm.transfer(f, binary, eye)
    assert f_e.shape == (5, 4)
    torch.testing.assert_close(f_e, _expected_f_e(f, binary, rtm.w_e, eye), rtol=1e-5, atol=1e-5)
    scores, deltas = rtm(f, binary, eye)
    assert scores.shape == (5, 4) and deltas.shape == (5, 12)  # 3 types + background; 3 x 4
    ref = torch.cat([f, f_e], 1) @ rtm.predictor.cls_score.weight.t() + rtm.predictor.cls_score.bias
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-5)
    m = semantic_embeddings(binary)
    assert m.shape == (2, 7) and not m.requires_grad
    torch.testing.assert_close(m[:, -1], binary.cls_score.bias.detach())


def test_relations_are_per_image():
    rtm, binary = _rtm()
    f = torch.randn(5, 6)
    e1 = torch.softmax(torch.randn(2, 2), 1)
    e2 = torch.softmax(torch.randn(3, 3), 1)
    f_e = rtm.transfer(f, binary, [e1, e2])
    torch.testing.assert_close(
        f_e, _expected_f_e(f, binary, rtm.w_e, [e1, e2]), rtol=1e-5, atol=1e-5
    )
    # Another second image changes nothing in the first one's f_E.
    g = f.clone()
    g[2:] = 3.0 * torch.randn(3, 6)
    torch.testing.assert_close(rtm.transfer(g, binary, [e1, e2])[:2], f_e[:2])
    with pytest.raises(ValueError, match="num_per_image"):
        rtm.transfer(f, binary, [e1, torch.eye(2)])  # 4 RoIs of relations for 5 features
    # RTM's own E (no region_nonlocal in the head): region_nonlocal's rule, image by image.
    own, _ = _rtm(own=8)
    pooled = torch.randn(5, 8, 7, 7)
    rel = own.own_relations(pooled, [2, 3])
    phi = F.relu(pooled.mean(dim=(2, 3)) @ own.phi.weight.t() + own.phi.bias)
    assert [tuple(e.shape) for e in rel] == [(2, 2), (3, 3)]
    torch.testing.assert_close(rel[1], torch.softmax(phi[2:] @ phi[2:].t(), 1))
    assert torch.allclose(rel[0].sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="head must provide E"):
        rtm.own_relations(pooled, [2, 3])


def test_m_gets_no_gradient_w_e_does():
    rtm, binary = _rtm()
    f = torch.randn(5, 6, requires_grad=True)
    e = [torch.softmax(torch.randn(2, 2), 1), torch.softmax(torch.randn(3, 3), 1)]
    scores, deltas = rtm(f, binary, e)
    (scores.square().sum() + deltas.sum()).backward()
    assert binary.cls_score.weight.grad is None and binary.cls_score.bias.grad is None
    assert rtm.w_e.grad is not None and rtm.w_e.grad.abs().sum() > 0
    assert f.grad.abs().sum() > 0


def test_binary_targets_map_every_type_to_lesion():
    p = Instances(
        (10, 10),
        proposal_boxes=Boxes(torch.zeros(4, 4)),
        gt_classes=torch.tensor([0, 7, 8, 3]),
        gt_boxes=Boxes(torch.ones(4, 4)),
    )
    (q,) = _binary_targets([p], num_classes=8)
    assert q.gt_classes.tolist() == [0, 0, 1, 0]
    assert p.gt_classes.tolist() == [0, 7, 8, 3]  # the typed targets are left as they were
    assert q.gt_boxes is p.gt_boxes


def _images(n=2, size=64, classes=(2, 5)):
    torch.manual_seed(0)
    ims = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[8.0 + 4 * i, 10.0, 30.0, 28.0 + 2 * i]]))
        inst.gt_classes = torch.tensor([classes[i % len(classes)]])
        ims.append(
            {
                "image": torch.rand(3, size, size) * 255,
                "instances": inst,
                "height": size,
                "width": size,
            }
        )
    return ims


def test_roi_heads_use_the_alb_relations_and_train_through_them():
    model = build_model(_cfg(RTM_QS, *SMALL))
    heads = model.roi_heads
    assert isinstance(heads, ElixirROIHeads) and not heads.rtm.has_own_relations  # E: the ALB's
    assert heads.box_predictor.num_classes == 1 and heads.rtm.predictor.num_classes == 8
    assert heads.rtm.w_e.shape == (257, 128)  # (P+1) x E with P = 256 in the quickstart head
    seen, head_relations = [], []
    heads.rtm.register_forward_hook(lambda m, args, out: seen.append(args[2]))
    heads.box_head.register_forward_hook(lambda m, args, out: head_relations.append(out[1]))
    with EventStorage(0):
        losses = model(_images())
    assert {"loss_cls", "loss_box_reg", "loss_cls_binary", "loss_box_reg_binary"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # The very E of the ALB's region_nonlocal in this forward, one per image.
    assert len(seen[0]) == 2 and all(a is b for a, b in zip(seen[0], head_relations[0]))
    # RTM's multi-type loss alone reaches the ALB's relation embedding phi (E kept in the graph),
    # and never the binary classifier.
    losses["loss_cls"].backward()
    nonlocal_op = [m for m in heads.box_head.blocks[0].modules() if isinstance(m, RegionNonLocal)][
        0
    ]
    assert nonlocal_op.phi.weight.grad.abs().sum() > 0
    assert heads.box_predictor.cls_score.weight.grad is None


def test_rtm_inference_outputs_and_binary_scores():
    rtm, binary = _rtm(p=6, e=4, types=3)
    heads = ElixirROIHeads.__new__(ElixirROIHeads)  # the inference step alone, no full model
    torch.nn.Module.__init__(heads)
    heads.rtm, heads.box_predictor = rtm, binary
    rtm.predictor.test_score_thresh, rtm.predictor.test_topk_per_image = 0.5, 10
    props = [
        Instances(
            (50, 50),
            proposal_boxes=Boxes(
                torch.tensor(
                    [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 30.0, 15.0, 40.0]]
                )
            ),
        )
    ]
    typed_scores = torch.tensor(
        [
            [float("nan"), 0.0, 0.0, 0.0],  # dropped: non-finite
            [0.0, 0.0, 9.0, 0.0],  # type 2
            [8.0, 0.0, 0.0, 0.0],
        ]
    )  # type 0
    binary_scores = torch.tensor([[0.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    with rtm_output_mode(heads, "typed"):
        (inst,) = heads._rtm_inference(
            (binary_scores, torch.zeros(3, 4)), (typed_scores, torch.zeros(3, 12)), props
        )
    assert inst.rtm_typed.dtype == torch.bool and inst.rtm_typed.tolist() == [True, True]
    order = inst.pred_classes.tolist()
    assert sorted(order) == [0, 2] and inst.pred_types.tolist() == order
    expected = {2: 1 / (1 + math.exp(-2.0)), 0: 1 / (1 + math.exp(1.0))}  # softmax over 2 = sigmoid
    for c, s in zip(order, inst.pred_binary_scores.tolist()):
        assert s == pytest.approx(expected[c], rel=1e-5)
    type_prob = {2: math.exp(9) / (math.exp(9) + 3), 0: math.exp(8) / (math.exp(8) + 3)}
    assert inst.scores.tolist() == pytest.approx([type_prob[c] for c in order], rel=1e-5)


@pytest.mark.parametrize(
    "binary_config,rtm_config",
    [
        ("configs/quickstart/trpn.yaml", "configs/quickstart/ablation/trpn_rtm.yaml"),
        ("configs/quickstart/elixirnet.yaml", RTM_QS),
    ],
)
def test_rtm_binary_output_equals_the_binary_model_with_the_same_weights(binary_config, rtm_config):
    # An RTM model holding the binary model's weights (RTM's own parameters new) must give, in
    # its binary output, exactly the binary model's detections: the same binary predictor on the
    # same head features. The multi-type regressor is made far from the identity so that boxes
    # taken from it (the old binary output: 46.02 -> 42.04 at 3 FPs on synthetic_test before any
    # fine-tuning) cannot pass.
    torch.manual_seed(0)
    binary = build_model(_cfg(binary_config, *SMALL)).eval()
    rtm = build_model(_cfg(rtm_config, *SMALL)).eval()
    missing, unexpected = rtm.load_state_dict(binary.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("roi_heads.rtm.") for k in missing)
    with torch.no_grad():
        rtm.roi_heads.rtm.predictor.bbox_pred.weight.normal_(std=0.05)
        binary.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.05)  # non-trivial boxes
        rtm.roi_heads.box_predictor.load_state_dict(binary.roi_heads.box_predictor.state_dict())
        assert rtm.roi_heads.rtm_output == "binary"
        ims = _images()
        expected, got = binary(ims), rtm(ims)
    for e, g in zip(expected, got):
        e, g = e["instances"], g["instances"]
        assert len(e) > 0
        torch.testing.assert_close(g.pred_boxes.tensor, e.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(g.scores, e.scores, rtol=0, atol=0)
        assert torch.equal(g.pred_binary_scores, g.scores)
        assert g.pred_types.shape == g.pred_classes.shape == (len(g),)
        assert 0 <= int(g.pred_types.min()) and int(g.pred_types.max()) < 8


def test_rtm_output_mode_is_scoped_and_restored_even_after_an_exception():
    torch.manual_seed(0)
    model = build_model(_cfg(RTM_QS, *SMALL)).eval()
    heads = model.roi_heads
    assert heads.rtm_output == "binary"  # the default
    with pytest.raises(AttributeError):
        heads.rtm_output = "typed"  # read-only: only rtm_output_mode switches it
    with rtm_output_mode(model, "typed"):
        assert heads.rtm_output == "typed"
        with rtm_output_mode(model, "binary"):  # nested blocks restore their own entry mode
            assert heads.rtm_output == "binary"
        assert heads.rtm_output == "typed"
    assert heads.rtm_output == "binary"
    with pytest.raises(RuntimeError, match="inside the block"):
        with rtm_output_mode(model, "typed"):
            raise RuntimeError("inside the block")
    assert heads.rtm_output == "binary"
    with pytest.raises(ValueError, match="one of \\('binary', 'typed'\\)"):
        with rtm_output_mode(model, "per_type"):
            pass
    assert heads.rtm_output == "binary"
    plain = build_model(_cfg("configs/quickstart/elixirnet.yaml", *SMALL))
    with pytest.raises(ValueError, match="no ROI heads with RTM"):
        with rtm_output_mode(plain, "typed"):
            pass


def test_rtm_detections_carry_the_mode_they_were_produced_in():
    # The same model and images in both modes: binary output scores by the lesion probability
    # (scores == pred_binary_scores, one box per proposal), typed output by the per-type softmax
    # with pred_classes = the type index; each detection's rtm_typed says which.
    torch.manual_seed(0)
    model = build_model(_cfg(RTM_QS, *SMALL, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")).eval()
    ims = _images()
    with torch.no_grad():
        binary = [o["instances"] for o in model(ims)]
        with rtm_output_mode(model, "typed"):
            typed = [o["instances"] for o in model(ims)]
    for b, t in zip(binary, typed):
        assert len(b) > 0 and len(t) > 0
        assert not b.rtm_typed.any() and t.rtm_typed.all()
        assert torch.equal(b.scores, b.pred_binary_scores)
        assert torch.equal(t.pred_classes, t.pred_types)
        assert int(t.pred_classes.max()) < model.roi_heads.rtm.predictor.num_classes
        # Per-type probabilities are not the binary lesion probabilities of their proposals.
        assert not torch.allclose(t.scores, t.pred_binary_scores)


def test_trainer_test_runs_each_split_in_its_mode_and_restores_it(monkeypatch):
    """ElixirTrainer.test: typed output on a typed split, binary on an untyped one, each chosen
    through rtm_output_mode; the model is back in its mode after the run and after a failed one."""
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultTrainer

    MetadataCatalog.get("rtm_mode_untyped").set(thing_classes=["lesion"])
    MetadataCatalog.get("rtm_mode_typed").set(thing_classes=[f"t{i}" for i in range(8)])
    model = build_model(_cfg(RTM_QS, *SMALL))
    seen = []

    def fake_test(cfg, model, evaluators=None):
        seen.append((cfg.DATASETS.TEST[0], model.roi_heads.rtm_output))
        if cfg.DATASETS.TEST[0] == "rtm_mode_fail":
            raise RuntimeError("evaluation failed")
        return {"lesion": {}}

    monkeypatch.setattr(DefaultTrainer, "test", staticmethod(fake_test))
    cfg = _cfg(RTM_QS, "DATASETS.TEST", "('rtm_mode_untyped', 'rtm_mode_typed')")
    results = ElixirTrainer._test_rtm_per_split(cfg, model)
    assert seen == [("rtm_mode_untyped", "binary"), ("rtm_mode_typed", "typed")]
    assert list(results) == ["rtm_mode_untyped", "rtm_mode_typed"]
    assert model.roi_heads.rtm_output == "binary"
    MetadataCatalog.get("rtm_mode_fail").set(thing_classes=[f"t{i}" for i in range(8)])
    cfg = _cfg(RTM_QS, "DATASETS.TEST", "('rtm_mode_untyped', 'rtm_mode_fail')")
    with pytest.raises(RuntimeError, match="evaluation failed"):
        ElixirTrainer._test_rtm_per_split(cfg, model)
    assert seen[-2:] == [("rtm_mode_untyped", "binary"), ("rtm_mode_fail", "typed")]
    assert model.roi_heads.rtm_output == "binary"


def test_config_errors():
    with pytest.raises(ValueError, match="NUM_TYPES"):
        build_model(_cfg(RTM_QS, "MODEL.ROI_HEADS.NUM_CLASSES", "1"))
    model = build_model(_cfg("configs/quickstart/fpn.yaml"))
    with pytest.raises(
        ValueError, match="MODEL.FREEZE_MODULES: 'backbone.nope'.*proposal_generator"
    ):
        freeze_modules(model, ["backbone.nope"])
    # A plain 2-fc head has no region_nonlocal: RTM computes E itself from the pooled RoIs.
    own = build_model(
        _cfg(
            "configs/quickstart/fpn.yaml",
            "MODEL.ROI_HEADS.NAME",
            "ElixirROIHeads",
            "MODEL.RTM.ENABLED",
            "True",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "8",
            *SMALL,
        )
    )
    assert own.roi_heads.rtm.phi.in_features == 64  # quickstart FPN channels
    with EventStorage(0):
        losses = own(_images())
    assert all(torch.isfinite(v) for v in losses.values())


def test_frozen_parts_do_not_change_with_batchnorm():
    # BatchNorm in backbone and FPN: frozen statistics must hold in train mode too.
    cfg = _cfg(
        RTM_QS,
        *SMALL,
        "MODEL.RESNETS.NORM",
        "BN",
        "MODEL.FPN.NORM",
        "BN",
        "SOLVER.BASE_LR",
        "0.05",
        "SOLVER.WEIGHT_DECAY",
        "0.01",
    )
    model = ElixirTrainer.build_model(cfg)
    frozen = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.startswith(("backbone.", "proposal_generator."))
    }
    assert any("running_mean" in k for k in frozen)
    head = {k: v.clone() for k, v in model.roi_heads.named_parameters()}
    optimizer = build_optimizer(cfg, model)
    model.train()
    with EventStorage(0):
        for _ in range(2):
            loss = sum(model(_images()).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    changed = [k for k, p in model.roi_heads.named_parameters() if not torch.equal(p, head[k])]
    assert any(k.startswith("rtm.") for k in changed) and any(
        k.startswith("box_head.") for k in changed
    )


def _capture(logger_name):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return records, lambda: logger.removeHandler(handler)


def test_binary_checkpoint_into_typed_models_is_reported(tmp_path):
    binary = build_model(_cfg("configs/quickstart/elixirnet.yaml"))
    path = str(tmp_path / "binary.pth")
    torch.save({"model": binary.state_dict()}, path)
    records, done = _capture("fvcore.common.checkpoint")
    try:
        wo = build_model(_cfg("configs/quickstart/elixirnet_wo_rtm_finetune.yaml"))
        AtomicCheckpointer(wo).load(path)
        rtm = build_model(_cfg(RTM_QS))
        AtomicCheckpointer(rtm).load(path)
    finally:
        done()
    text = "\n".join(r.getMessage() for r in records)
    # New 8-type predictor: the 2-class weights are skipped for their shape, and said so.
    assert "Skip loading parameter 'roi_heads.box_predictor.cls_score.weight'" in text
    assert "roi_heads.box_predictor.bbox_pred.weight" in text
    assert "roi_heads.rtm" in text  # RTM's new parameters are reported missing
    ref = binary.state_dict()
    # RTM keeps the binary predictor: loaded as is. Shared parts load in both models.
    torch.testing.assert_close(
        rtm.roi_heads.box_predictor.cls_score.weight,
        ref["roi_heads.box_predictor.cls_score.weight"],
    )
    for model in (wo, rtm):
        torch.testing.assert_close(
            model.state_dict()["backbone.bottom_up.stem.conv1.weight"],
            ref["backbone.bottom_up.stem.conv1.weight"],
        )
    assert not torch.equal(
        wo.roi_heads.box_predictor.cls_score.weight[:2],
        ref["roi_heads.box_predictor.cls_score.weight"],
    )


def test_format_type_table():
    rows = {
        "FPN w finetune": {
            "sens@3_iou_bone": math.nan,
            "sens@3_iou_abdomen": 79.58,
            "sens@3_iou_soft_tissue": 57.961,
            "sens@3_iou_kidney": None,
        },
        "ElixirNet": {
            "metrics": {
                f"sens@3_iou_{t}": 50.0 + i
                for i, t in enumerate(
                    [
                        "bone",
                        "abdomen",
                        "mediastinum",
                        "liver",
                        "lung",
                        "kidney",
                        "soft_tissue",
                        "pelvis",
                    ]
                )
            }
        },
    }
    lines = format_type_table(rows).splitlines()
    assert lines[2] == "| Method | BN | AB | ME | LV | LU | KD | ST | PV |"
    assert lines[4] == "| FPN w finetune | - | 79.58 | - | - | - | - | 57.96 | - |"
    assert lines[5] == (
        "| ElixirNet | 50.00 | 51.00 | 52.00 | 53.00 | 54.00 | 55.00 | 56.00 | 57.00 |"
    )


@pytest.fixture(scope="module")
def tiny_typed_set(tmp_path_factory):
    from elixir_d2.data import register_deeplesion
    from elixir_d2.data.synthetic import generate_deeplesion

    root = str(tmp_path_factory.mktemp("rtm") / "synthetic")
    generate_deeplesion(
        root,
        num_patients=8,
        slices_per_series=(8, 10),
        keys_per_series=(1, 2),
        image_size=64,
        seed=5,
    )
    register_deeplesion(root, prefix="rtm_e2e")
    return root


def test_quickstart_binary_then_rtm_finetune_then_typed_eval(tiny_typed_set, tmp_path):
    import train_net

    def run(config, out, *opts, eval_only=False):
        args = default_argument_parser().parse_args(
            ["--config-file", os.path.join(REPO, config)]
            + ["--eval-only"] * eval_only
            + [
                "OUTPUT_DIR",
                str(out),
                "INPUT.MAX_IMAGE_SIZE",
                "96",
                "SOLVER.IMS_PER_BATCH",
                "2",
                "SOLVER.MAX_ITER",
                "3",
                "SOLVER.WARMUP_ITERS",
                "1",
                "SOLVER.STEPS",
                "()",
                "SOLVER.CHECKPOINT_PERIOD",
                "100",
                "MODEL.RPN.POST_NMS_TOPK_TRAIN",
                "64",
                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
                "32",
                *opts,
            ]
        )
        return train_net.main(args)

    binary_dir, rtm_dir = tmp_path / "binary", tmp_path / "rtm"
    run(
        "configs/quickstart/elixirnet.yaml",
        binary_dir,
        "DATASETS.TRAIN",
        "('rtm_e2e_train',)",
        "DATASETS.TEST",
        "()",
    )
    weights = binary_dir / "model_final.pth"
    run(
        RTM_QS,
        rtm_dir,
        "MODEL.WEIGHTS",
        str(weights),
        "DATASETS.TRAIN",
        "('rtm_e2e_val_typed',)",
        "DATASETS.TEST",
        "()",
    )
    res = run(
        RTM_QS,
        rtm_dir,
        "MODEL.WEIGHTS",
        str(rtm_dir / "model_final.pth"),
        "DATASETS.TEST",
        "('rtm_e2e_test_typed',)",
        eval_only=True,
    )
    lesion = res["lesion"]
    for t in ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft_tissue", "pelvis"):
        v = lesion[f"sens@3_iou_{t}"]
        assert math.isnan(v) or 0.0 <= v <= 100.0
    assert "AP_typed" in lesion
    log = (rtm_dir / "log.txt").read_text(encoding="utf-8")
    assert "| Method | BN | AB | ME | LV | LU | KD | ST | PV |" in log
    # Frozen parts bit-identical to the binary model; head (ALB + binary predictor) and RTM moved.
    before = torch.load(weights, weights_only=True)["model"]
    after = torch.load(rtm_dir / "model_final.pth", weights_only=True)["model"]
    frozen = [k for k in before if k.startswith(("backbone.", "proposal_generator."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    head = [
        k for k in before if k.startswith("roi_heads.box_head.") and before[k].is_floating_point()
    ]
    assert any(not torch.equal(before[k], after[k]) for k in head)
    assert not torch.equal(
        before["roi_heads.box_predictor.cls_score.weight"],
        after["roi_heads.box_predictor.cls_score.weight"],
    )
    assert any(k.startswith("roi_heads.rtm.") for k in after)
