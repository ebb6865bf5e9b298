"""One series of the second generator: region, geometry, scene, key slices, lesions placed on
them, and the lesions annotated on each key slice."""

from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Tuple

import numpy as np

from .anatomy import build_scene
from .lesions import REGION_TYPES, TYPE_HOSTS, TYPE_WEIGHT, Lesion, measure_section, place_lesion
from .scanner import draw_geometry, paint_plane

REGION_PROB = {"chest": 0.4, "abdomen": 0.45, "pelvis": 0.15}
MIN_ANNOTATED_MM = 3.0  # a section this long or longer on a key slice is annotated there
MAX_LESIONS_PER_KEY = 3


def key_slices(n: int, interval: float, count: int, rng: np.random.Generator) -> List[int]:
    """Key slices with two neighbours on each side, spread at least ~6 mm apart."""
    gap = max(2, int(math.ceil(6.0 / interval)))
    free = list(range(2, n - 2))
    keys: List[int] = []
    while free and len(keys) < count:
        k = int(rng.choice(free))
        keys.append(k)
        free = [j for j in free if abs(j - k) >= gap]
    return sorted(keys)


def annotations(lesion: Lesion, z: float, size: int, spacing: float) -> Dict | None:
    """The lesion's measured section on the plane at ``z`` when long enough to be annotated."""
    sec = measure_section(lesion.shape, z, size, spacing)
    if sec is None or sec["long_px"] * spacing < MIN_ANNOTATED_MM:
        return None
    return sec


def _choose_type(usable: List[int], pending: List[int], rng: np.random.Generator) -> int:
    todo = [t for t in pending if t in usable]
    if todo:
        return todo[0]
    w = np.array([TYPE_WEIGHT[t] for t in usable])
    return int(rng.choice(usable, p=w / w.sum()))


def make_series(
    rng: np.random.Generator,
    image_size: int,
    slices: Tuple[int, int],
    keys_per_series: Tuple[int, int],
    pending: List[int],
) -> Dict:
    """Everything about one series except its pixels (see :func:`.scanner.acquire`); ``pending``
    lesion types (consumed here) steer the region so every type reaches val and test."""
    if pending:
        region = next(r for r in ("abdomen", "chest", "pelvis") if pending[0] in REGION_TYPES[r])
    else:
        region = str(rng.choice(list(REGION_PROB), p=list(REGION_PROB.values())))
    spacing, interval = draw_geometry(rng, image_size)
    n = int(rng.integers(slices[0], slices[1] + 1))
    z_mm = [(k - (n - 1) / 2) * interval for k in range(n)]
    structures, frame = build_scene(region, image_size * spacing, z_mm[0], z_mm[-1], rng)
    keys = key_slices(
        n, interval, int(rng.integers(keys_per_series[0], keys_per_series[1] + 1)), rng
    )
    lesions: List[Lesion] = []

    def count_on(k: int) -> int:
        return sum(annotations(les, z_mm[k], image_size, spacing) is not None for les in lesions)

    for k in keys:
        scene = structures + [s for les in lesions for s in les.structures]
        hu, label, _ = paint_plane(scene, z_mm[k], image_size, spacing)
        wanted = max(
            int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2])),
            min(MAX_LESIONS_PER_KEY, sum(t in REGION_TYPES[region] for t in pending)),
        )
        for _ in range(wanted + 3):
            if count_on(k) >= wanted:
                break
            usable = [t for t in REGION_TYPES[region] if np.isin(label, TYPE_HOSTS[t]).sum() >= 4]
            if not usable:
                break
            t = _choose_type(usable, pending, rng)
            les = place_lesion(t, hu, label, z_mm[k], spacing, lesions, rng)
            if les is None:
                continue
            lesions.append(les)
            if any(count_on(j) > MAX_LESIONS_PER_KEY for j in keys):
                lesions.pop()
                continue
            if t in pending:
                pending.remove(t)
    keyed = {}
    for k in keys:
        secs = [
            (i, annotations(les, z_mm[k], image_size, spacing)) for i, les in enumerate(lesions)
        ]
        secs = [(i, s) for i, s in secs if s is not None]
        if secs:
            keyed[k] = secs
    mimics = Counter(
        s.mimic
        for s in structures
        if s.mimic is not None and any(s.shape.bbox(z) is not None for z in z_mm)
    )
    return {
        "region": region,
        "spacing": spacing,
        "interval": interval,
        "n": n,
        "z_mm": z_mm,
        "structures": structures,
        "frame": frame,
        "lesions": lesions,
        "keys": keyed,
        "mimics": dict(mimics),
    }
