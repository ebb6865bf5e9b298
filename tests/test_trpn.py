"""Tests of TruncatedRPN (elixir_d2/modeling/trpn.py).

Expected values are built here independently: anchors from the anchor formula (centre at
location * stride, w = sqrt(S^2 / r), h = r * w), focal loss from its closed form.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from elixir_d2 import add_elixirnet_config, load_config
from elixir_d2.modeling.capture import capture
from elixir_d2.modeling.trpn import TRPN

torch.set_num_threads(1)

FPN_LEVELS = ["p2", "p3", "p4", "p5", "p6"]
FPN_STRIDES = [4, 8, 16, 32, 64]
FPN_SIZES = [16, 24, 32, 48, 96]
RATIOS = [0.5, 1.0, 2.0]
IMG = 64  # image side: P2..P6 maps are 16, 8, 4, 2, 1 locations wide
CH = 8


def _cfg(
    threshold=-1.0, loc_weight=1.0, levels=FPN_LEVELS, sizes=None, gate="p", positives="foreground"
):
    """TRPN config; the literal equation-1 gate and matched-anchor positives unless asked."""
    cfg = get_cfg()
    add_elixirnet_config(cfg)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "TRPN"
    cfg.MODEL.RPN.IN_FEATURES = list(levels)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = sizes or [[s] for s in FPN_SIZES]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [RATIOS]
    cfg.MODEL.TRPN.THRESHOLD = threshold
    cfg.MODEL.TRPN.LOC_LOSS_WEIGHT = loc_weight
    cfg.MODEL.TRPN.GATE = gate
    cfg.MODEL.TRPN.CONF_POSITIVES = positives
    return cfg


def _fpn_trpn(cfg) -> TRPN:
    shapes = {f: ShapeSpec(channels=CH, stride=s) for f, s in zip(FPN_LEVELS, FPN_STRIDES)}
    trpn = build_proposal_generator(cfg, shapes)
    assert isinstance(trpn, TRPN)
    return trpn


def _fpn_features(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f: torch.randn(n, CH, IMG // s, IMG // s, generator=g)
        for f, s in zip(FPN_LEVELS, FPN_STRIDES)
    }


def _images(n=2, sizes=None):
    sizes = sizes or [(IMG, IMG)] * n
    return ImageList(torch.zeros(n, 3, IMG, IMG), sizes)


def _gt(boxes, size=(IMG, IMG)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.long)
    return inst


class _MapsByShape(nn.Module):
    """Stub conf_head: returns the constructed logit map whose spatial size matches the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = {tuple(z.shape[-2:]): z for z in logits}

    def forward(self, x):
        return self.logits[tuple(x.shape[-2:])]


class _ScoresHead(nn.Module):
    """Stub RPN head: constructed objectness, zero deltas (so proposals are the anchors)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores  # per level, (N, A, H, W)

    def forward(self, feats):
        deltas = [torch.zeros(s.shape[0], s.shape[1] * 4, *s.shape[2:]) for s in self.scores]
        return list(self.scores), deltas


def _reference_anchor_boxes(level, i, j):
    """Anchors of location (i, j) on FPN level `level`, clipped to the image, one per ratio."""
    s, size = FPN_STRIDES[level], FPN_SIZES[level]
    cx, cy = j * s, i * s  # ANCHOR_GENERATOR.OFFSET = 0.0
    out = []
    for r in RATIOS:
        w = math.sqrt(size * size / r)
        h = r * w
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        out.append([min(max(v, 0.0), float(IMG)) for v in box])
    return out


def _sorted_rows(t):
    t = t.double()
    for col in reversed(range(t.shape[1])):
        t = t[torch.sort(t[:, col], stable=True).indices]
    return t


def _reference_keep(m, threshold=-1.0, inside=None):
    """Kept locations of one (image, level) map: p > eps; a map with nothing above its mean
    (constant, e.g. a 1x1 level) keeps everything. ``inside``: (rows, cols) of the map that
    lie in the image (the rest is padding, left out of the mean)."""
    if threshold >= 0:
        return m > threshold
    rows, cols = inside or m.shape
    keep = m > m[:rows, :cols].mean()
    return keep if keep[:rows, :cols].any() else torch.ones_like(keep)


def _constructed_p(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 1, IMG // s, IMG // s, generator=g) for s in FPN_STRIDES]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("threshold", [-1.0, 0.6])
def test_proposals_are_exactly_the_anchors_of_kept_locations(training, threshold):
    cfg = _cfg(threshold=threshold)
    cfg.MODEL.RPN.NMS_THRESH = 1.0  # keeps every distinct box
    for key in (
        "PRE_NMS_TOPK_TRAIN",
        "PRE_NMS_TOPK_TEST",
        "POST_NMS_TOPK_TRAIN",
        "POST_NMS_TOPK_TEST",
    ):
        cfg.MODEL.RPN[key] = 100000
    trpn = _fpn_trpn(cfg)
    n = 2
    p = _constructed_p(n, seed=1)
    p[3][1] = 0.5  # image 1, P5: constant map
    trpn.conf_head = _MapsByShape([torch.logit(x) for x in p])
    # Truncated locations get the HIGHEST objectness: they must still never appear.
    scores = [torch.where(x > 0.5, 10.0, -10.0).expand(-1, 3, -1, -1).clone() for x in p]
    trpn.rpn_head = _ScoresHead(scores)
    trpn.train(training)
    gts = [_gt([[20, 20, 36, 36]]), _gt([])]
    with EventStorage():
        proposals, _ = trpn(_images(n), _fpn_features(n), gts if training else None)

    for img in range(n):
        expected = []
        for lvl, pl in enumerate(p):
            for i, j in _reference_keep(pl[img, 0], threshold).nonzero().tolist():
                expected += _reference_anchor_boxes(lvl, i, j)
        expected = torch.tensor(expected)
        got = proposals[img].proposal_boxes.tensor
        assert got.shape == expected.shape
        assert torch.allclose(_sorted_rows(got), _sorted_rows(expected), atol=1e-4)


def test_topk_is_taken_among_kept_candidates_only():
    cfg = _cfg()
    cfg.MODEL.RPN.NMS_THRESH = 1.0
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 5
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 12
    trpn = _fpn_trpn(cfg).eval()
    p = _constructed_p(1, seed=2)
    trpn.conf_head = _MapsByShape([torch.logit(x) for x in p])
    g = torch.Generator().manual_seed(3)
    # Distinct scores, and truncated locations score above every kept one.
    scores = []
    for x in p:
        base = torch.rand(1, 3, *x.shape[-2:], generator=g)
        scores.append(torch.where(_reference_keep(x[0, 0]), base, base + 100.0))
    trpn.rpn_head = _ScoresHead(scores)
    proposals, _ = trpn(_images(1), _fpn_features(1))

    candidates = []  # (score, box) per level: the 5 best kept anchors
    for lvl, (pl, sc) in enumerate(zip(p, scores)):
        level = []
        for i, j in _reference_keep(pl[0, 0]).nonzero().tolist():
            for a, box in enumerate(_reference_anchor_boxes(lvl, i, j)):
                level.append((float(sc[0, a, i, j]), box))
        candidates += sorted(level, key=lambda t: -t[0])[:5]
    candidates = sorted(candidates, key=lambda t: -t[0])[:12]
    got = proposals[0]
    assert torch.allclose(
        got.objectness_logits, torch.tensor([c[0] for c in candidates]), atol=1e-6
    )
    assert torch.allclose(
        got.proposal_boxes.tensor, torch.tensor([c[1] for c in candidates]), atol=1e-4
    )


def test_truncated_fraction_logged_and_constant_map_keeps_all():
    trpn = _fpn_trpn(_cfg()).train()
    p = [torch.full((1, 1, IMG // s, IMG // s), 0.3) for s in FPN_STRIDES]
    p[0][0, 0, :2, :2] = 0.9  # P2: 4 of 256 locations above the mean
    trpn.conf_head = _MapsByShape([torch.logit(x) for x in p])
    with EventStorage() as storage:
        trpn(_images(1), _fpn_features(1), [_gt([[10, 10, 30, 30]])])
        logged = {k: v[0] for k, v in storage.latest().items() if k.startswith("trpn/")}
    assert logged["trpn/truncated_frac_p2"] == pytest.approx(252 / 256)
    for f in FPN_LEVELS[1:]:  # constant p: nothing above the mean -> nothing truncated
        assert logged[f"trpn/truncated_frac_{f}"] == 0.0


def test_mean_threshold_ignores_padding_and_maps_kept_for_drawing():
    trpn = _fpn_trpn(_cfg()).eval()
    p = _constructed_p(2, seed=4)
    p[0][1, 0, 10:] = 0.999  # image 1 is 40 px high: P2 rows >= 10 are padding
    trpn.conf_head = _MapsByShape([torch.logit(x) for x in p])
    with capture(trpn, "trpn_confidence") as records:
        trpn(_images(2, sizes=[(IMG, IMG), (40, IMG)]), _fpn_features(2))
    (rec,) = records
    assert torch.allclose(rec.eps["p2"][1], p[0][1, 0, :10].mean(), atol=1e-6)
    assert torch.allclose(rec.eps["p2"][0], p[0][0, 0].mean(), atol=1e-6)
    for f, pl in zip(FPN_LEVELS, p):
        assert torch.allclose(rec.conf_maps[f], pl[:, 0], atol=1e-6)
        assert rec.keep_masks[f].shape == pl[:, 0].shape


def test_captured_confidence_equals_a_hook_free_computation():
    """The captured maps are TRPN's own: sigmoid of conf_head on the features fed, eps the mean
    over each image's locations (padding excluded), keep = p > eps; one record per forward, and
    the module keeps nothing once the block is left."""
    torch.manual_seed(0)
    trpn = _fpn_trpn(_cfg()).eval()
    nn.init.normal_(trpn.conf_head.weight, std=0.5)  # p varies over the locations
    feats = _fpn_features(2, seed=3)
    sizes = [(IMG, IMG), (40, 52)]
    with torch.no_grad(), capture(trpn, "trpn_confidence") as records:
        trpn(_images(2, sizes=sizes), feats)
        trpn(_images(2, sizes=sizes), _fpn_features(2, seed=4))
    assert len(records) == 2
    rec = records[0]
    assert list(rec.conf_maps) == FPN_LEVELS and rec.strides == dict(zip(FPN_LEVELS, FPN_STRIDES))
    with torch.no_grad():
        for f, stride in zip(FPN_LEVELS, FPN_STRIDES):
            p = torch.sigmoid(F.conv2d(feats[f], trpn.conf_head.weight, trpn.conf_head.bias))[:, 0]
            torch.testing.assert_close(rec.conf_maps[f], p, rtol=0, atol=1e-6)
            assert not rec.conf_maps[f].requires_grad
            for n, (h, w) in enumerate(sizes):
                rows, cols = math.ceil(h / stride), math.ceil(w / stride)
                inside = torch.zeros_like(p[n], dtype=torch.bool)
                inside[:rows, :cols] = True
                assert torch.equal(rec.valid_masks[f][n], inside)
                eps = p[n, :rows, :cols].mean()
                torch.testing.assert_close(rec.eps[f][n], eps, rtol=0, atol=1e-6)
                ref_keep = _reference_keep(p[n], inside=(rows, cols))
                assert torch.equal(rec.keep_masks[f][n], ref_keep)
    # The hook is gone: a forward after the block records nothing.
    trpn(_images(2, sizes=sizes), feats)
    assert len(records) == 2 and not trpn.truncation._forward_hooks


def test_gradients_reach_the_conf_branch_without_aux_loss():
    torch.manual_seed(0)
    trpn = _fpn_trpn(_cfg(loc_weight=0.0)).train()
    with EventStorage():
        _, losses = trpn(_images(2), _fpn_features(2), [_gt([[20, 20, 36, 36]]), _gt([])])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}  # weight 0: no focal term
    sum(losses.values()).backward()
    grad = trpn.conf_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def _focal_closed_form(z, positive, alpha=0.25, gamma=2.0):
    p = 1.0 / (1.0 + math.exp(-z))
    if positive:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


@pytest.mark.parametrize(
    "weight,centres",
    [
        (0.0, [(32, 32)]),
        (1.0, [(32, 32)]),  # 1 positive location < 682 / 200: normalised by 3.41
        (2.5, [(16, 16), (16, 48), (48, 16), (48, 48)]),  # 4 positives > 3.41: normalised by 4
    ],
)
def test_focal_loss_on_p(weight, centres):
    trpn = _fpn_trpn(_cfg(loc_weight=weight)).train()
    z = -1.5  # constant confidence logit everywhere
    nn.init.zeros_(trpn.conf_head.weight)
    nn.init.constant_(trpn.conf_head.bias, z)
    # Each gt box IS the ratio-1 P2 anchor centred at (cx, cy): IoU 1 with it, < 0.7 with every
    # other anchor, so each gt makes exactly one location positive.
    boxes = [[cx - 8, cy - 8, cx + 8, cy + 8] for cx, cy in centres]
    gts = [_gt(boxes), _gt([])]
    with EventStorage():
        _, losses = trpn(_images(2), _fpn_features(2), gts)
    if weight == 0:
        assert "loss_trpn_conf" not in losses
        return
    locations = 2 * sum((IMG // s) ** 2 for s in FPN_STRIDES)  # 341 per image
    num_pos = len(centres)
    expected = num_pos * _focal_closed_form(z, True)
    expected += (locations - num_pos) * _focal_closed_form(z, False)
    expected *= weight / max(num_pos, locations / 200)
    assert losses["loss_trpn_conf"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["loss_trpn_conf"].item() > 0


def test_c4_single_level_shapes():
    cfg = _cfg(levels=["res4"], sizes=[FPN_SIZES])
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    trpn = build_proposal_generator(cfg, {"res4": ShapeSpec(channels=CH, stride=16)})
    feats = {"res4": torch.randn(2, CH, 6, 5)}
    images = ImageList(torch.zeros(2, 3, 96, 80), [(96, 80), (90, 70)])
    trpn.train()
    with EventStorage():
        props, losses = trpn(images, feats, [_gt([[10, 10, 40, 50]], (96, 80)), _gt([], (90, 70))])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_trpn_conf"}
    assert all(torch.isfinite(v) for v in losses.values())
    trpn.eval()
    with capture(trpn, "trpn_confidence") as records:
        props, losses = trpn(images, feats)
    assert losses == {}
    assert records[0].conf_maps["res4"].shape == (2, 6, 5) and records[0].strides == {"res4": 16}
    for prop, (h, w) in zip(props, images.image_sizes):
        boxes = prop.proposal_boxes.tensor
        assert 0 < len(boxes) <= 20 and boxes.shape[1] == 4
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_fpn_shapes_no_lesion_and_constant_p_do_not_crash():
    cfg = _cfg()
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 30
    trpn = _fpn_trpn(cfg).train()
    nn.init.zeros_(trpn.conf_head.weight)  # constant p everywhere
    with EventStorage() as storage:
        props, losses = trpn(_images(2), _fpn_features(2), [_gt([]), _gt([])])
        fracs = [v[0] for k, v in storage.latest().items() if k.startswith("trpn/")]
    assert all(torch.isfinite(v) for v in losses.values())
    assert fracs == [0.0] * 5
    assert [len(x) for x in props] == [30, 30]
    sum(losses.values()).backward()


def test_fixed_threshold_above_every_p_gives_empty_proposals():
    trpn = _fpn_trpn(_cfg(threshold=0.9)).eval()
    nn.init.zeros_(trpn.conf_head.weight)  # p = 0.5 everywhere <= 0.9
    props, _ = trpn(_images(1), _fpn_features(1))
    assert len(props[0]) == 0


def test_bad_threshold_is_rejected():
    with pytest.raises(ValueError, match="THRESHOLD"):
        _fpn_trpn(_cfg(threshold=1.0))


def test_deeplesion_config_selects_trpn_with_paper_anchors():
    cfg = load_config("configs/trpn_fpn_R_50_deeplesion.yaml")
    assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == "TRPN"
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[16], [24], [32], [48], [96]]
    assert cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[0.5, 1.0, 2.0]]
    assert cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]
    assert cfg.MODEL.TRPN.THRESHOLD < 0


def _synthetic_batch(g, n=2, size=96):
    """Noise slices with bright discs as lesions (some images have none)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    batch = []
    for _ in range(n):
        img = torch.rand(size, size, generator=g) * 40 + 30
        boxes = []
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            r = float(torch.randint(4, 11, (1,), generator=g))
            cx, cy = (float(v) for v in torch.randint(12, size - 12, (2,), generator=g))
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] += 120
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        batch.append({"image": img[None].repeat(3, 1, 1), "instances": _gt(boxes, (size, size))})
    return batch


def test_quickstart_trpn_overfits_one_batch():
    """The quickstart TRPN model learns: SGD on one fixed batch (the RPN's and the RoI head's
    sampling fixed by reseeding) drives the total loss to well under half its start and the
    location-confidence loss to under a fifth. Each CPU's rounding moves single steps by a few
    percent; these margins are several times wider than that, unlike a comparison of noisy
    losses over a handful of different batches."""
    cfg = load_config("configs/quickstart/trpn.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.proposal_generator, TRPN)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = _synthetic_batch(torch.Generator().manual_seed(0))
    assert sum(len(b["instances"]) for b in batch) > 0
    model.train()
    totals, conf = [], []
    with EventStorage() as storage:
        for _ in range(30):
            torch.manual_seed(1)
            losses = model(batch)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            storage.step()
            totals.append(total.item())
            conf.append(losses["loss_trpn_conf"].item())
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.4 * totals[0], totals
    assert conf[-1] < 0.2 * conf[0], conf


class _RecordingHead(_ScoresHead):
    """Stub RPN head that keeps the features it was given."""

    def forward(self, feats):
        self.seen = [f.detach().clone() for f in feats]
        return super().forward(feats)


@pytest.mark.parametrize("gate", ["p", "max_norm", "none"])
def test_gate_feeds_the_rpn_head(gate):
    trpn = _fpn_trpn(_cfg(gate=gate)).eval()
    p = _constructed_p(2, seed=3)
    trpn.conf_head = _MapsByShape([torch.logit(x) for x in p])
    head = _RecordingHead([torch.zeros(2, 3, IMG // s, IMG // s) for s in FPN_STRIDES])
    trpn.rpn_head = head
    feats = _fpn_features(2)
    trpn(_images(2), feats)
    for lvl, name in enumerate(FPN_LEVELS):
        x, pl = feats[name], p[lvl]
        if gate == "none":
            want = x
        elif gate == "p":
            want = pl * x
        else:  # every location lies inside the 64 px images: the maximum is over the whole map
            peak = pl.flatten(1).max(dim=1).values
            want = pl / peak[:, None, None, None] * x
        assert torch.allclose(head.seen[lvl], want, atol=1e-6), (gate, name)
    if gate == "max_norm":  # the most confident location passes its features unchanged
        i = p[0][0, 0].flatten().argmax()
        assert torch.allclose(head.seen[0][0].flatten(1)[:, i], feats["p2"][0].flatten(1)[:, i])


def _unclipped_anchors(level, i, j):
    s, size = FPN_STRIDES[level], FPN_SIZES[level]
    out = []
    for r in RATIOS:
        w = math.sqrt(size * size / r)
        h = r * w
        out.append([j * s - w / 2, i * s - h / 2, j * s + w / 2, i * s + h / 2])
    return out


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_not_background_positives_are_locations_with_an_anchor_above_the_negative_iou():
    """CONF_POSITIVES 'not_background': a location is positive when one of its anchors has IoU
    >= the RPN's negative threshold (0.3) with a lesion, counted here by brute force."""
    trpn = _fpn_trpn(_cfg(positives="not_background")).train()
    z = -1.5
    nn.init.zeros_(trpn.conf_head.weight)
    nn.init.constant_(trpn.conf_head.bias, z)
    box = [22.0, 26.0, 42.0, 40.0]
    neg_thresh = trpn.anchor_matcher.thresholds[1]
    num_pos = sum(
        any(_iou(a, box) >= neg_thresh for a in _unclipped_anchors(lvl, i, j))
        for lvl, s in enumerate(FPN_STRIDES)
        for i in range(IMG // s)
        for j in range(IMG // s)
    )
    assert num_pos > 1  # more than the single best-matching location
    with EventStorage():
        _, losses = trpn(_images(2), _fpn_features(2), [_gt([box]), _gt([])])
    locations = 2 * sum((IMG // s) ** 2 for s in FPN_STRIDES)
    expected = num_pos * _focal_closed_form(z, True) + (locations - num_pos) * _focal_closed_form(
        z, False
    )
    expected /= max(num_pos, locations / 200)
    assert losses["loss_trpn_conf"].item() == pytest.approx(expected, rel=1e-4)


def test_gate_and_positives_are_checked():
    with pytest.raises(ValueError, match="MODEL.TRPN.GATE"):
        _fpn_trpn(_cfg(gate="sqrt"))
    with pytest.raises(ValueError, match="MODEL.TRPN.CONF_POSITIVES"):
        _fpn_trpn(_cfg(positives="all"))


class _FixedHead(nn.Module):
    """Stub RPN head returning the given objectness (N, A, H, W) and deltas (N, A*4, H, W)."""

    def __init__(self, scores, deltas):
        super().__init__()
        self.scores, self.deltas = scores, deltas

    def forward(self, feats):
        return list(self.scores), list(self.deltas)


def _gather_after_reference(trpn, scores, deltas, keep_maps, image_sizes, training):
    """The previous TRPN inference path, written out with detectron2's pieces: decode every
    anchor, give truncated anchors the lowest finite logit, detectron2's top-k + NMS over all
    of them, then drop what is left of the truncated ones."""
    from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals

    feats = [torch.zeros(s.shape[0], 1, *s.shape[-2:]) for s in scores]
    anchors = trpn.anchor_generator(feats)
    sentinel = torch.finfo(torch.float32).min
    logits, boxes = [], []
    for s, d, k, a in zip(scores, deltas, keep_maps, anchors):
        n, num_a, h, w = s.shape
        flat = s.permute(0, 2, 3, 1).reshape(n, -1)  # anchor order (H, W, A)
        keep = k[:, :, :, None].expand(n, h, w, num_a).reshape(n, -1)
        logits.append(flat.masked_fill(~keep, sentinel))
        d = d.view(n, num_a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        all_a = a.tensor[None].expand(n, -1, -1).reshape(-1, 4)
        boxes.append(trpn.box2box_transform.apply_deltas(d, all_a).view(n, -1, 4))
    out = find_top_rpn_proposals(
        boxes,
        logits,
        image_sizes,
        trpn.nms_thresh,
        trpn.pre_nms_topk[training],
        trpn.post_nms_topk[training],
        trpn.min_box_size,
        training,
    )
    return [r[r.objectness_logits > sentinel] for r in out]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("threshold", [0.6, -1.0])
def test_truncating_before_topk_equals_gathering_after(training, threshold):
    """Dropping truncated anchors before decoding / top-k / NMS gives the very proposals of
    the gather-after path (same boxes, same scores, same order), and none from a truncated
    location although those score highest."""
    cfg = _cfg(threshold=threshold)
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 20
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 30
    trpn = _fpn_trpn(cfg).train(training)
    n = 2
    p = _constructed_p(n, seed=6)
    trpn.conf_head = _MapsByShape([torch.logit(x) for x in p])
    sizes = [(IMG, IMG), (IMG, 52)]  # image 1: the right columns of P2-P4 are padding
    keep_maps = [
        torch.stack(
            [
                _reference_keep(x[i, 0], threshold, (math.ceil(h / s), math.ceil(w / s)))
                for i, (h, w) in enumerate(sizes)
            ]
        )
        for x, s in zip(p, FPN_STRIDES)
    ]
    g = torch.Generator().manual_seed(7)
    scores, deltas = [], []
    for x, k in zip(p, keep_maps):
        base = torch.randn(n, 3, *x.shape[-2:], generator=g)
        scores.append(torch.where(k[:, None], base, base + 50.0))  # truncated: the best scores
        deltas.append(0.3 * torch.randn(n, 12, *x.shape[-2:], generator=g))
    trpn.rpn_head = _FixedHead(scores, deltas)
    with EventStorage():
        got, _ = trpn(_images(n, sizes), _fpn_features(n), [_gt([[20, 20, 36, 36]]), _gt([])])
    want = _gather_after_reference(trpn, scores, deltas, keep_maps, sizes, training)
    for g_img, w_img in zip(got, want):
        assert 0 < len(w_img) and len(g_img) == len(w_img)
        assert torch.equal(g_img.objectness_logits, w_img.objectness_logits)
        assert torch.allclose(
            g_img.proposal_boxes.tensor, w_img.proposal_boxes.tensor, rtol=1e-6, atol=1e-5
        )
        assert (g_img.objectness_logits < 10).all()  # nothing from a truncated location


def test_nothing_truncated_proposes_what_rpn_proposes():
    """Constant p keeps every location and the max_norm gate passes I unchanged: TRPN's
    proposals are detectron2's RPN's with the same head."""
    cfg = _cfg(gate="max_norm")
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 40
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    torch.manual_seed(0)
    trpn = _fpn_trpn(cfg).eval()
    nn.init.zeros_(trpn.conf_head.weight)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
    rpn = build_proposal_generator(
        cfg, {f: ShapeSpec(channels=CH, stride=s) for f, s in zip(FPN_LEVELS, FPN_STRIDES)}
    ).eval()
    rpn.rpn_head.load_state_dict(trpn.rpn_head.state_dict())
    images, feats = _images(2, [(IMG, IMG), (48, IMG)]), _fpn_features(2, seed=8)
    with torch.no_grad():
        got, _ = trpn(images, feats)
        want, _ = rpn(images, feats)
    for g_img, w_img in zip(got, want):
        assert torch.equal(g_img.objectness_logits, w_img.objectness_logits)
        assert torch.allclose(
            g_img.proposal_boxes.tensor, w_img.proposal_boxes.tensor, rtol=1e-6, atol=1e-5
        )


@pytest.mark.parametrize("gate", ["p", "max_norm", "none"])
def test_rpn_losses_are_detectron2_rpn_losses_on_the_gated_features(gate):
    """loss_rpn_cls / loss_rpn_loc: detectron2's RPN, same head weights, fed the gate's
    features computed here, on the same anchor sample (same seed)."""
    trpn = _fpn_trpn(_cfg(gate=gate)).train()
    p = _constructed_p(2, seed=9)
    trpn.conf_head = _MapsByShape([torch.logit(x) for x in p])
    cfg = _cfg(gate=gate)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
    rpn = build_proposal_generator(
        cfg, {f: ShapeSpec(channels=CH, stride=s) for f, s in zip(FPN_LEVELS, FPN_STRIDES)}
    ).train()
    rpn.rpn_head.load_state_dict(trpn.rpn_head.state_dict())
    feats = _fpn_features(2, seed=10)
    gated = {}
    for (name, x), pl in zip(feats.items(), p):
        if gate == "none":
            gated[name] = x
        elif gate == "p":
            gated[name] = pl * x
        else:
            gated[name] = pl / pl.flatten(1).max(dim=1).values[:, None, None, None] * x
    gts = [_gt([[20, 20, 36, 36], [4, 30, 20, 60]]), _gt([[40, 40, 60, 52]])]
    with EventStorage():
        torch.manual_seed(11)
        _, got = trpn(_images(2), feats, gts)
        torch.manual_seed(11)
        _, want = rpn(_images(2), gated, gts)
    assert set(got) == {"loss_rpn_cls", "loss_rpn_loc", "loss_trpn_conf"}
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-5), k


def test_checkpoint_keys_unchanged():
    """Saved TRPN models load by these names (conf_head + detectron2's rpn_head)."""
    keys = set(_fpn_trpn(_cfg()).state_dict())
    assert keys == {
        "conf_head.weight",
        "conf_head.bias",
        "rpn_head.conv.weight",
        "rpn_head.conv.bias",
        "rpn_head.objectness_logits.weight",
        "rpn_head.objectness_logits.bias",
        "rpn_head.anchor_deltas.weight",
        "rpn_head.anchor_deltas.bias",
    }
