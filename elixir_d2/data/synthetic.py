"""Synthetic CT lesion data in DeepLesion format (and a KiTS19-format variant), deterministic by
seed.

``python -m elixir_d2.data.synthetic --out datasets/synthetic`` writes ``DL_info.csv`` (the 18
columns of the real file) and ``Images_png/<patient>_<study>_<series>/<slice:03d>.png`` (uint16,
HU + 32768): whole short series of CT-like slices (body, organs at realistic HU, noise) with 3-D
lesions of 3-30 mm in the organ their type names, and lesion-like distractors (vessels crossing
the slices, calcified spots, bowel loops, gallbladder, ribs). ``--format kits19`` writes
``data/case_XXXXX/{imaging,segmentation}.nii.gz`` with kidneys and tumours instead.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.utils.file_io import PathManager

from ..atomic_io import build_dir_atomically
from .ct_mapper import hu_to_png16
from .deeplesion import LESION_TYPES, write_dl_info
from .synthetic_phantom import (
    BONE,
    KIDNEY,
    LESION,
    LIVER,
    LUNG,
    MEDIASTINAL_FAT,
    MUSCLE,
    SCANNER_HU_RANGE,
    SUBCUT_FAT,
    VESSEL,
    VISCERAL_FAT,
    Blob,
    SliceCanvas,
    build_anatomy,
    ellipse_box,
    render_series,
)

SLICE_INTERVALS_MM = (1.0, 1.25, 2.0, 2.5, 5.0)
# Pixel spacing range at 192 px (a 300-420 mm field, as a body CT); other image sizes scale it so
# the field stays a body: 512 px gives 0.6-0.83 mm/px, DeepLesion's usual spacing.
SPACING_MM_AT_192 = (1.6, 2.2)
REGIONS = {"chest": (0.2, 0.45), "abdomen": (0.45, 0.7), "pelvis": (0.7, 0.92)}  # normalised body z
REGION_PROB = {"chest": 0.4, "abdomen": 0.45, "pelvis": 0.15}
# Coarse_lesion_type (1-based, LESION_TYPES order) -> host labels, long-diameter range (mm), weight.
TYPE_HOSTS = {
    1: (BONE,),
    2: (VISCERAL_FAT,),
    3: (MEDIASTINAL_FAT,),
    4: (LIVER,),
    5: (LUNG,),
    6: (KIDNEY,),
    7: (SUBCUT_FAT, MUSCLE),
    8: (VISCERAL_FAT,),
}
TYPE_SIZE_MM = {
    1: (5, 22),
    2: (8, 30),
    3: (8, 28),
    4: (5, 30),
    5: (3, 30),
    6: (6, 28),
    7: (6, 30),
    8: (8, 30),
}
TYPE_WEIGHT = {1: 0.07, 2: 0.17, 3: 0.14, 4: 0.14, 5: 0.2, 6: 0.1, 7: 0.06, 8: 0.12}
REGION_TYPES = {"chest": (5, 3, 7, 1), "abdomen": (4, 6, 2, 7, 1), "pelvis": (8, 7, 1)}
MIN_CONTRAST_HU = 50.0  # lesion HU kept at least this far from the mean of the tissue it replaces
MIN_ANNOTATED_MM = 3.0  # a lesion section this long or longer on a key slice is annotated there
MAX_LESIONS_PER_KEY = 3
NOISY_FRACTION = 0.03
# Default set: 140 patients split 65/10/25 % gives ~230 test lesions (119 key slices), so one
# lesion is under 0.5 % of sensitivity.
DEFAULT_PATIENTS = 140


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def lesion_hu(lesion_type: int, host_label: int, host_hu: float, rng: np.random.Generator) -> float:
    """Lesion attenuation: hypo- or hyper-dense against its host, by type (see
    datasets/README.md)."""
    if lesion_type == 1:
        hu = _u(rng, 10, 80) if rng.random() < 0.6 else _u(rng, 650, 950)  # lytic / sclerotic
    elif lesion_type == 4:
        hu = _u(rng, -5, 15) if rng.random() < 0.7 else host_hu + _u(rng, 70, 120)
    elif lesion_type == 5:
        hu = _u(rng, -60, 40)
    elif lesion_type == 6:
        hu = _u(rng, 0, 20) if rng.random() < 0.5 else _u(rng, 40, 80)  # cyst / solid
    elif lesion_type == 7 and host_label == MUSCLE:
        hu = _u(rng, -20, -5) if rng.random() < 0.5 else _u(rng, 120, 160)
    else:  # nodes and masses in fat: abdomen, mediastinum, pelvis, subcutaneous
        hu = _u(rng, 25, 60)
    if abs(hu - host_hu) < MIN_CONTRAST_HU:
        hu = host_hu + math.copysign(MIN_CONTRAST_HU, hu - host_hu)
    return hu


class LesionPlacer:
    """Places lesions of a given type inside their host tissue on a key slice, without overlaps."""

    def __init__(self, canvas: SliceCanvas, z: float, rng: np.random.Generator):
        self.canvas, self.z, self.rng = canvas, z, rng

    def host_pixels(self, lesion_type: int) -> np.ndarray:
        return np.flatnonzero(np.isin(self.canvas.label, TYPE_HOSTS[lesion_type]))

    def place(
        self,
        lesion_type: int,
        existing: Sequence[Blob],
        tries: int = 30,
        accept: Optional[Callable[[Blob], bool]] = None,
    ) -> Optional[Blob]:
        rng, cv = self.rng, self.canvas
        hosts = TYPE_HOSTS[lesion_type]
        pixels = self.host_pixels(lesion_type)
        if pixels.size < 12:
            return None
        lo, hi = TYPE_SIZE_MM[lesion_type]
        long_mm = lo + (hi - lo) * float(rng.beta(1.5, 1.5))
        for attempt in range(tries):
            if attempt and attempt % 10 == 0:
                long_mm = max(lo, 0.75 * long_mm)
            a = long_mm / 2
            b = a * _u(rng, 0.55, 1.0)
            theta = _u(rng, 0, math.pi)
            p = int(rng.choice(pixels))
            px, py = p % cv.size + _u(rng, 0, 1), p // cv.size + _u(rng, 0, 1)
            got = cv.alpha(px, py, a / cv.spacing, b / cv.spacing, theta, 0.01)
            if got is None:
                continue
            cover, win = got
            inside = cover >= 0.5
            host_lab = cv.label[win][inside]
            # Small vessels may run through lung and liver lesions; other tissue may not. The host
            # also surrounds the lesion (a 1.3x larger ellipse, >= 1 px more), as a box's context.
            ok = hosts + (VESSEL,) if lesion_type in (4, 5) else hosts
            if inside.sum() == 0 or np.isin(host_lab, ok).mean() < 0.9:
                continue
            grow = max(1.3, 1.0 + cv.spacing / a)
            around = cv.alpha(px, py, grow * a / cv.spacing, grow * b / cv.spacing, theta, 0.01)
            if around is None or np.isin(cv.label[around[1]][around[0] >= 0.5], ok).mean() < 0.8:
                continue
            cx, cy = (px - cv.size / 2) * cv.spacing, (py - cv.size / 2) * cv.spacing
            rz = math.sqrt(a * b) * _u(rng, 0.7, 1.3)
            zc = self.z + _u(rng, -0.15, 0.15) * rz
            if any(_overlap(cx, cy, a, theta, zc, rz, o) for o in existing):
                continue
            host_label = int(np.bincount(host_lab[np.isin(host_lab, hosts)]).argmax())
            host_hu = float(cv.hu[win][inside & np.isin(cv.label[win], hosts)].mean())
            hu = lesion_hu(lesion_type, host_label, host_hu, rng)
            blob = Blob(cx, cy, a, b, hu, LESION, theta=theta, zc=zc, rz=rz, edge=_u(rng, 0.8, 2.5))
            if accept is None or accept(blob):
                return blob
        return None


def _overlap(cx, cy, a, theta, zc, rz, other: Blob, margin: float = 3.0) -> bool:
    """Do two lesions' bounding boxes (mm, full size) come within ``margin`` in 3-D?"""
    if abs(zc - other.zc) >= rz + other.rz + margin:
        return False
    return math.hypot(cx - other.cx, cy - other.cy) < a + other.a + margin


def _pick_keys(n: int, interval: float, count: int, rng: np.random.Generator) -> List[int]:
    """Key-slice positions in [2, n - 3] (so +-2 neighbours exist), at least ~6 mm apart."""
    sep = max(2, int(math.ceil(6.0 / interval)))
    keys: List[int] = []
    for k in rng.permutation(np.arange(2, n - 2)).tolist():
        if all(abs(k - j) >= sep for j in keys):
            keys.append(k)
        if len(keys) == count:
            break
    return sorted(keys)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _write_png(arr: np.ndarray, path: str) -> None:
    buf = io.BytesIO()
    # lossless at any level: the fastest
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    with PathManager.open(path, "wb") as f:
        f.write(buf.getvalue())


def _split_of_patients(
    num_patients: int, rng: np.random.Generator, val_frac: float, test_frac: float
) -> List[int]:
    """Train_Val_Test (1/2/3) per patient, a seeded ~70/15/15 split with every split non-empty."""
    if num_patients < 3:
        raise ValueError(f"num_patients must be >= 3 (one per split), got {num_patients}")
    n_val = max(1, int(round(val_frac * num_patients)))
    n_test = max(1, int(round(test_frac * num_patients)))
    if n_val + n_test >= num_patients:
        raise ValueError(f"val_frac + test_frac leave no training patient out of {num_patients}")
    split = [1] * num_patients
    perm = rng.permutation(num_patients)
    for i in perm[:n_val]:
        split[i] = 2
    for i in perm[n_val : n_val + n_test]:
        split[i] = 3
    return split


def _annotated_on(blob: Blob, z: float) -> bool:
    """Whether ``blob``'s section at ``z`` mm is large enough to be annotated."""
    sec = blob.section(z)
    return sec is not None and 2 * sec[2] >= MIN_ANNOTATED_MM


def _fits(blob: Blob, lesions: List[Blob], keys: List[int], z_mm: List[float]) -> bool:
    """At most MAX_LESIONS_PER_KEY annotated lesions on any key slice with ``blob`` added."""
    return all(
        sum(_annotated_on(o, z_mm[j]) for o in lesions) < MAX_LESIONS_PER_KEY
        for j in keys
        if _annotated_on(blob, z_mm[j])
    )


def _lesion_type(rng: np.random.Generator, usable: List[int], pending_types: List[int]) -> int:
    """The next lesion's type: a pending one the host allows, else drawn by TYPE_WEIGHT."""
    todo = [t for t in pending_types if t in usable]
    if todo:
        return todo[0]
    w = np.array([TYPE_WEIGHT[t] for t in usable])
    return int(rng.choice(usable, p=w / w.sum()))


def _series(
    pat_rng: np.random.Generator,
    image_size: int,
    slices_per_series: Tuple[int, int],
    keys_per_series: Tuple[int, int],
    pending_types: List[int],
) -> Dict:
    """One series: geometry, anatomy + lesions (3-D), key slices and the lesions annotated on
    each."""
    rng = pat_rng
    if pending_types:
        region = next(
            r for r in ("abdomen", "chest", "pelvis") if pending_types[0] in REGION_TYPES[r]
        )
    else:
        region = str(rng.choice(list(REGION_PROB), p=list(REGION_PROB.values())))
    spacing = _u(rng, *SPACING_MM_AT_192) * 192 / image_size
    interval = float(rng.choice(SLICE_INTERVALS_MM, p=[0.15, 0.15, 0.2, 0.2, 0.3]))
    n = int(rng.integers(slices_per_series[0], slices_per_series[1] + 1))
    z_mm = [(k - (n - 1) / 2) * interval for k in range(n)]
    blobs, _ = build_anatomy(region, image_size * spacing, n * interval, rng)
    keys = _pick_keys(
        n, interval, int(rng.integers(keys_per_series[0], keys_per_series[1] + 1)), rng
    )
    lesions: List[Blob] = []
    types: List[int] = []
    fits = partial(_fits, lesions=lesions, keys=keys, z_mm=z_mm)
    for k in keys:
        canvas = SliceCanvas(image_size, spacing)
        for blob in blobs:
            canvas.paint(blob, z_mm[k])
        placer = LesionPlacer(canvas, z_mm[k], rng)
        wanted = int(rng.choice([1, 2, 3], p=[0.5, 0.33, 0.17]))
        wanted = max(
            wanted, min(MAX_LESIONS_PER_KEY, sum(t in REGION_TYPES[region] for t in pending_types))
        )
        # lesions of earlier keys reaching this one
        placed = sum(_annotated_on(o, z_mm[k]) for o in lesions)
        for _ in range(wanted + 3):
            if placed >= wanted:
                break
            usable = [t for t in REGION_TYPES[region] if placer.host_pixels(t).size >= 12]
            if not usable:
                break
            t = _lesion_type(rng, usable, pending_types)
            blob = placer.place(t, lesions, accept=fits)
            if blob is not None:
                lesions.append(blob)
                types.append(t)
                placed += 1
                if t in pending_types:
                    pending_types.remove(t)
    annotated = {}
    for k in keys:
        rows = [i for i, les in enumerate(lesions) if _annotated_on(les, z_mm[k])]
        if rows:
            annotated[k] = rows
    return {
        "region": region,
        "spacing": spacing,
        "interval": interval,
        "n": n,
        "z_mm": z_mm,
        "blobs": blobs,
        "lesions": lesions,
        "types": types,
        "keys": annotated,
    }


def _lesion_row(
    les: Blob,
    lesion_type: int,
    z: float,
    sp: float,
    size: int,
    noisy: bool,
    rng: np.random.Generator,
) -> Dict[str, str]:
    """Geometry columns of one DL_info row: RECIST, box (both written +1 as DL_info is),
    diameters."""
    cx_mm, cy_mm, a, b = les.section(z)
    cx, cy = size / 2 + cx_mm / sp, size / 2 + cy_mm / sp
    a, b = a / sp, b / sp
    if noisy:  # a possibly-noisy annotation: shifted off the lesion by 20-40 % of its size
        ang = _u(rng, 0, 2 * math.pi)
        cx, cy = (
            cx + _u(rng, 0.4, 0.8) * a * math.cos(ang),
            cy + _u(rng, 0.4, 0.8) * a * math.sin(ang),
        )
    c, s = math.cos(les.theta), math.sin(les.theta)
    recist = [
        cx - a * c,
        cy - a * s,
        cx + a * c,
        cy + a * s,
        cx + b * s,
        cy - b * c,
        cx - b * s,
        cy + b * c,
    ]
    box = ellipse_box(cx, cy, a, b, les.theta)
    return {
        "Measurement_coordinates": _fmt([v + 1 for v in recist]),
        "Bounding_boxes": _fmt([v + 1 for v in box]),
        "Lesion_diameters_Pixel_": _fmt([2 * a, 2 * b]),
    }


def write_deeplesion(
    out_dir: str,
    *,
    num_patients: int = DEFAULT_PATIENTS,
    slices_per_series: Tuple[int, int] = (12, 20),
    keys_per_series: Tuple[int, int] = (3, 6),
    image_size: int = 192,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.25,
    noise_hu: Tuple[float, float] = (10, 20),
    noisy_fraction: float = NOISY_FRACTION,
) -> Dict:
    """Write a DeepLesion-format data set into ``out_dir`` in place (use
    :func:`generate_deeplesion`, which takes the same options and makes the set appear whole or not
    at all); returns (and writes) a summary.

    One study / series per patient; every slice of each series is written, so ``Slice_range``
    is exactly what is on disk. Train lesions get Coarse_lesion_type -1, val/test 1..8 (each
    type appears in val and in test once those splits have a few patients).
    """
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 pixels, got {image_size}")
    if not 5 <= slices_per_series[0] <= slices_per_series[1] <= 900:
        raise ValueError(
            f"slices_per_series must be (lo, hi) with 5 <= lo <= hi <= 900, got {slices_per_series}"
        )
    if not 1 <= keys_per_series[0] <= keys_per_series[1]:
        raise ValueError(
            f"keys_per_series must be (lo, hi) with 1 <= lo <= hi, got {keys_per_series}"
        )
    split_of = _split_of_patients(
        num_patients, np.random.default_rng([seed, 0]), val_frac, test_frac
    )
    pending = {s: [] for s in (1, 2, 3)}
    for s in (2, 3):  # every lesion type early in val and test, in a seeded order
        pending[s] = [int(t) for t in np.random.default_rng([seed, s]).permutation(np.arange(1, 9))]
    rows: List[Dict[str, str]] = []
    summary = {
        "out_dir": out_dir,
        "format": "deeplesion",
        "seed": seed,
        "num_patients": num_patients,
        "image_size": image_size,
        "slices_written": 0,
        "noisy_lesions": 0,
        "splits": {
            name: {
                "patients": 0,
                "key_slices": 0,
                "lesions": 0,
                "types": {t: 0 for t in LESION_TYPES},
            }
            for name in ("train", "val", "test")
        },
    }
    PathManager.mkdirs(os.path.join(out_dir, "Images_png"))
    for pat in range(1, num_patients + 1):
        rng = np.random.default_rng([seed, 1, pat])
        split = split_of[pat - 1]
        ser = _series(rng, image_size, slices_per_series, keys_per_series, pending[split])
        first = int(rng.integers(1, 999 - ser["n"]))
        folder = f"{pat:06d}_01_01"
        vol, _ = render_series(
            ser["blobs"] + ser["lesions"],
            ser["z_mm"],
            image_size,
            ser["spacing"],
            _u(rng, *noise_hu),
            rng,
        )
        png = hu_to_png16(np.clip(vol, *SCANNER_HU_RANGE))
        sdir = os.path.join(out_dir, "Images_png", folder)
        PathManager.mkdirs(sdir)
        for k in range(ser["n"]):
            _write_png(png[k], os.path.join(sdir, f"{first + k:03d}.png"))
        summary["slices_written"] += ser["n"]
        gender, age = ("M", "F")[int(rng.integers(2))], int(rng.integers(18, 90))
        window = "-1350, 150" if ser["region"] == "chest" else "-175, 275"
        zlo, zhi = REGIONS[ser["region"]]
        sname = ("train", "val", "test")[split - 1]
        stats = summary["splits"][sname]
        stats["patients"] += 1
        for k, lesion_ids in ser["keys"].items():
            stats["key_slices"] += 1
            for i in lesion_ids:
                les, t = ser["lesions"][i], ser["types"][i]
                noisy = bool(rng.random() < noisy_fraction)
                row = {
                    "File_name": f"{folder}_{first + k:03d}.png",
                    "Patient_index": str(pat),
                    "Study_index": "1",
                    "Series_ID": "1",
                    "Key_slice_index": str(first + k),
                    "Normalized_lesion_location": _fmt(
                        [
                            0.5 + les.cx / (image_size * ser["spacing"]),
                            0.5 + les.cy / (image_size * ser["spacing"]),
                            zlo + (zhi - zlo) * k / max(ser["n"] - 1, 1),
                        ],
                        4,
                    ),
                    "Coarse_lesion_type": str(t if split != 1 else -1),
                    "Possibly_noisy": str(int(noisy)),
                    "Slice_range": f"{first}, {first + ser['n'] - 1}",
                    "Spacing_mm_px_": f"{ser['spacing']:.6f}, {ser['spacing']:.6f}, "
                    f"{ser['interval']:g}",
                    "Image_size": f"{image_size}, {image_size}",
                    "DICOM_windows": window,
                    "Patient_gender": gender,
                    "Patient_age": str(age),
                    "Train_Val_Test": str(split),
                }
                row.update(
                    _lesion_row(les, t, ser["z_mm"][k], ser["spacing"], image_size, noisy, rng)
                )
                rows.append(row)
                stats["lesions"] += 1
                stats["types"][LESION_TYPES[t - 1]] += 1
                summary["noisy_lesions"] += int(noisy)
    write_dl_info(os.path.join(out_dir, "DL_info.csv"), rows)
    with PathManager.open(os.path.join(out_dir, "synthetic_info.json"), "w", encoding="utf-8") as f:
        # same bytes anywhere
        json.dump({k: v for k, v in summary.items() if k != "out_dir"}, f, indent=1)
    return summary


def _generate(kind: str, write: Callable[..., Dict], out_dir: str, options: Dict) -> Dict:
    """``write(out_dir, **options)`` into a temporary folder renamed to ``out_dir`` when complete,
    with a completion marker holding the generator, every option (defaults included) and the
    counts."""
    bound = inspect.signature(write).bind(out_dir, **options)
    bound.apply_defaults()
    recorded = json.loads(json.dumps({k: v for k, v in bound.arguments.items() if k != "out_dir"}))
    marker = {"generator": kind, "options": recorded}
    summary = build_dir_atomically(
        out_dir,
        lambda tmp: {k: v for k, v in write(tmp, **options).items() if k != "out_dir"},
        marker,
    )
    return dict(summary, out_dir=out_dir)


def generate_deeplesion(out_dir: str, **options) -> Dict:
    """:func:`write_deeplesion` (same options) into a temporary folder renamed to ``out_dir`` when
    complete, replacing an older set; interrupted, it leaves ``out_dir`` as it was. The set's
    :data:`~elixir_d2.atomic_io.MARKER` records the options, seed and counts."""
    return _generate("deeplesion", write_deeplesion, out_dir, options)


def generate_kits19(out_dir: str, **options) -> Dict:
    """:func:`~elixir_d2.data.synthetic_kits19.write_kits19` (same options), whole or not at all
    as :func:`generate_deeplesion`."""
    from .synthetic_kits19 import write_kits19

    return _generate("kits19", write_kits19, out_dir, options)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(
        description="Write a synthetic CT lesion data set (DeepLesion or KiTS19 format)"
    )
    parser.add_argument("--out", required=True, help="output folder (e.g. datasets/synthetic)")
    parser.add_argument("--format", choices=("deeplesion", "kits19"), default="deeplesion")
    parser.add_argument(
        "--patients",
        type=int,
        default=None,
        help=f"patients (deeplesion, default {DEFAULT_PATIENTS}) or cases (kits19, default 10)",
    )
    parser.add_argument("--size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--slices",
        type=int,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="slices per series (deeplesion, default 12 20) or case (kits19, default 24 40)",
    )
    args = parser.parse_args(argv)
    if args.format == "deeplesion":
        kw = {"slices_per_series": tuple(args.slices)} if args.slices else {}
        summary = generate_deeplesion(
            args.out,
            num_patients=args.patients or DEFAULT_PATIENTS,
            image_size=args.size,
            seed=args.seed,
            **kw,
        )
    else:
        kw = {"num_slices": tuple(args.slices)} if args.slices else {}
        summary = generate_kits19(
            args.out, num_cases=args.patients or 10, image_size=args.size, seed=args.seed, **kw
        )
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
