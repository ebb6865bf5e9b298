#!/usr/bin/env python
"""How hard a DeepLesion-format set is, per split, measured from its DL_info.csv and PNGs.

    python projects/benchmarks/set_stats.py synthetic synthetic_seed7 synthetic_v2
    python projects/benchmarks/set_stats.py datasets/DeepLesion --splits test

A set is a folder holding DL_info.csv or a registered prefix (``synthetic_v2`` loads, and so
generates on first use, ``synthetic_v2_train``). Per split: patients, key slices, lesions; long
diameter quantiles (10/50/90 %, mm and px) and the share under 10 mm; lesion contrast in HU read
from the key slice's PNG (mean inside the box's inscribed ellipse minus the mean of a ring around
it, lesions flagged Possibly_noisy left out): median |contrast| and the share of hypodense
lesions; lesion-like spots per key slice outside every box (extrema of a difference of
Gaussians at lesion scales passing SIFT's edge test, the same detector on every set); and the
lesion-like distractors the generator recorded (``mimics`` of synthetic_info.json), if it did.
``--json`` writes the numbers with the run's ``provenance`` (docs/evaluation.md, "Provenance of
results").
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from elixir_d2.data.ct_mapper import HU_OFFSET
from elixir_d2.data.deeplesion import SPLITS, read_dl_info

SPOT_SIGMAS_MM = (1.5, 3.0, 6.0)  # DoG scales for spots of about 3-30 mm
SPOT_MIN_HU = 40.0
EDGE_RATIO = (3 + 1) ** 2 / 3  # principal curvatures at most 3:1
QUANTILES = (0.1, 0.5, 0.9)


def resolve(set_name: str) -> str:
    """A folder with DL_info.csv, or the root of a registered ``<prefix>_train`` (loaded once,
    which generates a synthetic set on first use)."""
    if os.path.isfile(os.path.join(set_name, "DL_info.csv")):
        return set_name
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import elixir_d2.data  # noqa: F401  (registers the datasets)

    DatasetCatalog.get(f"{set_name}_train")
    return MetadataCatalog.get(f"{set_name}_train").dataset_root


def read_hu(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(path)
    return img.astype(np.float32) - HU_OFFSET


def ellipse_contrast(hu: np.ndarray, box: Sequence[float]) -> float:
    """Mean HU in the box's inscribed ellipse minus the mean of a ring around it (from 1 px
    outside the ellipse to max(3 px, half the semi-axis) further)."""
    x1, y1, x2, y2 = box
    cx, cy, a, b = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
    grow = max(3.0, 0.5 * max(a, b))
    h, w = hu.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5

    def inside(da: float) -> np.ndarray:
        return ((xs - cx) / (a + da)) ** 2 + ((ys - cy) / (b + da)) ** 2 <= 1.0

    core = inside(0.0)
    if not core.any():  # a box under a pixel: its centre pixel
        core = np.zeros_like(core)
        core[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    ring = inside(1.0 + grow) & ~inside(1.0)
    return float(hu[core].mean() - hu[ring].mean())


def lesion_like_spots(hu: np.ndarray, spacing: float, boxes: List[Sequence[float]]) -> int:
    """Extrema of |DoG| >= SPOT_MIN_HU inside the body at lesion scales, outside every box
    (grown by 2 px), merged across scales within 3 px."""
    body = cv2.erode((hu > -500).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    found: List[Tuple[int, int]] = []
    for s_mm in SPOT_SIGMAS_MM:
        s = max(s_mm / spacing, 0.6)
        dog = cv2.GaussianBlur(hu, (0, 0), s) - cv2.GaussianBlur(hu, (0, 0), 1.6 * s)
        mag = np.abs(dog)
        peak = (mag >= SPOT_MIN_HU) & (mag >= cv2.dilate(mag, np.ones((5, 5), np.uint8))) & body
        # SIFT's edge test on the Hessian: a blob curves alike both ways, an edge or ridge not
        g = cv2.GaussianBlur(hu, (0, 0), s)
        dxx, dyy = cv2.Sobel(g, -1, 2, 0), cv2.Sobel(g, -1, 0, 2)
        dxy = cv2.Sobel(g, -1, 1, 1)
        det, tr = dxx * dyy - dxy**2, dxx + dyy
        peak &= (det > 0) & (tr * tr < EDGE_RATIO * det)
        for y, x in zip(*np.nonzero(peak)):
            if any(
                b[0] - 2 <= x + 0.5 <= b[2] + 2 and b[1] - 2 <= y + 0.5 <= b[3] + 2 for b in boxes
            ):
                continue
            if all((x - u) ** 2 + (y - v) ** 2 > 9 for u, v in found):
                found.append((int(x), int(y)))
    return len(found)


def set_stats(root: str, splits: Sequence[str] = tuple(SPLITS)) -> Dict[str, Dict]:
    """The statistics of each split of the set at ``root`` (see the module docstring)."""
    lesions = read_dl_info(os.path.join(root, "DL_info.csv"))
    info_path = os.path.join(root, "synthetic_info.json")
    info = json.load(open(info_path, encoding="utf-8")) if os.path.isfile(info_path) else {}
    out = {}
    for split in splits:
        rows = [les for les in lesions if les["split"] == SPLITS[split]]
        by_key: Dict[str, List[Dict]] = {}
        for les in rows:
            by_key.setdefault(les["file_name"], []).append(les)
        long_mm = np.array([les["diameter_px"][0] * les["spacing"][0] for les in rows])
        long_px = np.array([les["diameter_px"][0] for les in rows])
        contrast, spots = [], []
        for les_list in by_key.values():
            first = les_list[0]
            hu = read_hu(
                os.path.join(
                    root, "Images_png", first["series_dir"], f"{first['name_slice']:03d}.png"
                )
            )
            contrast += [ellipse_contrast(hu, les["bbox"]) for les in les_list if not les["noisy"]]
            spots.append(lesion_like_spots(hu, first["spacing"][0], [x["bbox"] for x in les_list]))
        c = np.array(contrast)
        mimics = info.get("splits", {}).get(split, {}).get("mimics")
        out[split] = {
            "patients": len({les["patient"] for les in rows}),
            "key_slices": len(by_key),
            "lesions": len(rows),
            "long_mm_q": [float(np.quantile(long_mm, q)) for q in QUANTILES],
            "long_px_q": [float(np.quantile(long_px, q)) for q in QUANTILES],
            "under_10mm": float((long_mm < 10).mean()),
            "abs_contrast_hu_median": float(np.median(np.abs(c))),
            "contrast_hu_q": [float(np.quantile(c, q)) for q in QUANTILES],
            "hypodense": float((c < 0).mean()),
            "spots_per_key_slice": float(np.mean(spots)),
            "mimics": sum(mimics.values()) if mimics else None,
        }
    return out


def table(results: Dict[str, Dict[str, Dict]]) -> str:
    """A Markdown table, one row per set and split."""
    head = (
        "| set | split | patients | key slices | lesions | long diam. mm p10/p50/p90 | px "
        "p10/p50/p90 | < 10 mm | median abs contrast HU | contrast HU p10/p50/p90 | hypodense "
        "| spots / key slice | recorded mimics |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, per in results.items():
        for split, s in per.items():
            q = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
            lines.append(
                f"| {name} | {split} | {s['patients']} | {s['key_slices']} | {s['lesions']} | "
                f"{q(s['long_mm_q'])} | {q(s['long_px_q'])} | {s['under_10mm']:.0%} | "
                f"{s['abs_contrast_hu_median']:.0f} | "
                f"{'/'.join(f'{x:.0f}' for x in s['contrast_hu_q'])} | {s['hypodense']:.0%} | "
                f"{s['spots_per_key_slice']:.1f} | "
                f"{'-' if s['mimics'] is None else s['mimics']} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Dict[str, Dict[str, Dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="+", help="folders or registered prefixes")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.json and "provenance" in args.sets:
        parser.error("a set named 'provenance' would clash with the --json file's provenance key")
    results = {name: set_stats(resolve(name), args.splits) for name in args.sets}
    print(table(results))
    if args.json:
        from elixir_d2.provenance import provenance

        prov = provenance(None if argv is None else [__file__, *argv])
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"provenance": prov, **results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
