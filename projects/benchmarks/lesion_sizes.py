#!/usr/bin/env python
"""Where a trained model loses lesions, by lesion size: proposals or the box head.

    python projects/benchmarks/lesion_sizes.py --config-file configs/quickstart/fpn.yaml \
        MODEL.WEIGHTS output/quality/seed0/fpn/model_final.pth [KEY VALUE ...]

One inference pass over the config's first test dataset. For each bucket of long diameter (mm):
the lesions in it, their median box width in the record's pixels, the share with a top-300
proposal at IoU >= 0.5 (and >= 0.3), the share found at 4 false positives per image (a detection
at IoU >= 0.5 scoring above the score at which the model makes 4 FPs an image) and the share
found at any score. The FP rule is the evaluator's: noisy lesions are left out, an image whose
lesions are all noisy is left out with its detections, a detection overlapping no kept lesion
at IoU 0.5 is a false positive; summed over buckets, the two shares give the evaluator's
proposal recall at 300 and IoU sensitivity at 4 FPs.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, NamedTuple, Sequence

import numpy as np

EDGES_MM = (0.0, 6.0, 10.0, 15.0, 20.0, float("inf"))


class Lesion(NamedTuple):
    diameter_mm: float
    width_px: float
    best_proposal_iou: float  # over the top-300 proposals
    best_hit_score: float  # highest score of a detection at IoU >= 0.5; -inf when none


def score_at_fps(fp_scores: Sequence[float], num_images: int, fps: float) -> float:
    """The score a detection must exceed for the model to make at most ``fps`` false positives
    an image: the (fps * num_images + 1)-th highest false-positive score, or -inf if there are
    no more false positives than that."""
    allowed = int(np.floor(fps * num_images))
    ranked = sorted(fp_scores, reverse=True)
    return ranked[allowed] if len(ranked) > allowed else float("-inf")


def breakdown(
    lesions: Sequence[Lesion],
    fp_scores: Sequence[float],
    num_images: int,
    fps: float = 4.0,
    edges: Sequence[float] = EDGES_MM,
) -> List[Dict[str, float]]:
    """One row per non-empty diameter bucket [lo, hi): counts and shares in %. Lesions without a
    diameter (NaN) fall in no bucket; the caller reports how many."""
    thr = score_at_fps(fp_scores, num_images, fps)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        b = [x for x in lesions if lo <= x.diameter_mm < hi]
        if not b:
            continue
        rows.append(
            {
                "lo": lo,
                "hi": hi,
                "lesions": len(b),
                "median_width_px": float(np.median([x.width_px for x in b])),
                "proposal_iou50": 100.0 * np.mean([x.best_proposal_iou >= 0.5 for x in b]),
                "proposal_iou30": 100.0 * np.mean([x.best_proposal_iou >= 0.3 for x in b]),
                f"found_at_{fps:g}fp": 100.0 * np.mean([x.best_hit_score > thr for x in b]),
                "found_any_score": 100.0 * np.mean([x.best_hit_score > float("-inf") for x in b]),
            }
        )
    return rows


def collect(cfg) -> tuple:
    """(lesions, false-positive scores, images kept) of the model of ``cfg`` on its test split."""
    import torch

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, BoxMode, pairwise_iou

    from elixir_d2.modeling.capture import capture
    from elixir_d2.trainer import ElixirTrainer

    model = ElixirTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    dataset = cfg.DATASETS.TEST[0]
    records = {r["image_id"]: r for r in DatasetCatalog.get(dataset)}
    lesions: List[Lesion] = []
    fp_scores: List[float] = []
    kept = 0
    with capture(model, "proposals") as captured, torch.no_grad():
        for inputs in ElixirTrainer.build_test_loader(cfg, dataset):
            outputs = model(inputs)
            # Detections and proposals both come in the records' pixels (the model's frame).
            for inp, out, props in zip(inputs, outputs, captured.pop(0)):
                anns = records[inp["image_id"]].get("annotations", [])
                gts = [a for a in anns if not a.get("noisy", False)]
                if anns and not gts:
                    continue  # only noisy lesions: left out with its detections
                kept += 1
                props = props.to("cpu")
                order = torch.argsort(props.objectness_logits, descending=True)[:300]
                proposals = props.proposal_boxes[order]
                inst = out["instances"].to("cpu")
                # In the record's box mode, as the evaluator reads it.
                xyxy = [
                    BoxMode.convert(
                        list(a["bbox"]), a.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS
                    )
                    for a in gts
                ]
                gt = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
                p_iou = pairwise_iou(proposals, gt)
                d_iou = pairwise_iou(inst.pred_boxes, gt)
                hit = d_iou >= 0.5
                fp_scores += inst.scores[~hit.any(1)].tolist()
                for j, (a, box) in enumerate(zip(gts, xyxy)):
                    hits = inst.scores[hit[:, j]]
                    diameter = a.get("diameter_mm")
                    lesions.append(
                        Lesion(
                            float(diameter[0]) if diameter is not None else float("nan"),
                            float(box[2] - box[0]),
                            float(p_iou[:, j].max()) if len(proposals) else 0.0,
                            float(hits.max()) if len(hits) else float("-inf"),
                        )
                    )
    return lesions, fp_scores, kept


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--fps", type=float, default=4.0)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, MODEL.WEIGHTS too")
    args = ap.parse_args(argv)

    import elixir_d2

    cfg = elixir_d2.load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise SystemExit("lesion_sizes.py: give the trained model as MODEL.WEIGHTS path.pth")
    lesions, fp_scores, kept = collect(cfg)
    rows = breakdown(lesions, fp_scores, kept, args.fps)
    print(f"{cfg.DATASETS.TEST[0]}: {len(lesions)} lesions on {kept} images, {cfg.MODEL.WEIGHTS}")
    missing = sum(1 for x in lesions if not np.isfinite(x.diameter_mm))
    if missing:
        print(f"{missing} lesions have no long diameter in the dataset and are in no row below")
    print(
        f"| diameter (mm) | lesions | median width (px) | proposal IoU>=0.5 | >=0.3 "
        f"| found at {args.fps:g} FPs | found at any score |"
    )
    print("|:--|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['lo']:g}-{r['hi']:g} | {r['lesions']} | {r['median_width_px']:.1f} "
            f"| {r['proposal_iou50']:.1f} | {r['proposal_iou30']:.1f} "
            f"| {r[f'found_at_{args.fps:g}fp']:.1f} | {r['found_any_score']:.1f} |"
        )


if __name__ == "__main__":
    main()
