#!/usr/bin/env python
"""Inference speed on a CT volume: whole run vs the model's own forward passes (target <= 2x).

    python projects/benchmarks/predict_speed.py [--slices 100] [--size 512] [--format nifti|dicom]
        [--config-file configs/quickstart/fpn.yaml] [--weights W] [--batch-size 4] [--threads 0]

Writes a CT-like phantom volume (body, lungs, spine, a few lesions, 15 HU noise; 0.7 mm pixels,
2.5 mm slices) as a NIfTI file or a DICOM series in a temporary folder, then times
``run_prediction`` on it: reading the file, building every slice's 3-slice input, batched forward
passes, grouping, JSON / CSV / COCO writing and the overlay PNGs. The forward time is measured
around the model calls inside the same run; model construction and weight loading are excluded.
Without --weights the model is randomly initialised: its detections are meaningless and numerous
(pessimistic for the output writing), its forward cost is the trained model's.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from elixir_d2 import load_config
from elixir_d2.inference import PredictOptions, run_prediction


def phantom_volume(slices: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(slices, size, size) int16 HU: an elliptic body with lungs and spine, three lesions."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.43) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
    lungs = (((xx - 0.35) / 0.12) ** 2 + ((yy - 0.45) / 0.18) ** 2 < 1) | (
        ((xx - 0.65) / 0.12) ** 2 + ((yy - 0.45) / 0.18) ** 2 < 1
    )
    spine = ((xx - 0.5) / 0.05) ** 2 + ((yy - 0.7) / 0.05) ** 2 < 1
    base = np.full((size, size), -1000.0)
    base[body] = 40.0
    base[lungs] = -850.0
    base[spine] = 700.0
    vol = np.empty((slices, size, size), np.int16)
    lesions = [(0.3, 0.3, 0.03, 0.2, 0.4), (0.6, 0.55, 0.05, 0.5, 0.7), (0.45, 0.6, 0.02, 0.7, 0.8)]
    for z in range(slices):
        s = base.copy()
        for cx, cy, r, z0, z1 in lesions:
            if z0 * slices <= z < z1 * slices:
                s[((xx - cx) ** 2 + (yy - cy) ** 2) < r * r] = 110.0
        vol[z] = np.clip(s + rng.normal(0, 15, s.shape), -1024, 3071).astype(np.int16)
    return vol


def write_volume(folder: str, vol: np.ndarray, fmt: str, spacing: float, interval: float) -> str:
    import SimpleITK as sitk

    if fmt == "nifti":
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((spacing, spacing, interval))
        path = os.path.join(folder, "phantom.nii.gz")
        sitk.WriteImage(img, path)
        return path
    path = os.path.join(folder, "phantom_dicom")
    os.makedirs(path)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z, hu in enumerate(vol):
        img = sitk.GetImageFromArray(hu)
        img.SetSpacing((spacing, spacing))
        for k, v in {
            "0008|0060": "CT",
            "0028|1052": "-1024",
            "0028|1053": "1",
            "0020|0032": f"0\\0\\{z * interval}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|000d": "1.2.3",
            "0020|000e": "1.2.3.4",
            "0008|0018": f"1.2.3.4.{z}",
            "0020|0013": str(z + 1),
        }.items():
            img.SetMetaData(k, v)
        writer.SetFileName(os.path.join(path, f"{z:04d}.dcm"))
        writer.Execute(img)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--format", choices=("nifti", "dicom"), default="nifti")
    ap.add_argument("--config-file", default="configs/quickstart/fpn.yaml")
    ap.add_argument("--weights", default="")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--score-thresh", type=float, default=0.5)
    ap.add_argument("--spacing", type=float, default=0.7, help="pixel spacing in mm")
    ap.add_argument("--interval", type=float, default=2.5, help="slice interval in mm")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config_file)  # safe YAML: a config file cannot run code
    cfg.MODEL.WEIGHTS = args.weights
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.score_thresh
    cfg.freeze()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_volume(
            tmp,
            phantom_volume(args.slices, args.size, np.random.default_rng(0)),
            args.format,
            args.spacing,
            args.interval,
        )
        print(
            f"wrote a {args.slices} x {args.size} x {args.size} {args.format} volume in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        summary = run_prediction(
            cfg,
            path,
            os.path.join(tmp, "out"),
            PredictOptions(batch_size=args.batch_size, progress=False),
        )
    case = summary["cases"][0]
    t = summary["timing_s"]
    print(
        f"config {args.config_file} "
        f"({'weights ' + args.weights if args.weights else 'random init'}), device "
        f"{args.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}"
    )
    print(
        f"model saw {case['model_input_size']} px slices (native {args.size} px at "
        f"{args.spacing} mm; INPUT.NORM_SPACING_MM {cfg.INPUT.NORM_SPACING_MM}, MAX_IMAGE_SIZE "
        f"{cfg.INPUT.MAX_IMAGE_SIZE})"
    )
    print(f"{case['slices']} slices: {case['detections']} detections, {case['findings']} findings")
    print(f"model setup (excluded): {t['model_setup']:.2f} s")
    print(
        f"total {t['total']:.2f} s | model forward {t['model_forward']:.2f} s | input building "
        f"{t['prepare_inputs']:.2f} s | rest (read, outputs, overlays) "
        f"{t['total'] - t['model_forward'] - t['prepare_inputs']:.2f} s"
    )
    ratio = t["total_over_forward"]
    print(f"total / forward = {ratio:.2f} (target <= 2.0: {'PASS' if ratio <= 2.0 else 'FAIL'})")


if __name__ == "__main__":
    main()
