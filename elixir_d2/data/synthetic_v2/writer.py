"""DeepLesion-format output of the second generator: PNG series, DL_info.csv (the 18 columns),
a summary, and the whole-or-nothing folder with its completion marker."""

from __future__ import annotations

import inspect
import json
import math
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

from detectron2.utils.file_io import PathManager

from ...atomic_io import build_dir_atomically
from ..ct_mapper import hu_to_png16
from ..deeplesion import LESION_TYPES, write_dl_info
from .scanner import acquire, noise_sigma
from .series import make_series
from .tissues import MIMIC_KINDS

GENERATOR = "deeplesion_v2"
DEFAULT_PATIENTS = 140
NOISY_FRACTION = 0.03
REGION_Z = {"chest": (0.2, 0.45), "abdomen": (0.45, 0.7), "pelvis": (0.7, 0.92)}
WINDOWS = {"chest": "-1350, 150", "abdomen": "-175, 275", "pelvis": "-160, 240"}


def split_patients(num_patients: int, seed: int, val_frac: float, test_frac: float) -> List[int]:
    """Train_Val_Test (1/2/3) of each patient: a seeded shuffle cut into val, test and train."""
    n_val = max(1, int(round(val_frac * num_patients)))
    n_test = max(1, int(round(test_frac * num_patients)))
    if num_patients < 3 or n_val + n_test >= num_patients:
        raise ValueError(
            f"{num_patients} patients leave a split empty (val {val_frac}, test {test_frac})"
        )
    order = np.random.default_rng([seed, 7001]).permutation(num_patients)
    split = np.ones(num_patients, int)
    split[order[:n_val]] = 2
    split[order[n_val : n_val + n_test]] = 3
    return split.tolist()


def _fmt(values, digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _write_png(hu: np.ndarray, path: str) -> None:
    ok, buf = cv2.imencode(".png", hu_to_png16(hu), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    with PathManager.open(path, "wb") as f:
        f.write(buf.tobytes())


def _geometry_columns(sec: Dict, noisy: bool, rng: np.random.Generator) -> Dict[str, str]:
    """Box, RECIST end points and diameters, + 1 as DL_info writes them; a possibly-noisy row is
    shifted off its lesion by 40-80 % of the long radius."""
    dx = dy = 0.0
    if noisy:
        ang, f = rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 0.8) * sec["long_px"] / 2
        dx, dy = f * math.cos(ang), f * math.sin(ang)
    shift = [dx, dy] * 4
    box = [v + d + 1 for v, d in zip(sec["box"], [dx, dy, dx, dy])]
    return {
        "Bounding_boxes": _fmt(box),
        "Measurement_coordinates": _fmt([v + d + 1 for v, d in zip(sec["recist"], shift)]),
        "Lesion_diameters_Pixel_": _fmt([sec["long_px"], sec["short_px"]]),
    }


# The scanner's own pixels (0.6-1.0 mm, .scanner): a 3 mm lesion spans 3-5 px. At 192 px the same
# field gives 1.6-2.67 mm pixels, where the smallest lesions are 1-2 px and the quickstart models
# found about 10% of the lesions at 4 FPs.
DEFAULT_IMAGE_SIZE = 512


def write_deeplesion_v2(
    out_dir: str,
    *,
    num_patients: int = DEFAULT_PATIENTS,
    slices_per_series: Tuple[int, int] = (12, 20),
    keys_per_series: Tuple[int, int] = (3, 6),
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.25,
    noisy_fraction: float = NOISY_FRACTION,
) -> Dict:
    """Write the set into ``out_dir`` in place (see :func:`generate_deeplesion_v2`); returns the
    summary, also written as ``synthetic_info.json`` with the mimics (never annotated) counted."""
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 pixels, got {image_size}")
    if not 5 <= slices_per_series[0] <= slices_per_series[1]:
        raise ValueError(
            f"slices_per_series must be (lo, hi) with 5 <= lo <= hi, got {slices_per_series}"
        )
    split_of = split_patients(num_patients, seed, val_frac, test_frac)
    pending = {1: [], 2: [], 3: []}
    for s in (2, 3):
        pending[s] = [int(t) for t in np.random.default_rng([seed, 7002, s]).permutation(8) + 1]
    empty = {"patients": 0, "key_slices": 0, "lesions": 0, "hypodense": 0, "hyperdense": 0}
    summary = {
        "generator": GENERATOR,
        "seed": seed,
        "num_patients": num_patients,
        "image_size": image_size,
        "slices_written": 0,
        "noisy_lesions": 0,
        "splits": {
            n: dict(empty, types={t: 0 for t in LESION_TYPES}, mimics={k: 0 for k in MIMIC_KINDS})
            for n in ("train", "val", "test")
        },
    }
    rows: List[Dict[str, str]] = []
    PathManager.mkdirs(os.path.join(out_dir, "Images_png"))
    for pat in range(1, num_patients + 1):
        rng = np.random.default_rng([seed, 7003, pat])
        split = split_of[pat - 1]
        ser = make_series(rng, image_size, slices_per_series, keys_per_series, pending[split])
        scene = ser["structures"] + [s for les in ser["lesions"] for s in les.structures]
        sigma = noise_sigma(ser["frame"].cav_a + 25.0, rng)
        vol = acquire(scene, ser["z_mm"], image_size, ser["spacing"], ser["interval"], sigma, rng)
        first = int(rng.integers(1, 999 - ser["n"]))
        folder = f"{pat:06d}_01_01"
        PathManager.mkdirs(os.path.join(out_dir, "Images_png", folder))
        for k in range(ser["n"]):
            _write_png(vol[k], os.path.join(out_dir, "Images_png", folder, f"{first + k:03d}.png"))
        summary["slices_written"] += ser["n"]
        stats = summary["splits"][("train", "val", "test")[split - 1]]
        stats["patients"] += 1
        for kind, c in ser["mimics"].items():
            stats["mimics"][kind] += c
        gender, age = ("M", "F")[int(rng.integers(2))], int(rng.integers(18, 90))
        zlo, zhi = REGION_Z[ser["region"]]
        fov = image_size * ser["spacing"]
        for k, secs in ser["keys"].items():
            stats["key_slices"] += 1
            for i, sec in secs:
                les = ser["lesions"][i]
                noisy = bool(rng.random() < noisy_fraction)
                row = {
                    "File_name": f"{folder}_{first + k:03d}.png",
                    "Patient_index": str(pat),
                    "Study_index": "1",
                    "Series_ID": "1",
                    "Key_slice_index": str(first + k),
                    "Normalized_lesion_location": _fmt(
                        [
                            0.5 + les.shape.c[0] / fov,
                            0.5 + les.shape.c[1] / fov,
                            zlo + (zhi - zlo) * k / max(ser["n"] - 1, 1),
                        ],
                        4,
                    ),
                    "Coarse_lesion_type": str(les.lesion_type if split != 1 else -1),
                    "Possibly_noisy": str(int(noisy)),
                    "Slice_range": f"{first}, {first + ser['n'] - 1}",
                    "Spacing_mm_px_": f"{ser['spacing']:.6f}, {ser['spacing']:.6f}, "
                    f"{ser['interval']:g}",
                    "Image_size": f"{image_size}, {image_size}",
                    "DICOM_windows": WINDOWS[ser["region"]],
                    "Patient_gender": gender,
                    "Patient_age": str(age),
                    "Train_Val_Test": str(split),
                }
                row.update(_geometry_columns(sec, noisy, rng))
                rows.append(row)
                stats["lesions"] += 1
                stats["hypodense" if les.hu < les.host_hu else "hyperdense"] += 1
                stats["types"][LESION_TYPES[les.lesion_type - 1]] += 1
                summary["noisy_lesions"] += int(noisy)
    write_dl_info(os.path.join(out_dir, "DL_info.csv"), rows)
    with PathManager.open(os.path.join(out_dir, "synthetic_info.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return dict(summary, out_dir=out_dir)


def generate_deeplesion_v2(out_dir: str, **options) -> Dict:
    """:func:`write_deeplesion_v2` (same options) into a temporary folder renamed to ``out_dir``
    when complete; the completion marker records the generator, every option and the counts."""
    bound = inspect.signature(write_deeplesion_v2).bind(out_dir, **options)
    bound.apply_defaults()
    recorded = json.loads(json.dumps({k: v for k, v in bound.arguments.items() if k != "out_dir"}))
    summary = build_dir_atomically(
        out_dir,
        lambda tmp: {
            k: v for k, v in write_deeplesion_v2(tmp, **options).items() if k != "out_dir"
        },
        {"generator": GENERATOR, "options": recorded},
    )
    return dict(summary, out_dir=out_dir)
