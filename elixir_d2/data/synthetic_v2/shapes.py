"""Solid shapes of the second synthetic generator, evaluated on axial planes.

Geometry is in mm in a patient frame centred on the image: x to the image right, y down
(posterior), z along the series. Every shape answers two questions for a plane at ``z``: its
bounding box there (or None where absent) and which of given points lie inside. Outlines vary
along z through :class:`ZSpline` control values, so organs change shape from slice to slice.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 in mm


class ZSpline:
    """A value varying smoothly along z: a Catmull-Rom spline through control values at evenly
    spaced knots over [z0, z1], constant outside."""

    def __init__(self, z0: float, z1: float, values: Sequence[float]):
        self.z0, self.z1 = z0, max(z1, z0 + 1e-6)
        self.v = np.asarray(values, dtype=np.float64)

    @classmethod
    def drawn(
        cls,
        rng: np.random.Generator,
        z0: float,
        z1: float,
        mean: float,
        jitter: float,
        knots: int = 4,
    ) -> "ZSpline":
        """Control values ``mean`` +- ``jitter`` (uniform), ``knots`` of them."""
        return cls(z0, z1, mean + rng.uniform(-jitter, jitter, size=knots))

    def __call__(self, z: float) -> float:
        n = len(self.v)
        if n == 1:
            return float(self.v[0])
        t = (min(max(z, self.z0), self.z1) - self.z0) / (self.z1 - self.z0) * (n - 1)
        i = min(int(t), n - 2)
        f = t - i
        p0, p1 = self.v[max(i - 1, 0)], self.v[i]
        p2, p3 = self.v[i + 1], self.v[min(i + 2, n - 1)]
        return float(
            0.5
            * (
                (2 * p1)
                + (-p0 + p2) * f
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * f * f
                + (-p0 + 3 * p1 - 3 * p2 + p3) * f**3
            )
        )


def _value(v, z: float) -> float:
    return v(z) if callable(v) else float(v)


class SuperEllipse:
    """|u/a|^p + |v/b|^p <= 1 in a frame rotated by ``theta``; centre and semi-axes may be
    :class:`ZSpline`. Between ``z0`` and ``z1`` (a cap of ``taper`` mm narrows it at both ends)."""

    def __init__(
        self,
        cx,
        cy,
        a,
        b,
        p: float = 2.0,
        theta: float = 0.0,
        z0: float = -1e9,
        z1: float = 1e9,
        taper: float = 0.0,
    ):
        self.cx, self.cy, self.a, self.b = cx, cy, a, b
        self.p, self.theta, self.z0, self.z1, self.taper = p, theta, z0, z1, taper

    def _scale(self, z: float) -> float:
        if not self.z0 < z < self.z1:
            return 0.0
        if self.taper <= 0:
            return 1.0
        d = min(z - self.z0, self.z1 - z) / self.taper
        return 1.0 if d >= 1 else math.sqrt(max(0.0, 1 - (1 - d) ** 2))

    def params(self, z: float) -> Optional[Tuple[float, float, float, float]]:
        s = self._scale(z)
        if s <= 0.05:
            return None
        return (
            _value(self.cx, z),
            _value(self.cy, z),
            s * _value(self.a, z),
            s * _value(self.b, z),
        )

    def bbox(self, z: float) -> Optional[Box]:
        got = self.params(z)
        if got is None:
            return None
        cx, cy, a, b = got
        r = max(a, b) * (2**0.5 if self.p > 2 else 1.0)
        return cx - r, cy - r, cx + r, cy + r

    def inside(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        got = self.params(z)
        if got is None:
            return np.zeros(np.broadcast(x, y).shape, bool)
        cx, cy, a, b = got
        c, s = math.cos(self.theta), math.sin(self.theta)
        u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
        return np.abs(u / a) ** self.p + np.abs(v / b) ** self.p <= 1.0


class Radial:
    """A star-shaped outline r(phi) = R(z) (1 + sum_k c_k cos(k phi + phase_k + twist_k z)):
    Fourier harmonics give organ-like lobes that turn slowly along z; ends taper over ``taper``
    mm."""

    def __init__(
        self,
        cx,
        cy,
        radius,
        harmonics: Sequence[Tuple[int, float, float, float]],
        z0: float,
        z1: float,
        taper: float = 10.0,
        aspect: float = 1.0,
    ):
        self.cx, self.cy, self.radius, self.h = cx, cy, radius, list(harmonics)
        self.z0, self.z1, self.taper, self.aspect = z0, z1, taper, aspect

    def _r(self, z: float) -> float:
        if not self.z0 < z < self.z1:
            return 0.0
        d = min(z - self.z0, self.z1 - z) / max(self.taper, 1e-6)
        s = 1.0 if d >= 1 else math.sqrt(max(0.0, 1 - (1 - d) ** 2))
        return s * _value(self.radius, z)

    def bbox(self, z: float) -> Optional[Box]:
        r = self._r(z)
        if r <= 0.5:
            return None
        ext = r * (1 + sum(abs(c) for _, c, _, _ in self.h)) * max(1.0, self.aspect)
        cx, cy = _value(self.cx, z), _value(self.cy, z)
        return cx - ext, cy - ext, cx + ext, cy + ext

    def inside(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        r = self._r(z)
        dx, dy = x - _value(self.cx, z), (y - _value(self.cy, z)) * self.aspect
        phi = np.arctan2(dy, dx)
        edge = np.ones_like(phi)
        for k, c, phase, twist in self.h:
            edge += c * np.cos(k * phi + phase + twist * z)
        return dx * dx + dy * dy <= (r * edge) ** 2


class Tube3D:
    """Points within ``radius`` of a 3-D polyline (vessels, bowel loops, ribs): its sections are
    discs where it runs along z and elongated where it runs in-plane."""

    def __init__(self, points: np.ndarray, radius: float):
        self.pts = np.asarray(points, dtype=np.float64)
        self.radius = radius

    def _segments(self, z: float):
        p, q = self.pts[:-1], self.pts[1:]
        lo, hi = np.minimum(p[:, 2], q[:, 2]), np.maximum(p[:, 2], q[:, 2])
        near = (lo - self.radius <= z) & (z <= hi + self.radius)
        return p[near], q[near]

    def bbox(self, z: float) -> Optional[Box]:
        p, q = self._segments(z)
        if not len(p):
            return None
        both = np.concatenate([p, q])
        r = self.radius
        return (
            both[:, 0].min() - r,
            both[:, 1].min() - r,
            both[:, 0].max() + r,
            both[:, 1].max() + r,
        )

    def inside(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y).shape, bool)
        r2 = self.radius**2
        for a, b in zip(*self._segments(z)):
            d = b - a
            dd = float(d @ d) or 1e-9
            t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / dd, 0, 1)
            out |= (
                (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
            ) <= r2
        return out


def random_walk(
    rng: np.random.Generator,
    start: Sequence[float],
    direction: Sequence[float],
    steps: int,
    step_mm: float,
    wander: float,
) -> np.ndarray:
    """A smooth 3-D path: ``steps`` steps of ``step_mm`` whose direction turns by up to
    ``wander`` radians per step (the centreline of a vessel or a bowel loop)."""
    pts = [np.asarray(start, dtype=np.float64)]
    d = np.asarray(direction, dtype=np.float64)
    d = d / (np.linalg.norm(d) or 1.0)
    for _ in range(steps):
        d = d + rng.normal(0.0, wander, 3)
        d /= np.linalg.norm(d) or 1.0
        pts.append(pts[-1] + step_mm * d)
    return np.stack(pts)


class Clipped:
    """``shape`` where it lies inside ``within`` too (a vessel kept inside its lung)."""

    def __init__(self, shape, within):
        self.shape, self.within = shape, within

    def bbox(self, z: float) -> Optional[Box]:
        return self.shape.bbox(z) if self.within.bbox(z) is not None else None

    def inside(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        return self.shape.inside(x, y, z) & self.within.inside(x, y, z)
