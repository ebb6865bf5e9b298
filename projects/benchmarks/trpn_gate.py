#!/usr/bin/env python
"""Does TRPN's max_norm gate (p / max p) damp the RPN head at the lesions that it misses?

    OMP_NUM_THREADS=1 python projects/benchmarks/trpn_gate.py \
        --runs output/quality_05 output/quality_14d --seeds 0 1 2 [--cache FILE.json]

No training: RUN/seedS/trpn (FPN+TRPN) and RUN/seedS/fpn (RPN), each built from its own
config.yaml, run their backbone and proposal generator over the test split. Per non-noisy
lesion, in network-input coordinates: the FPN level of its best anchor (max IoU over all
levels); on that level p at the lesion (max over the locations whose centres lie in the box,
else the location nearest its centre), the image's peak p over valid locations, the gate
g = p_lesion / p_peak; the max objectness logit over the lesion's locations, minus the head's
ceiling (the largest objectness bias: all objectness weights of these models are negative, so no
location scores above it), and the same for the head on the ungated features (TRPN; a
counterfactual for the lesion only); the best IoU of a top-300 proposal and whether a top-50 /
top-300 one covers the lesion at IoU >= 0.5 (ranked and compared as ProposalRecallEvaluator).
Prints, per model and pooled per run, covered against missed lesions (at 300), split by the
slice's number of annotated lesions (noisy ones included), by level and against what the RPN
of the same seed covers. --cache keeps the per-lesion rows (computed once, then read back).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Sequence

import numpy as np

DATASET = "synthetic_test"
nan = float("nan")
Row = Dict[str, float]


def lesion_rows(model_dir: str) -> List[Row]:
    """One row per non-noisy test lesion for the model in ``model_dir`` (TRPN or RPN)."""
    import contextlib

    import torch

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, BoxMode, pairwise_iou

    import elixir_d2
    from elixir_d2.modeling.capture import capture
    from elixir_d2.modeling.hooks import capture_outputs
    from elixir_d2.modeling.trpn import TRPN
    from elixir_d2.trainer import ElixirTrainer

    # Whole test slices: the lesion geometry below is in whole-slice network coordinates.
    cfg = elixir_d2.load_config(
        os.path.join(model_dir, "config.yaml"),
        [
            "MODEL.WEIGHTS",
            os.path.join(model_dir, "model_final.pth"),
            "MODEL.DEVICE",
            "cpu",
            "INPUT.BODY_CROP.ENABLED",
            "False",
        ],
    )
    model = ElixirTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    pg = model.proposal_generator
    is_trpn = isinstance(pg, TRPN)
    records = {r["image_id"]: r for r in DatasetCatalog.get(DATASET)}
    rows: List[Row] = []
    ceiling = float(pg.rpn_head.objectness_logits.bias.detach().max())  # the highest logit
    # The ceiling holds only if no objectness weight is positive (hidden units are ReLUs).
    pos_w = 100.0 * float((pg.rpn_head.objectness_logits.weight > 0).float().mean())
    with contextlib.ExitStack() as stack, torch.no_grad():
        # The generator's own output, in network-input pixels: it is called directly below.
        captured = stack.enter_context(capture_outputs(pg))
        heads = stack.enter_context(capture_outputs(pg.rpn_head))
        anchor_sets = stack.enter_context(capture_outputs(pg.anchor_generator))
        confidence = stack.enter_context(capture(model, "trpn_confidence")) if is_trpn else []
        for inputs in ElixirTrainer.build_test_loader(cfg, DATASET):
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            heads.clear()
            pg(images, features, None)
            logits, anchors = heads[0][0], anchor_sets.pop()
            if is_trpn:  # the same head on the ungated features, for the lesion's logit only
                ungated = pg.rpn_head([features[f] for f in pg.in_features])[0]
                conf = confidence.pop()
                valids = [conf.valid_masks[f] for f in pg.in_features]
            inp, props = inputs[0], captured.pop()[0][0]
            anns = records[inp["image_id"]].get("annotations", [])
            gts = [
                BoxMode.convert(
                    list(a["bbox"]), a.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS
                )
                for a in anns
                if not a.get("noisy", False)
            ]
            if not gts:
                continue
            gt = torch.tensor(gts, dtype=torch.float64)
            h_in, w_in = props.image_size
            scale = torch.tensor(
                [w_in / inp["width"], h_in / inp["height"]] * 2, dtype=torch.float64
            )
            # As ProposalRecallEvaluator: stable ranking, float64, record coordinates.
            order = torch.argsort(props.objectness_logits, descending=True, stable=True)[:300]
            boxes = props.proposal_boxes.tensor[order].double() / scale
            p_iou = pairwise_iou(Boxes(boxes), Boxes(gt))
            gt_in = (gt * scale).float()
            level_of = torch.cat([torch.full((len(a),), i) for i, a in enumerate(anchors)])
            best_level = level_of[pairwise_iou(Boxes(gt_in), Boxes.cat(anchors)).argmax(1)]
            for j, box in enumerate(gt_in.tolist()):
                lvl = int(best_level[j])
                logit = logits[lvl][0].amax(0)  # H x W, max over the A anchors
                mask = _lesion_locations(
                    box, logit.shape, pg.anchor_generator.strides[lvl], pg.anchor_generator.offset
                )
                row = {
                    "image_id": inp["image_id"],
                    "level": lvl + 2,
                    "slice_lesions": len(anns),
                    "pos_weights": pos_w,
                    "logit": float(logit[mask].max()) - ceiling,
                    "iou300": float(p_iou[:, j].max()) if len(boxes) else 0.0,
                    "cov50": bool((p_iou[:50, j] >= 0.5).any()),
                    "cov300": bool((p_iou[:, j] >= 0.5).any()),
                }
                row.update(p_lesion=nan, p_peak=nan, g=nan, ungated=nan)
                if is_trpn:
                    p = conf.conf_maps[pg.in_features[lvl]][0]
                    row["p_lesion"] = float(p[mask].max())
                    row["p_peak"] = float(p[valids[lvl][0]].max())
                    row["g"] = row["p_lesion"] / max(row["p_peak"], 1e-6)
                    row["ungated"] = float(ungated[lvl][0].amax(0)[mask].max()) - ceiling
                rows.append(row)
    return rows


def _lesion_locations(box: Sequence[float], shape, stride: int, offset: float):
    """H x W bool: the locations whose centres lie in ``box`` (x1, y1, x2, y2), or else the one
    nearest the box centre."""
    import torch

    h, w = shape
    ys = (torch.arange(h) + offset) * stride
    xs = (torch.arange(w) + offset) * stride
    x1, y1, x2, y2 = box
    mask = ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
    if not mask.any():
        i = min(max(round((y1 + y2) / 2 / stride - offset), 0), h - 1)
        k = min(max(round((x1 + x2) / 2 / stride - offset), 0), w - 1)
        mask[i, k] = True
    return mask


def summary(rows: List[Row], rpn: List[Row]) -> str:
    """Markdown table over groups of TRPN's lesion ``rows``; ``rpn``: the same lesions, in the same
    order, for the RPN model. Medians, but g's quartiles and the shares (%)."""
    groups: List[tuple] = [("all", lambda r, q: True)]
    for name, test in (
        ("1 lesion", lambda r: r["slice_lesions"] == 1),
        (">=2 lesions", lambda r: r["slice_lesions"] >= 2),
    ):
        groups += [
            (f"{name}, covered", lambda r, q, t=test: t(r) and r["cov300"]),
            (f"{name}, missed", lambda r, q, t=test: t(r) and not r["cov300"]),
        ]
    groups += [("covered", lambda r, q: r["cov300"]), ("missed", lambda r, q: not r["cov300"])]
    groups += [
        ("RPN covers, TRPN misses", lambda r, q: q["cov300"] and not r["cov300"]),
        ("TRPN covers, RPN misses", lambda r, q: r["cov300"] and not q["cov300"]),
        ("both miss", lambda r, q: not r["cov300"] and not q["cov300"]),
    ]
    for lvl in sorted({r["level"] for r in rows}):
        groups += [
            (f"P{lvl}, covered", lambda r, q, v=lvl: r["level"] == v and r["cov300"]),
            (f"P{lvl}, missed", lambda r, q, v=lvl: r["level"] == v and not r["cov300"]),
        ]
    lines = [
        "| lesions @300 | n | g median [q1, q3] | g < 0.1 | g < 0.3 | p_lesion | p_peak "
        "| logit | at ceiling | ungated logit | best IoU |",
        "|:--|" + "--:|" * 10,
    ]
    for name, test in groups:
        lines.append(_line(name, [r for r, q in zip(rows, rpn) if test(r, q)]))
    return "\n".join(lines)


def _line(name: str, sel: List[Row]) -> str:
    if not sel:
        return f"| {name} | 0 |" + " - |" * 9
    col = {k: np.array([r[k] for r in sel], dtype=float) for k in sel[0] if k != "image_id"}
    q1, q2, q3 = np.percentile(col["g"], [25, 50, 75])
    med = {k: np.median(v) for k, v in col.items()}
    return (
        f"| {name} | {len(sel)} | {q2:.2f} [{q1:.2f}, {q3:.2f}] "
        f"| {100 * np.mean(col['g'] < 0.1):.0f}% | {100 * np.mean(col['g'] < 0.3):.0f}% "
        f"| {med['p_lesion']:.3f} | {med['p_peak']:.3f} | {med['logit']:.2f} "
        f"| {100 * np.mean(col['logit'] > -1e-3):.0f}% | {med['ungated']:.2f} "
        f"| {med['iou300']:.2f} |"
    )


def share(rows: List[Row], key: str) -> float:
    """Percentage of ``rows`` with ``key`` true."""
    return 100.0 * float(np.mean([r[key] for r in rows]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", nargs="+", default=["output/quality_05", "output/quality_14d"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", help="JSON of the per-lesion rows: read if present, else written")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data: Dict[str, List[Row]] = {}
    if args.cache and os.path.exists(args.cache):
        with open(args.cache, encoding="utf-8") as f:
            data = json.load(f)
    for run in args.runs:
        for seed in args.seeds:
            for kind in ("trpn", "fpn"):
                key = os.path.join(run, f"seed{seed}", kind)
                if key not in data:
                    data[key] = lesion_rows(key)
                    if args.cache:
                        with open(args.cache, "w", encoding="utf-8") as f:
                            json.dump(data, f)
    for run in args.runs:
        pooled: List[List[Row]] = [[], []]
        for seed in args.seeds:
            t, r = (data[os.path.join(run, f"seed{seed}", k)] for k in ("trpn", "fpn"))
            assert [x["image_id"] for x in t] == [x["image_id"] for x in r]
            pooled[0] += t
            pooled[1] += r
            _print(f"{run}/seed{seed}/trpn", t, r)
        _print(f"{run}, seeds {' '.join(map(str, args.seeds))} pooled", *pooled)


def _print(title: str, trpn: List[Row], rpn: List[Row]) -> None:
    print(
        f"\n### {title}: {len(trpn)} lesions, covered at 50 / 300: {share(trpn, 'cov50'):.1f} / "
        f"{share(trpn, 'cov300'):.1f}% (RPN {share(rpn, 'cov50'):.1f} / "
        f"{share(rpn, 'cov300'):.1f}%); objectness weights > 0: "
        f"{max(r['pos_weights'] for r in trpn + rpn):.1f}% at most (TRPN and RPN)\n"
    )
    print(summary(trpn, rpn))


if __name__ == "__main__":
    main()
