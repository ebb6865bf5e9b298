"""The body model of the second generator: nested superellipse walls (skin, subcutaneous fat,
muscle, cavity) whose size varies along z, Fourier-outline organs (lungs, heart, liver, spleen),
superellipse kidneys and bones, tubes for great vessels, ribs and pancreas, and the mimics of
:mod:`.mimics` in each region (chest, abdomen, pelvis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np

from . import mimics
from .shapes import Clipped, Radial, SuperEllipse, Tube3D, ZSpline
from .tissues import (
    BONE,
    CORTEX,
    HEART,
    KIDNEY,
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

REGIONS = ("chest", "abdomen", "pelvis")


@dataclass
class Frame:
    """The body of one series: the cavity outline and numbers the organs are placed by."""

    rng: np.random.Generator
    z_lo: float
    z_hi: float
    cy: float  # body centre row (mm)
    cav_a: float  # cavity semi-axes at mid-series (mm)
    cav_b: float
    cavity: SuperEllipse
    enhanced: float  # 0 unenhanced .. 1 arterial: sets blood and organ HU

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def spline(self, mean: float, jitter: float) -> ZSpline:
        return ZSpline.drawn(self.rng, self.z_lo - 20, self.z_hi + 20, mean, jitter)

    def at(self, fx: float, fy: float) -> Tuple[float, float]:
        """Cavity-relative position (-1..1 across each semi-axis) -> mm."""
        return fx * self.cav_a, self.cy + fy * self.cav_b

    def blood_hu(self) -> float:
        return 40 + self.enhanced * self.u(90, 200)

    def harmonics(self, amp: float) -> List[Tuple[int, float, float, float]]:
        return [
            (k, self.u(0.3, 1.0) * amp / k**0.5, self.u(0, 2 * math.pi), self.u(-0.01, 0.01))
            for k in (2, 3, 4)
        ]


def _shrunk(a: Callable, b: Callable, da: Callable, db: Callable, p: float, cy: float):
    return SuperEllipse(0.0, cy, lambda z: a(z) - da(z), lambda z: b(z) - db(z), p)


def _walls(
    rng: np.random.Generator, fov: float, z_lo: float, z_hi: float, region: str, enhanced: float
) -> Tuple[Frame, List[Structure]]:
    half_w = min(float(rng.uniform(135, 185)), 0.45 * fov)
    half_h = half_w * float(rng.uniform(0.6, 0.8))
    cy = float(rng.uniform(-10, 5))
    p = float(rng.uniform(2.1, 3.0))
    spl = lambda m, j: ZSpline.drawn(rng, z_lo - 20, z_hi + 20, m, j)  # noqa: E731
    a, b = spl(half_w, 0.03 * half_w), spl(half_h, 0.03 * half_h)
    fat = spl(float(rng.uniform(6, 30)), 3.0)
    wall = float(rng.uniform(7, 15))
    body = SuperEllipse(0.0, cy, a, b, p)
    muscle = _shrunk(a, b, fat, lambda z: 0.8 * fat(z), p, cy)
    cavity = _shrunk(a, b, lambda z: fat(z) + wall, lambda z: 0.8 * fat(z) + wall, p, cy)
    fill = {"chest": MEDIASTINAL_FAT, "abdomen": VISCERAL_FAT, "pelvis": PELVIC_FAT}[region]
    zm = 0.5 * (z_lo + z_hi)
    frame = Frame(
        rng, z_lo, z_hi, cy, a(zm) - fat(zm) - wall, b(zm) - 0.8 * fat(zm) - wall, cavity, enhanced
    )
    out = [
        Structure("subcutaneous fat", SUBCUT_FAT, frame.u(-115, -90), body, texture=5.0),
        Structure("body wall muscle", MUSCLE, frame.u(40, 60), muscle, texture=5.0),
        Structure("cavity fat", fill, frame.u(-105, -75), cavity, texture=6.0),
    ]
    return frame, out


def _spine(f: Frame, sacrum: bool) -> List[Structure]:
    """Paraspinal muscles, vertebral bodies (cortex, cancellous bone) with discs every 25-35 mm,
    posterior elements."""
    y = f.cy + 0.62 * f.cav_b
    r = f.u(14, 20) * (1.4 if sacrum else 1.0)
    out = [
        Structure(
            "paraspinal",
            MUSCLE,
            f.u(40, 60),
            SuperEllipse(s * r * 1.3, y + r * 1.6, r * 1.2, r * 0.9, 2.4),
            texture=5.0,
        )
        for s in (-1, 1)
    ]
    out.append(
        Structure("vertebral cortex", CORTEX, f.u(500, 800), SuperEllipse(0.0, y, r, r * 0.85, 2.3))
    )
    out.append(
        Structure(
            "vertebral body",
            BONE,
            f.u(170, 290),
            SuperEllipse(0.0, y, r - 2.0, r * 0.85 - 2.0, 2.3),
            texture=8.0,
        )
    )
    period, z = f.u(25, 35), f.z_lo - f.u(0, 30)
    while z < f.z_hi + 10 and not sacrum:
        disc = SuperEllipse(0.0, y, r - 1.0, r * 0.85 - 1.0, 2.3, 0.0, z, z + f.u(4, 8))
        out.append(Structure("disc", MUSCLE, f.u(70, 95), disc, texture=3.0))
        z += period
    out.append(
        Structure(
            "posterior elements",
            CORTEX,
            f.u(350, 600),
            SuperEllipse(0.0, y + r * 1.35, r * 0.9, r * 0.35, 2.0),
        )
    )
    return out


def _ribs(f: Frame, count: int) -> List[Structure]:
    """Arcs hugging the inner body wall, descending anteriorly (oblique sections)."""
    out = []
    for i in range(count):
        side = 1 if i % 2 else -1
        z0 = f.u(f.z_lo - 20, f.z_hi + 20)
        ts = np.linspace(-0.4 * math.pi, 0.45 * math.pi, 12)
        pts = np.stack(
            [
                side * 1.02 * f.cav_a * np.cos(ts),
                f.cy + 1.02 * f.cav_b * np.sin(ts),
                z0 - f.u(60, 90) * (ts - ts[0]) / (ts[-1] - ts[0]),
            ],
            axis=1,
        )
        out.append(Structure("rib", CORTEX, f.u(350, 700), Tube3D(pts, f.u(3.5, 6.0))))
    return out


def _great_vessels(f: Frame, names_xy: List[Tuple[str, float, float, float]]) -> List[Structure]:
    """Near-vertical tubes (aorta, IVC, iliac vessels) with slow drift."""
    out = []
    for name, fx, fy, r in names_xy:
        x, y = f.at(fx, fy)
        zs = np.linspace(f.z_lo - 30, f.z_hi + 30, 6)
        drift = np.cumsum(f.rng.normal(0, 2.0, (2, 6)), axis=1)
        pts = np.stack([x + drift[0], y + drift[1], zs], axis=1)
        out.append(Structure(name, VESSEL, f.blood_hu(), Tube3D(pts, r), texture=2.0))
    return out


def _chest(f: Frame) -> List[Structure]:
    out = mimics.small_solids(
        f.rng, f.cavity, int(f.rng.integers(4, 10)), (2.0, 4.5), (25, 55), "node", f.z_lo, f.z_hi
    )
    lungs = []
    for side in (-1, 1):
        cx, cy = f.at(side * f.u(0.45, 0.55), -0.05)
        shape = Clipped(
            Radial(
                cx,
                cy,
                f.spline(0.5 * f.cav_a, 0.05 * f.cav_a),
                f.harmonics(0.1),
                f.z_lo - 200,
                f.z_hi + 200,
                aspect=f.u(0.6, 0.8),
            ),
            f.cavity,
        )
        lungs.append(shape)
        out.append(Structure("lung", LUNG, f.u(-880, -820), shape, texture=12.0))
    hz = f.u(f.z_lo - 40, f.z_hi)
    hx, hy = f.at(0.12, -0.15)
    heart = Radial(hx, hy, f.u(42, 60), f.harmonics(0.08), hz - 60, hz + 60, taper=30)
    out.append(Structure("heart", HEART, f.blood_hu(), heart))
    out += _great_vessels(
        f, [("descending aorta", 0.18, 0.42, f.u(9, 13)), ("svc", -0.12, -0.25, f.u(7, 10))]
    )
    out += _spine(f, sacrum=False) + _ribs(f, int(f.rng.integers(6, 11)))
    for lung in lungs:
        blood = f.blood_hu()
        out += mimics.vessels(
            f.rng,
            lung,
            int(f.rng.integers(30, 50)),
            (0.8, 3.2),
            (blood - 30, blood),
            f.z_lo,
            f.z_hi,
            f.u(0.5, 0.95),
        )
        out += mimics.small_solids(
            f.rng,
            lung,
            int(f.rng.integers(1, 5)),
            (1.0, 2.5),
            (250, 700),
            "calcification",
            f.z_lo,
            f.z_hi,
        )
    return out


def _abdomen(f: Frame) -> List[Structure]:
    out: List[Structure] = []
    # nodes and mesenteric vessels first: organs painted later hide the parts inside them
    out += mimics.small_solids(
        f.rng, f.cavity, int(f.rng.integers(6, 14)), (2.0, 4.5), (25, 55), "node", f.z_lo, f.z_hi
    )
    blood = f.blood_hu()
    out += mimics.vessels(
        f.rng,
        f.cavity,
        int(f.rng.integers(10, 18)),
        (1.5, 3.5),
        (blood - 40, blood),
        f.z_lo,
        f.z_hi,
        f.u(0.4, 0.9),
    )
    lx, ly = f.at(-f.u(0.35, 0.45), -f.u(0.0, 0.15))
    liver_z = f.u(f.z_lo - 30, f.z_hi + 10)
    liver = Clipped(
        Radial(
            lx,
            ly,
            f.spline(0.55 * f.cav_a, 0.06 * f.cav_a),
            f.harmonics(0.14),
            liver_z - 120,
            liver_z + 60,
            taper=40,
        ),
        f.cavity,
    )
    liver_hu = f.u(55, 70) + f.enhanced * f.u(20, 45)
    out.append(Structure("liver", LIVER, liver_hu, liver, texture=7.0))
    out += mimics.vessels(
        f.rng,
        liver,
        int(f.rng.integers(3, 8)),
        (1.5, 4.5),
        (liver_hu - 30, liver_hu + 50 * f.enhanced + 20),
        f.z_lo,
        f.z_hi,
        f.u(0.3, 0.9),
    )
    gx, gy = lx + f.u(10, 30), ly + f.u(-10, 25)
    gz = f.u(f.z_lo, f.z_hi)
    out.append(
        mimics.cyst_like(
            "gallbladder",
            Clipped(
                SuperEllipse(
                    gx,
                    gy,
                    f.u(10, 18),
                    f.u(8, 14),
                    2.0,
                    f.u(0, math.pi),
                    gz - 35,
                    gz + 35,
                    taper=20,
                ),
                liver,
            ),
            f.rng,
        )
    )
    sx, sy = f.at(f.u(0.45, 0.6), f.u(0.1, 0.35))
    sz = f.u(f.z_lo - 40, f.z_hi + 40)
    out.append(
        Structure(
            "spleen",
            SPLEEN,
            f.u(45, 60) + f.enhanced * f.u(20, 50),
            Clipped(
                Radial(
                    sx,
                    sy,
                    f.u(30, 48),
                    f.harmonics(0.18),
                    sz - 55,
                    sz + 55,
                    taper=30,
                    aspect=f.u(0.7, 1.3),
                ),
                f.cavity,
            ),
            texture=5.0,
        )
    )
    kz = f.u(f.z_lo - 20, f.z_hi + 20)
    for side in (-1, 1):
        kx, ky = f.at(side * f.u(0.38, 0.5), f.u(0.3, 0.5))
        a, b, th = f.u(26, 34), f.u(18, 24), side * f.u(0.3, 0.8)
        z0, z1 = kz - f.u(45, 60) + side * f.u(0, 15), kz + f.u(45, 60) + side * f.u(0, 15)
        out.append(
            Structure(
                "kidney",
                KIDNEY,
                f.u(35, 45) + f.enhanced * f.u(100, 160),
                SuperEllipse(kx, ky, a, b, 2.2, th, z0, z1, taper=30),
                texture=6.0,
            )
        )
        out.append(
            mimics.cyst_like(
                "renal pelvis",
                SuperEllipse(
                    kx - side * 0.35 * a,
                    ky,
                    0.35 * a,
                    0.35 * b,
                    2.0,
                    th,
                    z0 + 35,
                    z1 - 35,
                    taper=12,
                ),
                f.rng,
                (-10, 20),
            )
        )
    pz = f.u(f.z_lo, f.z_hi)
    pts = np.array(
        [
            [*f.at(-0.25, 0.05), pz],
            [*f.at(0.05, 0.1), pz + f.u(-8, 8)],
            [*f.at(0.35, 0.2), pz + f.u(-10, 15)],
        ]
    )
    out.append(
        Structure(
            "pancreas",
            PANCREAS,
            f.u(40, 55) + f.enhanced * f.u(20, 60),
            Tube3D(pts, f.u(8, 12)),
            texture=6.0,
        )
    )
    out += _great_vessels(f, [("aorta", 0.08, 0.35, f.u(8, 12)), ("ivc", -0.18, 0.3, f.u(8, 12))])
    out += mimics.bowel_loops(f.rng, f.cavity, int(f.rng.integers(7, 14)), f.z_lo, f.z_hi)
    out += _spine(f, sacrum=False) + _ribs(f, int(f.rng.integers(0, 5)))
    return out


def _pelvis(f: Frame) -> List[Structure]:
    out: List[Structure] = []
    out += mimics.small_solids(
        f.rng, f.cavity, int(f.rng.integers(4, 10)), (2.0, 4.5), (25, 55), "node", f.z_lo, f.z_hi
    )
    for side in (-1, 1):
        ix, iy = f.at(side * f.u(0.7, 0.85), f.u(0.1, 0.3))
        a = f.spline(f.u(18, 30), 6)
        wing = SuperEllipse(ix, iy, a, lambda z, a=a: 0.45 * a(z), 2.2, side * f.u(0.6, 1.1))
        out.append(Structure("iliac cortex", CORTEX, f.u(450, 750), wing))
        inner = SuperEllipse(
            ix, iy, lambda z, a=a: a(z) - 3, lambda z, a=a: 0.45 * a(z) - 3, 2.2, wing.theta
        )
        out.append(Structure("iliac bone", BONE, f.u(160, 280), inner, texture=8.0))
        gx, gy = f.at(side * 0.75, 0.95)
        out.append(
            Structure(
                "gluteal",
                MUSCLE,
                f.u(40, 60),
                SuperEllipse(gx, gy, f.u(30, 45), f.u(20, 30), 2.0, side * 0.4),
                texture=5.0,
            )
        )
    bz = f.u(f.z_lo - 10, f.z_hi + 10)
    bx, by = f.at(0.0, -f.u(0.3, 0.5))
    out.append(
        mimics.cyst_like(
            "bladder",
            SuperEllipse(bx, by, f.u(25, 50), f.u(20, 35), 2.0, 0.0, bz - 45, bz + 45, taper=35),
            f.rng,
        )
    )
    out += _great_vessels(
        f,
        [
            (f"iliac {i}", s * f.u(0.35, 0.5), f.u(0.1, 0.3), f.u(4, 7))
            for i, s in enumerate((-1, -1, 1, 1))
        ],
    )
    out += mimics.bowel_loops(f.rng, f.cavity, int(f.rng.integers(4, 10)), f.z_lo, f.z_hi)
    blood = f.blood_hu()
    out += mimics.vessels(
        f.rng,
        f.cavity,
        int(f.rng.integers(3, 8)),
        (1.5, 3.0),
        (blood - 40, blood),
        f.z_lo,
        f.z_hi,
        f.u(0.5, 0.95),
    )
    out += _spine(f, sacrum=True)
    return out


def build_scene(
    region: str, fov_mm: float, z_lo: float, z_hi: float, rng: np.random.Generator
) -> Tuple[List[Structure], Frame]:
    """Structures of one series of ``region`` (painter's order) and its body frame."""
    if region not in REGIONS:
        raise ValueError(f"unknown body region {region!r}: expected one of {REGIONS}")
    enhanced = float(rng.choice([0.0, rng.uniform(0.4, 1.0)], p=[0.25, 0.75]))
    frame, out = _walls(rng, fov_mm, z_lo, z_hi, region, enhanced)
    out += {"chest": _chest, "abdomen": _abdomen, "pelvis": _pelvis}[region](frame)
    return out, frame
