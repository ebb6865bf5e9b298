"""Normal structures that look like lesions on one slice and are never annotated: vessels
running through the slices, bowel loops (wall with gas, fluid or oral contrast), small normal
lymph nodes, cyst-like fluid organs (gallbladder, bladder, renal pelvis) and calcifications."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np

from .shapes import Clipped, SuperEllipse, Tube3D, random_walk
from .tissues import BOWEL, CALCIFIC, FLUID, NODE, VESSEL, Structure

Point = Tuple[float, float, float]


def pick_in(
    shape, z_lo: float, z_hi: float, rng: np.random.Generator, tries: int = 40
) -> Optional[Point]:
    """A point (x, y, z) inside ``shape`` with z in [z_lo, z_hi], by rejection; None if none
    found."""
    for _ in range(tries):
        z = float(rng.uniform(z_lo, z_hi))
        box = shape.bbox(z)
        if box is None:
            continue
        x, y = float(rng.uniform(box[0], box[2])), float(rng.uniform(box[1], box[3]))
        if shape.inside(np.array([x]), np.array([y]), z)[0]:
            return x, y, z
    return None


def vessels(
    rng: np.random.Generator,
    within,
    count: int,
    radius: Tuple[float, float],
    hu: Tuple[float, float],
    z_lo: float,
    z_hi: float,
    along_z: float = 1.0,
) -> List[Structure]:
    """Tubes crossing the slices inside ``within``: a disc on each slice, drifting between them.
    ``along_z`` < 1 tilts them toward the plane (longer, oval sections)."""
    out = []
    for _ in range(count):
        start = pick_in(within, z_lo, z_hi, rng)
        if start is None:
            continue
        ang = rng.uniform(0, 2 * math.pi)
        tilt = math.sqrt(max(0.0, 1 - along_z**2))
        d = (tilt * math.cos(ang), tilt * math.sin(ang), along_z * rng.choice([-1.0, 1.0]))
        span = z_hi - z_lo + 40
        steps = int(math.ceil(span / 6.0))
        fwd = random_walk(rng, start, d, steps, 6.0, 0.12)
        back = random_walk(rng, start, [-v for v in d], steps, 6.0, 0.12)[1:][::-1]
        path = np.concatenate([back, fwd])
        shape = Clipped(Tube3D(path, float(rng.uniform(*radius))), within)
        out.append(
            Structure("vessel", VESSEL, float(rng.uniform(*hu)), shape, mimic="vessel", texture=2.0)
        )
    return out


def bowel_loops(
    rng: np.random.Generator, within, count: int, z_lo: float, z_hi: float
) -> List[Structure]:
    """Loops meandering mostly in-plane: a soft-tissue wall around gas, fluid or oral contrast."""
    out = []
    for _ in range(count):
        start = pick_in(within, z_lo - 10, z_hi + 10, rng)
        if start is None:
            continue
        ang = rng.uniform(0, 2 * math.pi)
        path = random_walk(
            rng,
            start,
            (math.cos(ang), math.sin(ang), rng.uniform(-0.35, 0.35)),
            int(rng.integers(6, 14)),
            float(rng.uniform(5, 9)),
            0.4,
        )
        r = float(rng.uniform(7, 15))
        wall = float(rng.uniform(1.5, 3.0))
        content = rng.choice(["gas", "fluid", "contrast", "mixed"], p=[0.3, 0.35, 0.2, 0.15])
        hu_in = {
            "gas": rng.uniform(-980, -700),
            "fluid": rng.uniform(0, 25),
            "contrast": rng.uniform(180, 450),
            "mixed": rng.uniform(-80, 60),
        }[str(content)]
        out.append(
            Structure(
                "bowel wall",
                BOWEL,
                float(rng.uniform(30, 60)),
                Clipped(Tube3D(path, r), within),
                mimic="bowel",
                texture=3.0,
            )
        )
        out.append(
            Structure(
                "bowel content",
                BOWEL,
                float(hu_in),
                Clipped(Tube3D(path, r - wall), within),
                texture=8.0,
            )
        )
    return out


def small_solids(
    rng: np.random.Generator,
    within,
    count: int,
    semi_axis: Tuple[float, float],
    hu: Tuple[float, float],
    kind: str,
    z_lo: float,
    z_hi: float,
) -> List[Structure]:
    """Small ellipsoid-like solids: normal lymph nodes (``kind`` 'node') or calcifications."""
    out = []
    label = NODE if kind == "node" else CALCIFIC
    for _ in range(count):
        at = pick_in(within, z_lo, z_hi, rng)
        if at is None:
            continue
        a = float(rng.uniform(*semi_axis))
        b = a * float(rng.uniform(0.55, 0.95))
        hz = a * float(rng.uniform(0.8, 1.6))
        shape = SuperEllipse(
            at[0],
            at[1],
            a,
            b,
            2.0,
            float(rng.uniform(0, math.pi)),
            at[2] - hz,
            at[2] + hz,
            taper=hz,
        )
        out.append(Structure(kind, label, float(rng.uniform(*hu)), shape, mimic=kind, texture=2.0))
    return out


def cyst_like(
    name: str, shape, rng: np.random.Generator, hu: Tuple[float, float] = (0.0, 20.0)
) -> Structure:
    """A normal fluid organ (gallbladder, bladder, renal pelvis): round and hypodense as a cyst."""
    return Structure(name, FLUID, float(rng.uniform(*hu)), shape, mimic="cyst", texture=2.0)
