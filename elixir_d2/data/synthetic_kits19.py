"""The KiTS19-format variant of the synthetic CT set (see :mod:`elixir_d2.data.synthetic`)."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import numpy as np

from .kits19 import write_nifti
from .synthetic import SPACING_MM_AT_192, _u
from .synthetic_phantom import (
    KIDNEY,
    LESION,
    RENAL_SINUS,
    SCANNER_HU_RANGE,
    Blob,
    build_anatomy,
    render_series,
)


def write_kits19(
    out_dir: str,
    *,
    num_cases: int = 10,
    num_slices: Tuple[int, int] = (24, 40),
    image_size: int = 192,
    seed: int = 0,
    noise_hu: Tuple[float, float] = (10, 20),
) -> Dict:
    """Write KiTS19-format cases ``out_dir/data/case_XXXXX/{imaging,segmentation}.nii.gz`` in
    place (:func:`elixir_d2.data.synthetic.generate_kits19` makes them appear whole or not at all).

    imaging: int16 HU; segmentation: uint8 0 background, 1 kidney, 2 tumour (1-2 tumours of
    12-45 mm per case, some exophytic). Arrays are (z, y, x) in SimpleITK's view with the voxel
    spacing (x, y, z) in the header, so the slices are on the third NIfTI axis.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 pixels, got {image_size}")
    summary = {
        "out_dir": out_dir,
        "format": "kits19",
        "seed": seed,
        "num_cases": num_cases,
        "tumour_slices": 0,
        "tumours": 0,
    }
    for case in range(num_cases):
        rng = np.random.default_rng([seed, 2, case])
        spacing = _u(rng, *SPACING_MM_AT_192) * 192 / image_size
        interval = float(rng.choice((2.5, 3.0, 5.0)))
        n = int(rng.integers(num_slices[0], num_slices[1] + 1))
        z_mm = [(k - (n - 1) / 2) * interval for k in range(n)]
        blobs, geo = build_anatomy(
            "abdomen",
            image_size * spacing,
            n * interval,
            rng,
            kidney_z=(_u(rng, -0.1, 0.1) * n * interval, _u(rng, 45, 60)),
        )
        tumours: List[Blob] = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            kid = geo["kidneys"][int(rng.integers(2))]
            for _try in range(20):
                z = kid.zc + _u(rng, -0.5, 0.5) * kid.rz
                kx, ky, ka, kb = kid.section(z)
                r = _u(rng, 6, 22.5)
                ang, rr = _u(rng, 0, 2 * math.pi), _u(rng, 0.0, 0.9)
                cx, cy = kx + rr * ka * math.cos(ang), ky + rr * kb * math.sin(ang)
                if all(
                    math.hypot(cx - t.cx, cy - t.cy) > r + t.a + 3 or abs(z - t.zc) > r + t.rz + 3
                    for t in tumours
                ):
                    tumours.append(
                        Blob(
                            cx,
                            cy,
                            r,
                            r * _u(rng, 0.75, 1.0),
                            _u(rng, 30, 90),
                            LESION,
                            theta=_u(rng, 0, math.pi),
                            zc=z,
                            rz=r * _u(rng, 0.8, 1.2),
                            edge=_u(rng, 0.8, 2.0),
                        )
                    )
                    break
        vol, lab = render_series(
            blobs + tumours, z_mm, image_size, spacing, _u(rng, *noise_hu), rng
        )
        seg = np.where(
            lab == LESION, 2, np.where(np.isin(lab, (KIDNEY, RENAL_SINUS)), 1, 0)
        ).astype(np.uint8)
        case_dir = os.path.join(out_dir, "data", f"case_{case:05d}")
        write_nifti(
            np.rint(np.clip(vol, *SCANNER_HU_RANGE)).astype(np.int16),
            (spacing, spacing, interval),
            os.path.join(case_dir, "imaging.nii.gz"),
        )
        write_nifti(
            seg, (spacing, spacing, interval), os.path.join(case_dir, "segmentation.nii.gz")
        )
        summary["tumours"] += len(tumours)
        summary["tumour_slices"] += int((seg == 2).any(axis=(1, 2)).sum())
    return summary
