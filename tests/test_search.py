"""ALB search (search_net.py, elixir_d2/search): halving, optimizer steps, frozen parts, random
genotypes, checkpoint / --resume, and search -> train_net.py -> evaluation end to end."""

import json
import math
import os
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from detectron2.engine import HookBase, default_argument_parser
from detectron2.utils.events import EventStorage

from elixir_d2.cli import MissingFileError
from elixir_d2.data import register_deeplesion
from elixir_d2.data.synthetic import generate_deeplesion
from elixir_d2.modeling.alb.genotype import derive_genotype, load_genotype
from elixir_d2.modeling.alb.spaces import DARTS_OPS, ELIXIR_OPS
from elixir_d2.search import (
    ALBSearcher,
    cosine_lr,
    halve_dataset,
    load_search_halves,
    sample_random_genotype,
)
from elixir_d2.search.step import search_loss

import search_net  # the repository root, on pytest's pythonpath

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PREFIX = "searchtest"
SEARCH_CFG = os.path.join(REPO, "configs/quickstart/search_alb.yaml")
# CPU-cheap: 64 px images, 2 images per step, 16 sampled RoIs per image.
SMALL = [
    "DATASETS.TRAIN",
    f"('{PREFIX}_train',)",
    "DATASETS.TEST",
    f"('{PREFIX}_test',)",
    "INPUT.MAX_IMAGE_SIZE",
    "64",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "100",
    "SEARCH.WARMUP_EPOCHS",
    "0",
]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("search") / "synthetic")
    generate_deeplesion(
        root,
        num_patients=6,
        slices_per_series=(6, 8),
        keys_per_series=(1, 2),
        image_size=64,
        seed=3,
    )
    register_deeplesion(root, prefix=PREFIX)
    return root


def _search_args(out_dir, *opts, resume=False, random=False):
    argv = (
        ["--config-file", SEARCH_CFG]
        + (["--resume"] if resume else [])
        + (["--random"] if random else [])
    )
    return search_net.build_parser().parse_args(argv + SMALL + ["OUTPUT_DIR", str(out_dir), *opts])


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- halving
def test_halving_is_deterministic_disjoint_and_covers_the_split():
    records = [{"image_id": i, "file_name": f"{i}.png"} for i in range(11)]
    w, a = halve_dataset(records, seed=5)
    w2, a2 = halve_dataset(list(records), seed=5)
    assert [r["image_id"] for r in w] == [r["image_id"] for r in w2]
    assert [r["image_id"] for r in a] == [r["image_id"] for r in a2]
    ids_w, ids_a = {r["image_id"] for r in w}, {r["image_id"] for r in a}
    assert not ids_w & ids_a and ids_w | ids_a == set(range(11))
    assert (len(w), len(a)) == (6, 5)
    # Other seeds give other halves (with 11 records, 462 possible halvings).
    others = {frozenset(r["image_id"] for r in halve_dataset(records, seed=s)[0]) for s in range(6)}
    assert len(others) > 1
    # The global RNG is not touched: the halving does not shift other random draws.
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    halve_dataset(records, seed=1)
    assert np.random.rand() == expected
    with pytest.raises(ValueError, match="at least 2"):
        halve_dataset(records[:1], seed=0)


def test_search_halves_of_the_registered_training_split(tiny_set):
    cfg = search_net.setup(_search_args(os.path.join(tiny_set, "..", "cfg_only")))
    from detectron2.data import DatasetCatalog

    train = DatasetCatalog.get(f"{PREFIX}_train")
    w, a = load_search_halves(cfg)
    assert sorted(r["image_id"] for r in w + a) == sorted(r["image_id"] for r in train)
    assert not {r["image_id"] for r in w} & {r["image_id"] for r in a}


# ---------------------------------------------------------------------------------- lr
def test_cosine_lr_matches_torch_cosine_annealing():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.02)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.0)
    for it in range(10):
        assert cosine_lr(0.02, it, 10) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        ref.step()
    assert cosine_lr(0.02, 0, 10) == 0.02 and cosine_lr(0.02, 10, 10) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------- random
def _check_structure(g, ops):
    for kind in ("normal", "reduce"):
        pairs = g.pairs(kind)
        for b in range(g.branches):
            (o1, i1), (o2, i2) = pairs[2 * b], pairs[2 * b + 1]
            assert i1 != i2 and 0 <= min(i1, i2) and max(i1, i2) <= b + 1
            assert o1 in ops and o2 in ops and "none" not in (o1, o2)


def test_random_genotype_valid_reproducible_and_uniform():
    g = sample_random_genotype("elixir", 4, seed=7)
    _check_structure(g, ELIXIR_OPS)
    assert sample_random_genotype("elixir", 4, seed=7) == g
    assert len({sample_random_genotype("elixir", 4, seed=s) for s in range(5)}) == 5
    d = sample_random_genotype("darts", 3, seed=1)
    assert d.space == "darts" and len(d.normal) == 6
    _check_structure(d, DARTS_OPS)
    # Uniform: ops 1/8 each, and the 10 input pairs of the last branch (5 nodes) 1/10 each.
    n = 1500
    samples = [sample_random_genotype("elixir", 4, seed=1000 + s) for s in range(n)]
    ops = Counter(o for g in samples for o, _ in g.normal + g.reduce)
    assert set(ops) == set(ELIXIR_OPS) - {"none"}
    total = sum(ops.values())
    assert all(abs(c / total - 1 / 8) < 0.015 for c in ops.values())
    last = Counter((g.normal[6][1], g.normal[7][1]) for g in samples)
    assert set(last) == set(combinations(range(5), 2))
    assert all(abs(c / n - 0.1) < 0.03 for c in last.values())
    with pytest.raises(ValueError, match="branches"):
        sample_random_genotype("elixir", 0)
    with pytest.raises(ValueError, match="search space"):
        sample_random_genotype("nas", 4)


def test_random_flag_writes_a_usable_genotype(tmp_path):
    g = search_net.main(_search_args(tmp_path / "r1", "SEED", "11", random=True))
    written = load_genotype(str(tmp_path / "r1" / "genotype.yaml"))
    assert written == g == sample_random_genotype("elixir", 4, seed=11)
    assert "RANDOM" in open(tmp_path / "r1" / "genotype.yaml", encoding="utf-8").read()
    prov = yaml.safe_load(open(tmp_path / "r1" / "genotype.yaml", encoding="utf-8"))["provenance"]
    assert (
        prov["searched"] is False
        and "seed 11" in prov["method"]
        and prov["config"].endswith(".yaml")
    )
    g2 = search_net.main(_search_args(tmp_path / "r2", "SEED", "12", random=True))
    assert g2 != g
    assert not (tmp_path / "r1" / "alphas.json").exists()  # no search, nothing else written


# ---------------------------------------------------------------------------------- steps
def test_steps_touch_only_their_parameters_and_frozen_parts_stay(tiny_set, tmp_path):
    # BatchNorm in the frozen backbone and FPN, so frozen running statistics are checked too.
    cfg = search_net.setup(
        _search_args(
            tmp_path, "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "SEARCH.EPOCHS", "1"
        )
    )
    s = ALBSearcher(cfg)
    model, head = s.model, s.model.roi_heads.box_head
    frozen = {"backbone": model.backbone, "proposal_generator": model.proposal_generator}
    assert all(not p.requires_grad for m in frozen.values() for p in m.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    alpha_ids = {id(a) for a in head.arch_parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in alpha_ids]
    assert {id(p) for g in s.w_optimizer.param_groups for p in g["params"]} == {
        id(p) for p in weights
    }
    assert {id(p) for g in s.alpha_optimizer.param_groups for p in g["params"]} == alpha_ids
    assert isinstance(s.w_optimizer, torch.optim.SGD) and isinstance(
        s.alpha_optimizer, torch.optim.Adam
    )
    assert s.alpha_optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    assert s.alpha_optimizer.param_groups[0]["weight_decay"] == 1e-3
    assert s.w_optimizer.param_groups[0]["momentum"] == 0.9
    assert s.w_optimizer.param_groups[0]["weight_decay"] == 3e-4

    frozen0 = {k: _state(m) for k, m in frozen.items()}
    batch_w, batch_a = s.next_batches()
    with EventStorage():
        alphas0 = [a.detach().clone() for a in head.arch_parameters()]
        w0 = [p.detach().clone() for p in weights]
        s.w_step(batch_w)
        assert all(torch.equal(a, b) for a, b in zip(head.arch_parameters(), alphas0))
        assert sum(not torch.equal(p, q) for p, q in zip(weights, w0)) > len(weights) // 2

        w1 = [p.detach().clone() for p in weights]
        s.alpha_step(batch_a)
        assert all(torch.equal(p, q) for p, q in zip(weights, w1))
        assert all(not torch.equal(a, b) for a, b in zip(head.arch_parameters(), alphas0))
        # Adam's first step moves every alpha entry with a gradient by about lr.
        step = (head.alpha_normal - alphas0[0]).abs()
        assert step.max().item() == pytest.approx(s.cfg.SEARCH.ALPHA_LR, rel=0.05)

        # A full iteration through the trainer loop (model.train() each step) still keeps them.
        s.train()
    for k, m in frozen.items():
        assert _same(_state(m), frozen0[k]), f"{k} changed during the search"
    assert all(
        not m.training
        for part in frozen.values()
        for m in part.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )


def test_wrong_box_head_is_a_clear_error(tiny_set, tmp_path):
    cfg = search_net.setup(_search_args(tmp_path, "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"))
    with pytest.raises(ValueError, match="ALBSearchHead"):
        ALBSearcher(cfg)


def test_frozen_parts_are_initialised_from_model_weights(tiny_set, tmp_path, caplog):
    import logging

    from detectron2.modeling import build_model

    from elixir_d2.search import searcher as searcher_module

    # A "trained baseline": the quickstart FPN (2-fc head) with weights of its own.
    base = build_model(
        search_net.setup(
            search_net.build_parser().parse_args(
                [
                    "--config-file",
                    os.path.join(REPO, "configs/quickstart/fpn.yaml"),
                    "OUTPUT_DIR",
                    str(tmp_path / "base"),
                ]
            )
        )
    )
    # Perturbed: setup() reseeds, so an unloaded model could otherwise match by chance.
    full = {
        k: v + 0.25 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in base.state_dict().items()
    }
    torch.save({"model": full}, tmp_path / "baseline.pth")
    torch.save(
        {"model": {k: v for k, v in full.items() if k.startswith("backbone.")}},
        tmp_path / "backbone_only.pth",
    )

    logging.getLogger(searcher_module.__name__).addHandler(caplog.handler)
    try:
        s = ALBSearcher(
            search_net.setup(
                _search_args(tmp_path / "s1", "MODEL.WEIGHTS", str(tmp_path / "baseline.pth"))
            )
        )
        caplog.clear()
        s.resume_or_load(resume=False)
        assert "RANDOM" not in caplog.text
        for name in ("backbone", "proposal_generator"):
            state = getattr(s.model, name).state_dict()
            assert state and all(torch.equal(v, full[f"{name}.{k}"]) for k, v in state.items())
        # The 2-fc head's tensors do not fit the search head: it keeps its own initialisation.
        assert "roi_heads.box_head.fc1.weight" in full
        assert not any(k.startswith("roi_heads.box_head.fc") for k in s.model.state_dict())

        s = ALBSearcher(
            search_net.setup(
                _search_args(tmp_path / "s2", "MODEL.WEIGHTS", str(tmp_path / "backbone_only.pth"))
            )
        )
        caplog.clear()
        s.resume_or_load(resume=False)
        assert "proposal_generator tensors" in caplog.text and "RANDOM" in caplog.text
        assert "backbone tensors" not in caplog.text

        s = ALBSearcher(search_net.setup(_search_args(tmp_path / "s3")))
        caplog.clear()
        s.resume_or_load(resume=False)
        assert "MODEL.WEIGHTS is empty" in caplog.text
    finally:
        logging.getLogger(searcher_module.__name__).removeHandler(caplog.handler)


# ---------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


class _KillAt(HookBase):
    """Raises after iteration ``at``'s alphas.json entry, before its checkpoint (as a SIGKILL)."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise _Killed()


def test_resume_continues_from_the_last_checkpoint(tiny_set, tmp_path, monkeypatch):
    out = tmp_path / "run"
    build_hooks = ALBSearcher.build_hooks

    def killing_hooks(self):
        hooks = build_hooks(self)
        hooks.insert(hooks.index(self.recorder) + 1, _KillAt(1))
        return hooks

    monkeypatch.setattr(ALBSearcher, "build_hooks", killing_hooks)
    with pytest.raises(_Killed):
        search_net.main(_search_args(out, "SEARCH.EPOCHS", "3"))
    monkeypatch.setattr(ALBSearcher, "build_hooks", build_hooks)
    # 1 iteration per epoch (2 records per half, batch 2): epoch 1 checkpointed, epoch 2 logged
    # in alphas.json but killed before its checkpoint; no final outputs.
    assert (out / "last_checkpoint").read_text(encoding="utf-8") == "model_0000000.pth"
    alphas = json.loads((out / "alphas.json").read_text(encoding="utf-8"))
    assert [e["epoch"] for e in alphas["epochs"]] == [1, 2]
    assert not (out / "genotype.yaml").exists()
    ckpt = torch.load(out / "model_0000000.pth", weights_only=False)

    cfg = search_net.setup(_search_args(out, "SEARCH.EPOCHS", "3", resume=True))
    s = ALBSearcher(cfg)
    s.resume_or_load(resume=True)
    assert (s.start_iter, s.epochs_done, s.iters_per_epoch) == (1, 1, 1)
    head = s.model.roi_heads.box_head
    assert torch.equal(head.alpha_normal, ckpt["model"]["roi_heads.box_head.alpha_normal"])
    assert torch.equal(head.alpha_reduce, ckpt["model"]["roi_heads.box_head.alpha_reduce"])
    assert s.alpha_optimizer.state_dict()["state"][0]["step"] == 1  # Adam's step count restored
    first_w = s.w_optimizer.param_groups[0]["params"][0]
    assert torch.equal(
        s.w_optimizer.state[first_w]["momentum_buffer"],
        ckpt["w_optimizer"]["state"][0]["momentum_buffer"],
    )
    genotype = s.train()

    history = json.loads((out / "alphas.json").read_text(encoding="utf-8"))
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert final["trainer"]["iteration"] == 2
    # lr of the resumed iterations follows the cosine of the whole 3-iteration search.
    lrs = {
        m["iteration"]: m["lr"]
        for m in map(json.loads, open(out / "metrics.json", encoding="utf-8"))
        if "lr" in m
    }
    assert lrs[2] == pytest.approx(0.5 * 0.02 * (1 + math.cos(math.pi * 2 / 3)))
    assert load_genotype(str(out / "genotype.yaml")) == genotype
    # A checkpoint of another epoch length is refused instead of silently misnumbering epochs.
    cfg = search_net.setup(
        _search_args(out, "SEARCH.EPOCHS", "3", "SOLVER.IMS_PER_BATCH", "1", resume=True)
    )
    with pytest.raises(ValueError, match="iterations per epoch"):
        ALBSearcher(cfg).resume_or_load(resume=True)


def test_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from elixir_d2.search import SearchCheckpointer

    model = torch.nn.Linear(3, 2)
    ckpt = SearchCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000000")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]

    def dies_mid_write(data, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as a kill during torch.save

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001")
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000000")  # overwriting the same name must not truncate it either
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text(encoding="utf-8") == "model_0000000.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    fresh = torch.nn.Linear(3, 2)
    SearchCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


# ---------------------------------------------------------------------------------- end to end
def test_search_then_train_elixirnet_then_evaluate(tiny_set, tmp_path):
    import train_net

    out = tmp_path / "search"
    genotype = search_net.main(_search_args(out, "SEARCH.EPOCHS", "2"))
    path = out / "genotype.yaml"
    assert load_genotype(str(path)) == genotype
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("#") and "search_net.py" in header
    # logged when a head is built from it
    prov = yaml.safe_load(path.read_text(encoding="utf-8"))["provenance"]
    assert prov["searched"] is True and prov["epochs"] == 2 and prov["data"] and prov["date"]

    history = json.loads((out / "alphas.json").read_text(encoding="utf-8"))
    assert history["ops"] == ELIXIR_OPS and len(history["edges"]) == 14
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    for entry in history["epochs"]:
        for kind in ("normal", "reduce"):
            w = np.asarray(entry[kind])
            assert w.shape == (14, 9) and np.all(w > 0)
            np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-9)
    # The genotype is the discretisation of the final alphas saved in the checkpoint.
    final = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert (
        derive_genotype(
            final["roi_heads.box_head.alpha_normal"],
            final["roi_heads.box_head.alpha_reduce"],
            "elixir",
            4,
        )
        == genotype
    )
    assert history["epochs"][-1]["genotype"] == genotype.to_dict()
    # ... and the alphas moved away from their near-uniform start.
    assert not np.allclose(history["epochs"][-1]["normal"], 1 / 9, atol=1e-4)
    with Image.open(out / "alphas.png") as im:
        assert im.format == "PNG" and im.size[0] > 100

    train_out = tmp_path / "train"
    common = SMALL[:6] + [
        "OUTPUT_DIR",
        str(train_out),
        "MODEL.ALB.GENOTYPE",
        str(path),
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.STEPS",
        "(2,)",
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "16",
    ]
    cfg_file = os.path.join(REPO, "configs/quickstart/elixirnet.yaml")
    train_net.main(default_argument_parser().parse_args(["--config-file", cfg_file] + common))
    weights = train_out / "model_final.pth"
    assert weights.exists()
    args = default_argument_parser().parse_args(
        ["--config-file", cfg_file, "--eval-only"] + common + ["MODEL.WEIGHTS", str(weights)]
    )
    cfg = train_net.setup(args)
    assert train_net.Trainer.build_model(cfg).roi_heads.box_head.genotype == genotype
    res = train_net.main(args)
    lesion = res["lesion"]
    for key in ("sens@3_iou", "sens@0.5_iou", "sens@8_iobb", "mean_sens_iou"):
        assert key in lesion
        assert 0.0 <= lesion[key] <= 100.0


def test_warmup_epochs_train_w_only_and_entropy_is_logged(tiny_set, tmp_path):
    """SEARCH.WARMUP_EPOCHS 1 of 2: alpha is untouched in epoch 1 and moves in epoch 2; every
    epoch of alphas.json carries each edge's entropy of softmax(alpha), checked against its
    weights (uniform weights over the 9 ops give ln 9)."""
    out = tmp_path / "warm"
    cfg = search_net.setup(_search_args(out, "SEARCH.EPOCHS", "2", "SEARCH.WARMUP_EPOCHS", "1"))
    s = ALBSearcher(cfg)
    s.resume_or_load(resume=False)
    head = s.model.roi_heads.box_head
    start = head.alpha_normal.detach().clone()
    seen = []

    class _Watch(HookBase):
        def after_step(self):
            seen.append(head.alpha_normal.detach().clone())

    s.register_hooks([_Watch()])
    s.train()
    assert s.iters_per_epoch == 1
    assert torch.equal(seen[0], start) and not torch.equal(seen[1], start)
    history = json.loads((out / "alphas.json").read_text(encoding="utf-8"))
    for epoch in history["epochs"]:
        for kind in ("normal", "reduce"):
            w = np.array(epoch[kind])
            expect = -(w * np.log(w)).sum(axis=1)
            np.testing.assert_allclose(epoch[f"entropy_{kind}"], expect, rtol=1e-6)
    first = np.array(history["epochs"][0]["entropy_normal"])
    np.testing.assert_allclose(first, math.log(len(history["ops"])), atol=1e-3)  # alphas start ~0
    with pytest.raises(ValueError, match="WARMUP_EPOCHS"):
        ALBSearcher(
            search_net.setup(
                _search_args(tmp_path / "bad", "SEARCH.EPOCHS", "2", "SEARCH.WARMUP_EPOCHS", "2")
            )
        )


def test_search_signal_measures_alpha_gradients_without_stepping(tiny_set, tmp_path, capsys):
    """projects/benchmarks/search_signal.py on a finished search: its gradient is the one a full
    backward gives; adding a constant to an edge's alphas leaves softmax(alpha) as it is, so each
    edge's 9 gradients sum to 0; nothing moves and the weights stay trainable."""
    import search_signal

    out = tmp_path / "signal"
    search_net.main(_search_args(out, "SEARCH.EPOCHS", "1"))
    s = ALBSearcher(search_net.setup(_search_args(out, "SEARCH.EPOCHS", "1")))
    s.checkpointer.load(str(out / "model_final.pth"), checkpointables=[])
    head = s.model.roi_heads.box_head
    params = {k: p.detach().clone() for k, p in s.model.named_parameters()}
    trainable = [k for k, p in s.model.named_parameters() if p.requires_grad]
    batch = s.next_batches()[1]
    s.next_batches = lambda: (None, batch)
    torch.manual_seed(5)  # the RoI sampling draws random numbers
    grads = search_signal.alpha_gradients(s, 2)
    assert grads.shape == (2, 2 * 14 * 9) and np.abs(grads).max() > 0
    np.testing.assert_allclose(
        grads.reshape(2, 28, 9).sum(axis=2), 0.0, atol=1e-5 * np.abs(grads).max()
    )
    assert all(torch.equal(p, params[k]) for k, p in s.model.named_parameters())
    assert [k for k, p in s.model.named_parameters() if p.requires_grad] == trainable

    torch.manual_seed(5)
    with EventStorage():
        total, _ = search_loss(s.model, batch)
    s.model.zero_grad(set_to_none=True)
    total.backward()
    full = torch.cat([a.grad.flatten() for a in head.arch_parameters()]).numpy()
    np.testing.assert_allclose(grads[0], full, rtol=1e-4, atol=1e-7)

    genotype = tmp_path / "gradient.yaml"
    search_signal.main(
        [
            "--search-dir",
            str(out),
            "--checkpoints",
            "model_final.pth",
            "model_final.pth",
            "--batches",
            "3",
            "--threads",
            "1",
            "--genotype-out",
            str(genotype),
        ]
    )
    printed = capsys.readouterr().out
    assert printed.count("| model_final.pth | 1 |") == 2  # two rows, epoch 1 of 1
    assert "Correlation of the t vectors" in printed and "| 2: model_final.pth | " in printed
    assert load_genotype(str(genotype)).space == "elixir"
    assert yaml.safe_load(genotype.read_text(encoding="utf-8"))["provenance"]["batches"] == 3
    with pytest.raises(MissingFileError, match="search checkpoint .*model_0000099.pth not found"):
        search_signal.measure(str(out), ["model_final.pth", "model_0000099.pth"], 2)
    # The DARTS space has 8 ops, not 9: the checkpoint's alphas do not fit, and it says so.
    with pytest.raises(ValueError, match="model_final.pth does not fit.*alpha_normal"):
        search_signal.measure(str(out), ["model_final.pth"], 2, ["MODEL.ALB.SEARCH_SPACE", "darts"])


def test_search_refuses_a_model_without_the_searchable_head():
    from detectron2.modeling import build_model

    from elixir_d2 import load_config
    from elixir_d2.search.searcher import search_head

    fpn = build_model(load_config("configs/quickstart/fpn.yaml"))  # 2-fc head, nothing to search
    with pytest.raises(ValueError, match="ALBSearchHead.*box head is FastRCNNConvFCHead"):
        search_head(fpn)
    searchable = build_model(load_config("configs/quickstart/search_alb.yaml"))
    assert search_head(searchable) is searchable.roi_heads.box_head
