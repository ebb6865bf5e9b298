"""Lesions of the second generator: lobulated 3-D solids with irregular margins, hypo- or
hyperdense against their host, sometimes rim-enhancing, placed inside the tissue their
DeepLesion type names; and the RECIST-like measurement of a lesion's section on a slice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .scanner import pixel_centres
from .tissues import (
    BONE,
    KIDNEY,
    LESION,
    LIVER,
    LUNG,
    MEDIASTINAL_FAT,
    MUSCLE,
    PANCREAS,
    PELVIC_FAT,
    SPLEEN,
    SUBCUT_FAT,
    VESSEL,
    VISCERAL_FAT,
    Structure,
)

# Coarse_lesion_type (1-based, DeepLesion's order) -> host tissues
TYPE_HOSTS: Dict[int, Tuple[int, ...]] = {
    1: (BONE,),
    2: (VISCERAL_FAT, PANCREAS, SPLEEN),
    3: (MEDIASTINAL_FAT,),
    4: (LIVER,),
    5: (LUNG,),
    6: (KIDNEY,),
    7: (SUBCUT_FAT, MUSCLE),
    8: (PELVIC_FAT,),
}
REGION_TYPES = {"chest": (5, 3, 7, 1), "abdomen": (4, 6, 2, 7, 1), "pelvis": (8, 7, 1)}
TYPE_WEIGHT = {1: 0.08, 2: 0.16, 3: 0.13, 4: 0.15, 5: 0.18, 6: 0.1, 7: 0.08, 8: 0.12}
SIZE_RANGE_MM = (3.0, 30.0)
MEDIAN_SIZE_MM = 11.0  # long diameters are log-normal around it, clipped to SIZE_RANGE_MM
FAT_HOSTS = (VISCERAL_FAT, MEDIASTINAL_FAT, PELVIC_FAT, SUBCUT_FAT)


class Lobulated:
    """A rotated ellipsoid with 0-3 lobes on its surface and a wavy margin (plane waves of the
    normalised coordinates); ``grow`` mm is added to (or, negative, taken from) every radius."""

    def __init__(
        self,
        centre: Sequence[float],
        radii: Sequence[float],
        theta: float,
        lobes: List[Tuple[np.ndarray, float]],
        waves: List[Tuple[np.ndarray, float, float]],
        grow: float = 0.0,
    ):
        self.c = np.asarray(centre, float)
        self.r = np.asarray(radii, float)
        self.theta, self.lobes, self.waves, self.grow = theta, lobes, waves, grow

    def scaled(self, factor: float) -> "Lobulated":
        c = self.c
        return Lobulated(c, self.r * factor, self.theta, self.lobes, self.waves, self.grow * factor)

    def shrunk(self, mm: float) -> "Lobulated":
        return Lobulated(self.c, self.r, self.theta, self.lobes, self.waves, self.grow - mm)

    def extent(self) -> float:
        """A bound on the distance from the centre to any inside point (mm)."""
        lobe = max((float(np.linalg.norm(o)) + s for o, s in self.lobes), default=1.0)
        return float(self.r.max()) * max(1.15, lobe) * 1.1 + max(self.grow, 0.0)

    def bbox(self, z: float):
        e = self.extent()
        if abs(z - self.c[2]) >= e:
            return None
        return self.c[0] - e, self.c[1] - e, self.c[0] + e, self.c[1] + e

    def inside(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        ct, st = math.cos(self.theta), math.sin(self.theta)
        dx, dy = x - self.c[0], y - self.c[1]
        dz = np.full(np.broadcast(x, y).shape, z - self.c[2], np.float32)
        # shrink or grow by `grow` mm through the normalised radii
        r = np.maximum(self.r + self.grow, 0.3)
        q = [(dx * ct + dy * st) / r[0], (-dx * st + dy * ct) / r[1], dz / r[2]]
        f = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
        for w, amp, ph in self.waves:
            f = f + amp * np.sin(w[0] * q[0] + w[1] * q[1] + w[2] * q[2] + ph)
        out = f <= 1.0
        for off, s in self.lobes:
            out |= ((q[0] - off[0]) ** 2 + (q[1] - off[1]) ** 2 + (q[2] - off[2]) ** 2) <= s * s
        return out


def _in_plane_feret(shape: Lobulated) -> float:
    """The largest in-plane extent (mm) of the 3-D solid, from a coarse grid."""
    e = shape.extent()
    g = np.linspace(-e, e, 25, dtype=np.float32)
    pts = []
    for z in g:
        m = shape.inside(shape.c[0] + g[None, :], shape.c[1] + g[:, None], float(shape.c[2] + z))
        ys, xs = np.nonzero(m)
        pts.append(np.stack([g[xs], g[ys]], 1))
    p = np.concatenate(pts)
    if not len(p):
        return 1e-6
    angles = np.linspace(0, math.pi, 36, endpoint=False)
    proj = p @ np.stack([np.cos(angles), np.sin(angles)])
    return float((proj.max(0) - proj.min(0)).max() + 2 * e / 24)


def draw_lesion_shape(
    rng: np.random.Generator, centre: Sequence[float], long_mm: float
) -> Lobulated:
    """A lobulated solid whose largest in-plane extent is ``long_mm``."""
    lobes = []
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.35, 0.3, 0.2, 0.15]))):
        d = rng.normal(0, 1, 3)
        d[2] *= 0.5
        lobes.append((0.8 * d / np.linalg.norm(d), float(rng.uniform(0.35, 0.6))))
    waves = [
        (rng.normal(0, 3.0, 3), float(rng.uniform(0.0, 0.12)), float(rng.uniform(0, 6.3)))
        for _ in range(3)
    ]
    radii = np.array([1.0, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.2)])
    shape = Lobulated(centre, radii, float(rng.uniform(0, math.pi)), lobes, waves)
    return shape.scaled(long_mm / _in_plane_feret(shape))


def lesion_hu(
    lesion_type: int, host_label: int, host_hu: float, long_mm: float, rng: np.random.Generator
) -> float:
    """Attenuation against the host: hypo- or hyperdense by type; small lesions need more contrast
    to have been seen at all (a floor of 20 HU + 150 HU mm / size)."""
    if lesion_type == 5:
        hu = rng.uniform(-40, 45) if rng.random() < 0.7 else rng.uniform(-650, -350)  # solid / GGO
    elif lesion_type == 1:
        lytic = rng.random() < 0.6
        hu = host_hu - rng.uniform(80, 200) if lytic else host_hu + rng.uniform(150, 400)
    elif host_label in FAT_HOSTS:
        hu = rng.uniform(10, 50)
    else:
        hypo = {LIVER: 0.65, KIDNEY: 0.75}.get(host_label, 0.55)
        hu = (
            host_hu - rng.uniform(20, 120 if host_label == KIDNEY else 70)
            if rng.random() < hypo
            else host_hu + rng.uniform(20, 60)
        )
    floor = 20.0 + 150.0 / long_mm
    if abs(hu - host_hu) < floor:
        hu = host_hu + math.copysign(floor, hu - host_hu)
    return float(hu)


@dataclass
class Lesion:
    shape: Lobulated
    lesion_type: int
    hu: float
    host_hu: float
    structures: List[Structure]


def place_lesion(
    lesion_type: int,
    plane_hu: np.ndarray,
    plane_label: np.ndarray,
    z: float,
    spacing: float,
    existing: Sequence[Lesion],
    rng: np.random.Generator,
    tries: int = 25,
) -> Optional[Lesion]:
    """A lesion of ``lesion_type`` centred near the plane at ``z`` inside its host (>= 85 % of its
    section) and surrounded by it (>= 60 % of a ring), apart from ``existing`` lesions."""
    hosts = TYPE_HOSTS[lesion_type]
    allowed = hosts + ((VESSEL,) if lesion_type in (4, 5) else ())
    cand = np.flatnonzero(np.isin(plane_label, hosts))
    if cand.size < 4:
        return None
    size = plane_label.shape[0]
    xs = pixel_centres(size, spacing)
    long_mm = float(np.clip(MEDIAN_SIZE_MM * math.exp(rng.normal(0, 0.55)), *SIZE_RANGE_MM))
    for attempt in range(tries):
        if attempt and attempt % 8 == 0:
            long_mm = max(SIZE_RANGE_MM[0], 0.7 * long_mm)
        p = int(rng.choice(cand))
        cx, cy = float(xs[p % size]), float(xs[p // size])
        shape = draw_lesion_shape(rng, (cx, cy, z), long_mm)
        shape.c[2] = z + float(rng.uniform(-0.25, 0.25)) * shape.r[2]
        e = shape.extent()
        if any(np.linalg.norm(shape.c - o.shape.c) < e + o.shape.extent() + 2.0 for o in existing):
            continue
        pad = max(2.0 * spacing, 0.4 * e)
        c0, c1 = np.searchsorted(xs, [cx - e - pad, cx + e + pad])
        r0, r1 = np.searchsorted(xs, [cy - e - pad, cy + e + pad])
        inside = shape.inside(xs[None, c0:c1], xs[r0:r1, None], z)
        ring = shape.scaled(1.0 + pad / e).inside(xs[None, c0:c1], xs[r0:r1, None], z) & ~inside
        labels = plane_label[r0:r1, c0:c1]
        if not inside.any() or np.isin(labels[inside], allowed).mean() < 0.85:
            continue
        if not ring.any() or np.isin(labels[ring], allowed).mean() < 0.6:
            continue
        host_in = inside & np.isin(labels, hosts)
        host_label = int(np.bincount(labels[host_in]).argmax())
        host_hu = float(np.median(plane_hu[r0:r1, c0:c1][host_in]))
        hu = lesion_hu(lesion_type, host_label, host_hu, long_mm, rng)
        structures = [Structure("lesion", LESION, hu, shape, texture=float(rng.uniform(4, 10)))]
        if (
            hu < host_hu
            and host_label not in FAT_HOSTS + (LUNG,)
            and long_mm >= 8
            and rng.random() < 0.3
        ):  # rim enhancement around a hypodense centre
            rim_mm = float(rng.uniform(1.0, 2.5))
            structures = [
                Structure(
                    "lesion rim", LESION, host_hu + float(rng.uniform(15, 50)), shape, texture=3.0
                ),
                Structure("lesion", LESION, hu, shape.shrunk(rim_mm), texture=6.0),
            ]
        return Lesion(shape, lesion_type, hu, host_hu, structures)
    return None


def measure_section(
    shape: Lobulated, z: float, size: int, spacing: float, oversample: int = 4
) -> Optional[Dict]:
    """The lesion's section on the plane at ``z``, in pixels (continuous: pixel (c, r) covers
    [c, c+1) x [r, r+1)), from a grid ``oversample`` times finer: tight box, long diameter (the
    largest extent over 90 directions), short diameter (the extent across it), RECIST end
    points."""
    box = shape.bbox(z)
    if box is None:
        return None
    step = 1.0 / oversample
    lo_x, lo_y = box[0] / spacing + size / 2, box[1] / spacing + size / 2
    n = int(math.ceil((box[2] - box[0]) / spacing * oversample)) + 2
    u = (np.floor(lo_x * oversample) + np.arange(n) + 0.5) * step  # sub-pixel centres (px)
    v = (np.floor(lo_y * oversample) + np.arange(n) + 0.5) * step
    m = shape.inside(((u - size / 2) * spacing)[None, :], ((v - size / 2) * spacing)[:, None], z)
    rows, cols = np.nonzero(m)
    if not len(rows):
        return None
    p = np.stack([u[cols], v[rows]], 1)
    angles = np.linspace(0, math.pi, 90, endpoint=False)
    dirs = np.stack([np.cos(angles), np.sin(angles)])
    proj = p @ dirs
    ext = proj.max(0) - proj.min(0) + step
    i = int(ext.argmax())
    j = (i + 45) % 90
    centre = p.mean(0)

    def ends(k: int) -> List[float]:
        d = dirs[:, k]
        t0, t1 = proj[:, k].min() - step / 2, proj[:, k].max() + step / 2
        off = centre - (centre @ d) * d
        return [*(off + t0 * d), *(off + t1 * d)]

    return {
        "box": [
            float(p[:, 0].min() - step / 2),
            float(p[:, 1].min() - step / 2),
            float(p[:, 0].max() + step / 2),
            float(p[:, 1].max() + step / 2),
        ],
        "long_px": float(ext[i]),
        "short_px": float(ext[j]),
        "recist": ends(i) + ends(j),
        "centre": [float(c) for c in centre],
    }
