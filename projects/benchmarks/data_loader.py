#!/usr/bin/env python
"""Records/s of CTDatasetMapper on 512x512 3-slice records, one core (targets: >= 60/s at a 2 mm
slice interval, >= 45/s at 1.25 mm).

    python projects/benchmarks/data_loader.py [--records 200] [--interval 1.25] [--spacing 0.7]

Writes a temporary DeepLesion-format series of 512x512 uint16 PNGs (a CT-like phantom: air, body at
soft-tissue HU, lungs, spine, 15 HU noise), then maps records whose key slices cycle through it; PNG
decoding, interpolation between slices (when the interval does not divide 2 mm: 5 slices read
instead of 3), windowing and spacing normalisation are all timed. PNG decoding dominates.
"""

import argparse
import os
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from elixir_d2.data.ct_mapper import CTDatasetMapper, hu_to_png16


def phantom(rng: np.random.Generator) -> np.ndarray:
    """A 512x512 CT-like slice in HU."""
    yy, xx = np.mgrid[0:512, 0:512]
    hu = np.full((512, 512), -1000.0)
    hu[((xx - 256) / 220) ** 2 + ((yy - 256) / 170) ** 2 < 1] = 40.0
    for cx in (180, 332):
        hu[((xx - cx) / 60) ** 2 + ((yy - 230) / 90) ** 2 < 1] = -850.0
    hu[((xx - 256) / 25) ** 2 + ((yy - 360) / 25) ** 2 < 1] = 700.0
    return (hu + rng.normal(0, 15, hu.shape)).clip(-1024, 3071)


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Run the benchmark (``argv``: command-line arguments); returns records/s."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument(
        "--interval", type=float, default=2.0, help="slice interval in mm (1.25: 5 slices read)"
    )
    ap.add_argument("--spacing", type=float, default=0.7, help="pixel spacing in mm")
    ap.add_argument("--train", action="store_true", help="training mapper (random flip, instances)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        series = os.path.join(tmp, "Images_png", "000001_01_01")
        os.makedirs(series)
        for i in range(1, args.slices + 1):
            hu = phantom(rng)
            Image.fromarray(hu_to_png16(hu)).save(os.path.join(series, f"{i:03d}.png"))
        mapper = CTDatasetMapper(
            args.train,
            num_slices=3,
            slice_interval_mm=2.0,
            hu_window=(-1024.0, 3071.0),
            norm_spacing_mm=0.8,
            max_size=512,
            flip_prob=0.5,
        )
        records = []
        for n in range(args.records):
            key = 3 + n % (args.slices - 4)
            records.append(
                {
                    "file_name": f"{series}/{key:03d}.png",
                    "image_id": n,
                    "height": 512,
                    "width": 512,
                    "slice_dir": series,
                    "slice_idx": key,
                    "slice_range": (1, args.slices),
                    "slice_intv": args.interval,
                    "spacing": args.spacing,
                    "hu_window": (-175, 275),
                    "annotations": [
                        {"bbox": [100.0, 120.0, 140.0, 150.0], "bbox_mode": 0, "category_id": 0}
                    ],
                }
            )
        for r in records[:5]:  # warm-up
            mapper(r)
        t0 = time.perf_counter()
        for r in records:
            out = mapper(r)
        dt = time.perf_counter() - t0
    print(
        f"CTDatasetMapper: {args.records} records 512x512x3 (interval {args.interval} mm, "
        f"spacing {args.spacing} mm -> output {tuple(out['image'].shape)}), 1 thread: "
        f"{args.records / dt:.1f} records/s ({1000 * dt / args.records:.1f} ms/record); targets "
        ">= 60/s at 2 mm, >= 45/s at 1.25 mm"
    )
    return args.records / dt


if __name__ == "__main__":
    main()
