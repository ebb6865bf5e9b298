"""Shared by the test_reliability_* files: a tiny hand-made DeepLesion-format set and configs.

The set is built so that every training key slice carries exactly one lesion and every image has
the same size and spacing: the per-image loss normalisers of detectron2's RPN and ROI heads are
then the same for every image, which is what makes a 2-process run (1 image per process)
comparable number for number with a 1-process run (2 images per batch).
"""

import csv
import os
from typing import List, Sequence

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart", "fpn.yaml")

SIZE = 64
SPACING_MM = 2.0  # = the quickstart INPUT.NORM_SPACING_MM: images keep their 64 px
SLICE_INTV_MM = 2.0  # = INPUT.SLICE_INTV_MM: the neighbours are real slices, no interpolation


def _columns():
    from elixir_d2.data.deeplesion import DL_INFO_COLUMNS

    return list(DL_INFO_COLUMNS)


def write_tiny_deeplesion(root: str, num_train: int = 4, num_test: int = 3, seed: int = 0) -> str:
    """Write DL_info.csv + 3-slice series (key slice 2) under ``root``; one lesion per key slice.

    Body: a water-like disc (40 HU + noise) in air; lesion: a 150 HU disc of radius 8-13 px.
    """
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    body = (xx - SIZE / 2) ** 2 + (yy - SIZE / 2) ** 2 < (0.45 * SIZE) ** 2
    for pat in range(1, num_train + num_test + 1):
        split = 1 if pat <= num_train else 3
        r = float(rng.uniform(8, 13))
        cx, cy = rng.uniform(SIZE * 0.3, SIZE * 0.7, size=2)
        folder = f"{pat:06d}_01_01"
        sdir = os.path.join(root, "Images_png", folder)
        os.makedirs(sdir, exist_ok=True)
        for k in (1, 2, 3):
            hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, (SIZE, SIZE))
            lesion = (xx - cx) ** 2 + (yy - cy) ** 2 < (r * (1.0 if k == 2 else 0.7)) ** 2
            hu[lesion] = 150.0 + rng.normal(0, 15, int(lesion.sum()))
            png = np.clip(np.round(hu) + 32768, 0, 65535).astype(np.uint16)
            Image.fromarray(png).save(os.path.join(sdir, f"{k:03d}.png"))
        # DL_info boxes are 1-based (the loader subtracts 1)
        box = (cx - r + 1, cy - r + 1, cx + r + 1, cy + r + 1)
        rows.append(
            {
                "File_name": f"{folder}_002.png",
                "Patient_index": str(pat),
                "Study_index": "1",
                "Series_ID": "1",
                "Key_slice_index": "2",
                "Measurement_coordinates": ", ".join(
                    f"{v:.2f}" for v in (cx - r, cy, cx + r, cy, cx, cy - r, cx, cy + r)
                ),
                "Bounding_boxes": ", ".join(f"{v:.3f}" for v in box),
                "Lesion_diameters_Pixel_": f"{2 * r:.3f}, {2 * r:.3f}",
                "Normalized_lesion_location": "0.5, 0.5, 0.5",
                "Coarse_lesion_type": "-1" if split == 1 else "4",
                "Possibly_noisy": "0",
                "Slice_range": "1, 3",
                "Spacing_mm_px_": f"{SPACING_MM}, {SPACING_MM}, {SLICE_INTV_MM}",
                "Image_size": f"{SIZE}, {SIZE}",
                "DICOM_windows": "-175, 275",
                "Patient_gender": "F",
                "Patient_age": "50",
                "Train_Val_Test": str(split),
            }
        )
    with open(os.path.join(root, "DL_info.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_columns())
        w.writeheader()
        w.writerows(rows)
    return root


def tiny_opts(prefix: str, output_dir: str, max_iter: int, **extra) -> List[str]:
    """Command-line opts turning configs/quickstart/fpn.yaml into a seconds-long CPU run."""
    opts = {
        "DATASETS.TRAIN": f"('{prefix}_train',)",
        "DATASETS.TEST": f"('{prefix}_test',)",
        "OUTPUT_DIR": output_dir,
        "INPUT.MAX_IMAGE_SIZE": "64",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.MAX_ITER": str(max_iter),
        "SOLVER.WARMUP_ITERS": "2",
        "SOLVER.STEPS": "()",
        "SOLVER.BASE_LR": "0.01",
        "SOLVER.CHECKPOINT_PERIOD": "1000",
        "DATALOADER.NUM_WORKERS": "0",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST": "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "32",
        "TEST.DETECTIONS_PER_IMAGE": "20",
        "SEED": "0",
        # GroupNorm: each DDP replica's BatchNorm statistics follow its own half of the batch,
        # so with BN the replicas' buffers would differ by design.
        "MODEL.RESNETS.NORM": "GN",
        "MODEL.FPN.NORM": "GN",
    }
    opts.update({k: str(v) for k, v in extra.items()})
    return [x for kv in opts.items() for x in kv]


def build_cfg(opts: Sequence[str], config_file: str = QUICKSTART):
    """cfg as train_net.setup builds it, without default_setup's side effects."""
    from elixir_d2 import load_config

    cfg = load_config(config_file, opts)
    cfg.freeze()
    return cfg
