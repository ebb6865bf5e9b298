"""CT-like phantom for the synthetic data sets: 3-D primitives, anatomy per body region, rendering.

A series is a list of :class:`Blob` primitives (ellipsoids, or tubes of constant cross-section)
painted in order onto each axial slice; each carries a HU value and a tissue label, so lesions
can be placed inside the organ their type names. Geometry is in mm in a patient frame centred
on the image: x to the image right (patient left), y down (posterior), z along the series.
Pixel (col, row) covers [col, col + 1) x [row, row + 1): continuous coordinates as detectron2's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

# Tissue labels of the label map rendered with each slice.
AIR, SUBCUT_FAT, MUSCLE, VISCERAL_FAT, MEDIASTINAL_FAT, LUNG, LIVER, SPLEEN, KIDNEY = range(9)
(BONE, CORTEX, VESSEL, BOWEL, HEART, BLADDER, FLUID, CALCIFICATION, LESION, RENAL_SINUS) = range(
    9, 19
)

HU_AIR = -1000.0
# What a 12-bit CT scanner stores: the written phantom's HU are clipped to it.
SCANNER_HU_RANGE = (-1024, 3071)
NOISE_SMOOTHING = np.array([0.25, 0.5, 0.25])  # mild in-plane correlation, as CT noise has


@dataclass
class Blob:
    """An ellipsoid (``tube=False``) or a tube whose elliptic cross-section moves with z.

    ``cx, cy``: centre (mm) at z = ``zc``; ``a, b``: in-plane semi-axes (mm); ``theta``: rotation
    of ``a`` from the x axis; ``rz``: z half-extent (mm; ellipsoids shrink toward it, tubes keep
    their size); ``slope``: in-plane drift of the centre per mm of z; ``edge``: soft-edge width
    (mm) over which HU blends into the background (partial volume).
    """

    cx: float
    cy: float
    a: float
    b: float
    hu: float
    label: int
    theta: float = 0.0
    zc: float = 0.0
    rz: float = 1e6
    tube: bool = False
    slope: Tuple[float, float] = (0.0, 0.0)
    edge: float = 1.0

    def section(self, z: float) -> Tuple[float, float, float, float] | None:
        """(cx, cy, a, b) of the cross-section at ``z`` in mm, or None where the blob is absent."""
        dz = z - self.zc
        if abs(dz) >= self.rz:
            return None
        s = 1.0 if self.tube else math.sqrt(1.0 - (dz / self.rz) ** 2)
        return self.cx + self.slope[0] * dz, self.cy + self.slope[1] * dz, self.a * s, self.b * s


def ellipse_box(
    cx: float, cy: float, a: float, b: float, theta: float
) -> Tuple[float, float, float, float]:
    """Tight axis-aligned box (x1, y1, x2, y2) of a rotated ellipse."""
    c, s = math.cos(theta), math.sin(theta)
    hx = math.sqrt((a * c) ** 2 + (b * s) ** 2)
    hy = math.sqrt((a * s) ** 2 + (b * c) ** 2)
    return cx - hx, cy - hy, cx + hx, cy + hy


class SliceCanvas:
    """One slice being painted: HU image, label map, and the mm -> pixel mapping."""

    def __init__(self, size: int, spacing: float):
        self.size = size
        self.spacing = spacing
        self.hu = np.full((size, size), HU_AIR, dtype=np.float32)
        self.label = np.zeros((size, size), dtype=np.uint8)

    def to_px(self, x_mm: float, y_mm: float) -> Tuple[float, float]:
        return self.size / 2 + x_mm / self.spacing, self.size / 2 + y_mm / self.spacing

    def alpha(self, cx: float, cy: float, a: float, b: float, theta: float, edge: float):
        """Coverage in [0, 1] of an ellipse (pixel units) on its bounding crop, with the crop
        slices.

        Coverage is 0.5 on the ellipse itself and ramps linearly over ``edge`` pixels, using the
        radial distance to the boundary (exact on circles, close enough on ellipses).
        """
        x1, y1, x2, y2 = ellipse_box(cx, cy, a, b, theta)
        pad = edge + 1.0
        c0, c1 = max(0, int(math.floor(x1 - pad))), min(self.size, int(math.ceil(x2 + pad)))
        r0, r1 = max(0, int(math.floor(y1 - pad))), min(self.size, int(math.ceil(y2 + pad)))
        if c0 >= c1 or r0 >= r1:
            return None
        xs = np.arange(c0, c1, dtype=np.float32) + 0.5 - cx
        ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - cy
        ct, st = math.cos(theta), math.sin(theta)
        u = xs * ct + ys * st
        v = -xs * st + ys * ct
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        r = np.sqrt(u * u + v * v)
        signed = r / np.maximum(d, 1e-6) - r  # distance to the boundary along the ray, > 0 inside
        cover = np.clip(0.5 + signed / max(edge, 1e-3), 0.0, 1.0)
        return cover, (slice(r0, r1), slice(c0, c1))

    def paint(self, blob: Blob, z: float) -> None:
        """Paint ``blob``'s section at ``z`` (nothing where the blob is absent)."""
        sec = blob.section(z)
        if sec is None:
            return None
        cx, cy, a, b = sec
        px, py = self.to_px(cx, cy)
        a_px, b_px = a / self.spacing, b / self.spacing
        if min(a_px, b_px) < 0.15:
            return
        got = self.alpha(px, py, a_px, b_px, blob.theta, blob.edge / self.spacing)
        if got is None:
            return
        cover, win = got
        hu = self.hu[win]
        hu += cover * (blob.hu - hu)
        self.label[win][cover >= 0.5] = blob.label


def render_series(
    blobs: Sequence[Blob],
    z_mm: Sequence[float],
    size: int,
    spacing: float,
    noise_hu: float,
    rng: np.random.Generator,
) -> Tuple[np.ndarray, np.ndarray]:
    """Render every slice: (HU volume float32 (n, size, size) with noise, label volume uint8)."""
    n = len(z_mm)
    vol = np.empty((n, size, size), dtype=np.float32)
    lab = np.empty((n, size, size), dtype=np.uint8)
    # The leading z-invariant blobs (body, wall, cavity: the largest ones) are painted once.
    static = 0
    while (
        static < len(blobs)
        and blobs[static].tube
        and blobs[static].slope == (0.0, 0.0)
        and all(abs(z - blobs[static].zc) < blobs[static].rz for z in z_mm)
    ):
        static += 1
    base = SliceCanvas(size, spacing)
    for blob in blobs[:static]:
        base.paint(blob, z_mm[0])
    for k, z in enumerate(z_mm):
        canvas = SliceCanvas(size, spacing)
        canvas.hu[:], canvas.label[:] = base.hu, base.label
        for blob in blobs[static:]:
            canvas.paint(blob, z)
        vol[k], lab[k] = canvas.hu, canvas.label
    vol += tissue_texture(n, size, rng) * (lab != AIR)
    vol += correlated_noise((n, size, size), noise_hu, rng)
    return vol, lab


def tissue_texture(
    n: int, size: int, rng: np.random.Generator, amplitude: float = 6.0
) -> np.ndarray:
    """Smooth low-frequency HU variation, varying slowly along z (organ inhomogeneity)."""
    coarse = rng.normal(0.0, amplitude, size=(2, 9, 9)).astype(np.float32)
    grid = np.linspace(0, 8, size, dtype=np.float32)
    i0 = np.minimum(grid.astype(int), 7)
    f = grid - i0

    def upsample(c: np.ndarray) -> np.ndarray:
        rows = c[i0] * (1 - f)[:, None] + c[i0 + 1] * f[:, None]
        return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]

    top, bottom = upsample(coarse[0]), upsample(coarse[1])
    w = (
        np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None, None]
        if n > 1
        else np.zeros((1, 1, 1), np.float32)
    )
    return top[None] * (1 - w) + bottom[None] * w


def correlated_noise(shape: Tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std ``sigma`` with a slight in-plane correlation."""
    white = rng.standard_normal(size=shape, dtype=np.float32)
    k = NOISE_SMOOTHING
    smooth = k[0] * np.roll(white, 1, axis=-1) + k[1] * white + k[2] * np.roll(white, -1, axis=-1)
    smooth = (
        k[0] * np.roll(smooth, 1, axis=-2) + k[1] * smooth + k[2] * np.roll(smooth, -1, axis=-2)
    )
    gain = 1.0 / float(np.sum(k * k))  # variance kept at sigma^2 after the two passes
    return smooth * (sigma * gain)


# ----------------------------------------------------------------------------- anatomy
# Every draw below comes from the one generator passed to build_anatomy, in a fixed order: the
# data sets are deterministic by seed, so reordering draws (even of arguments) changes them.
_REGIONS = ("chest", "abdomen", "pelvis")

_Picker = Callable[[], Tuple[float, float]]  # draws an in-plane point (mm)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One uniform draw in [lo, hi) as a Python float."""
    return float(rng.uniform(lo, hi))


@dataclass
class _AnatomyFrame:
    """The body frame of one series and the primitives placed in it.

    ``ox, oy``: body centre (mm); ``iw, ih``: semi-axes of the visceral cavity (organ positions
    and sizes are fractions of them); ``mus_t``: muscle wall thickness (ribs sit in it); ``big``:
    z half-extent of whatever spans the whole body.
    """

    rng: np.random.Generator
    z_len: float
    ox: float
    oy: float
    iw: float
    ih: float
    mus_t: float
    big: float

    @property
    def spine_y(self) -> float:
        """y (mm) of the vertebral body in the chest and abdomen."""
        return self.oy + self.ih * 0.62

    def u(self, lo: float, hi: float) -> float:
        """One uniform draw in [lo, hi)."""
        return _u(self.rng, lo, hi)

    def count(self, lo: int, hi: int) -> int:
        """One integer draw in [lo, hi)."""
        return int(self.rng.integers(lo, hi))

    def organ(
        self,
        fx: float,
        fy: float,
        fa: float,
        fb: float,
        hu: float,
        label: int,
        zc_frac: float = 0.0,
        rz_frac: float = 2.0,
        theta: float = 0.0,
        edge: float = 1.2,
    ) -> Blob:
        """Ellipsoid placed and sized in cavity fractions, its z extent in series lengths."""
        return Blob(
            self.ox + fx * self.iw,
            self.oy + fy * self.ih,
            fa * self.iw,
            fb * self.ih,
            hu,
            label,
            theta=theta,
            zc=zc_frac * self.z_len,
            rz=max(rz_frac * self.z_len, 40.0) * self.u(0.9, 1.2),
            edge=edge,
        )

    def round_vessel(
        self,
        fx: float,
        y: float,
        r_lo: float,
        r_hi: float,
        hu_lo: float,
        hu_hi: float,
        label: int = VESSEL,
    ) -> Blob:
        """Near-circular section (aorta, vena cava, oesophagus) running through the whole body."""
        r = self.u(r_lo, r_hi)
        return Blob(
            self.ox + fx * self.iw,
            y,
            r,
            r * self.u(0.85, 1.0),
            self.u(hu_lo, hu_hi),
            label,
            rz=self.big,
            edge=1.0,
        )

    def within(self, fx_lo: float, fx_hi: float, fy_lo: float, fy_hi: float) -> _Picker:
        """Picker of points uniform in a box given in cavity fractions."""

        def pick() -> Tuple[float, float]:
            x = self.ox + self.u(fx_lo, fx_hi) * self.iw
            return x, self.oy + self.u(fy_lo, fy_hi) * self.ih

        return pick

    def inside(self, blob: Blob, frac: float = 0.8) -> _Picker:
        """Picker of points uniform over ``blob``'s central section scaled by ``frac``."""

        def pick() -> Tuple[float, float]:
            rr, ang = math.sqrt(self.u(0, 1)) * frac, self.u(0, 2 * math.pi)
            return blob.cx + rr * blob.a * math.cos(ang), blob.cy + rr * blob.b * math.sin(ang)

        return pick

    def tubes(
        self,
        count: int,
        pick: _Picker,
        r_lo: float,
        r_hi: float,
        hu_lo: float,
        hu_hi: float,
        max_slope: float,
    ) -> List[Blob]:
        """Vessels: tubes crossing the slices at a slant."""
        out = []
        for _ in range(count):
            x, y = pick()
            r = self.u(r_lo, r_hi)
            out.append(
                Blob(
                    x,
                    y,
                    r * self.u(1.0, 1.3),
                    r,
                    self.u(hu_lo, hu_hi),
                    VESSEL,
                    theta=self.u(0, math.pi),
                    zc=self.u(-0.5, 0.5) * self.z_len,
                    rz=self.u(0.4, 1.5) * self.z_len + 5.0,
                    tube=True,
                    slope=(self.u(-max_slope, max_slope), self.u(-max_slope, max_slope)),
                    edge=0.8,
                )
            )
        return out

    def vertebra(self, y: float, scale: float = 1.0) -> List[Blob]:
        """Vertebral body (cortex, marrow), spinal canal and posterior arch at ``y``."""
        r = self.u(15, 20) * scale
        ox, big = self.ox, self.big
        return [
            Blob(ox, y, r, r * 0.85, self.u(700, 950), CORTEX, rz=big, edge=0.8),
            Blob(ox, y, r - 2.5, r * 0.85 - 2.5, self.u(220, 320), BONE, rz=big, edge=0.8),
            Blob(ox, y + r * 1.25, r * 0.45, r * 0.4, self.u(10, 30), FLUID, rz=big, edge=0.8),
            Blob(ox, y + r * 2.0, r * 0.9, r * 0.35, self.u(500, 800), CORTEX, rz=big, edge=0.8),
        ]

    def ribs(self, count: int) -> List[Blob]:
        """Rib sections in the muscle wall, short tubes around the cavity."""
        out = []
        for _ in range(count):
            phi = self.u(0.0, 2 * math.pi)
            if abs(phi - math.pi / 2) < 0.4:  # the spine sits there
                phi += math.pi
            r = self.u(3, 6)
            out.append(
                Blob(
                    self.ox + (self.iw + 0.5 * self.mus_t) * math.cos(phi),
                    self.oy + (self.ih + 0.5 * self.mus_t) * math.sin(phi),
                    r * 1.6,
                    r,
                    self.u(450, 800),
                    CORTEX,
                    theta=phi + math.pi / 2,
                    zc=self.u(-0.5, 0.5) * self.z_len,
                    rz=self.u(8, 25),
                    tube=True,
                    slope=(0.0, self.u(-0.5, 0.5)),
                    edge=0.8,
                )
            )
        return out

    def bowel(self, count: int, pick: _Picker) -> List[Blob]:
        """Bowel loops: a wall ellipsoid, then its content (fluid, gas or oral contrast)."""
        out = []
        for _ in range(count):
            x, y = pick()
            a = self.u(7, 18)
            b = a * self.u(0.6, 1.0)
            kind = self.rng.choice(3, p=[0.55, 0.25, 0.2])
            # All three contents are drawn whichever is kept, so the draw count is fixed.
            content = (self.u(0, 25), self.u(-1000, -900), self.u(150, 300))[kind]
            wall = self.u(2.0, 3.5)
            common = dict(
                theta=self.u(0, math.pi),
                zc=self.u(-0.6, 0.6) * self.z_len,
                rz=self.u(15, 45),
                slope=(self.u(-0.4, 0.4), self.u(-0.4, 0.4)),
            )
            out.append(Blob(x, y, a, b, self.u(35, 55), BOWEL, edge=1.0, **common))
            out.append(
                Blob(
                    x, y, max(a - wall, 1.0), max(b - wall, 1.0), content, BOWEL, edge=1.0, **common
                )
            )
        return out

    def calcifications(self, count: int, pick: _Picker) -> List[Blob]:
        """Small dense spots a few mm long in z."""
        out = []
        for _ in range(count):
            x, y = pick()
            r = self.u(1.0, 2.5)
            out.append(
                Blob(
                    x,
                    y,
                    r,
                    r * self.u(0.7, 1.0),
                    self.u(300, 800),
                    CALCIFICATION,
                    zc=self.u(-0.5, 0.5) * self.z_len,
                    rz=self.u(1.5, 4.0),
                    edge=0.6,
                )
            )
        return out


def _body(
    fov_mm: float, z_len: float, rng: np.random.Generator
) -> Tuple[_AnatomyFrame, List[Blob], Blob, Dict]:
    """Frame, outer layers (subcutaneous fat, muscle wall), cavity blob, and geometry.

    The cavity is returned apart from the layers: the chest repaints it as chest wall.
    """
    W = fov_mm * _u(rng, 0.36, 0.45)  # body half-width
    H = W * _u(rng, 0.66, 0.8)
    ox, oy = _u(rng, -0.03, 0.03) * fov_mm, _u(rng, -0.02, 0.04) * fov_mm
    fat_t, mus_t = _u(rng, 8, 28), _u(rng, 6, 13)
    big = 4.0 * z_len + 200.0  # z extent of the body: never ends inside the series
    layers = [
        Blob(ox, oy, W, H, _u(rng, -110, -90), SUBCUT_FAT, rz=big, tube=True, edge=1.0),
        Blob(ox, oy, W - fat_t, H - fat_t, _u(rng, 40, 55), MUSCLE, rz=big, tube=True, edge=1.0),
    ]
    iw, ih = W - fat_t - mus_t, H - fat_t - mus_t
    cav = Blob(ox, oy, iw, ih, _u(rng, -105, -85), VISCERAL_FAT, rz=big, tube=True, edge=1.0)
    geo = {"body": (ox, oy, W, H), "cavity": (ox, oy, iw, ih)}
    return _AnatomyFrame(rng, z_len, ox, oy, iw, ih, mus_t, big), layers, cav, geo


def _chest(f: _AnatomyFrame, cav: Blob) -> List[Blob]:
    """Chest wall, mediastinum, lungs, heart, great vessels, spine, ribs, lung vessels."""
    cav.hu, cav.label = f.u(35, 50), MUSCLE  # chest wall where the lungs do not reach
    blobs = [
        cav,
        f.organ(0.0, -0.05, f.u(0.28, 0.36), 0.75, f.u(-100, -80), MEDIASTINAL_FAT, edge=1.0),
    ]
    lung_r = f.organ(-0.5, -0.02, 0.47, 0.88, f.u(-880, -820), LUNG, edge=0.8)
    lung_l = f.organ(0.5, -0.02, 0.45, 0.86, f.u(-880, -820), LUNG, edge=0.8)
    blobs += [lung_r, lung_l]
    blobs.append(
        f.organ(0.1, -0.2, 0.3, 0.35, f.u(35, 50), HEART, zc_frac=f.u(0.4, 1.0), rz_frac=0.8)
    )
    spine_y, ih = f.spine_y, f.ih
    blobs += [
        f.round_vessel(0.08, spine_y - 0.34 * ih, 11, 15, 170, 260),  # descending aorta
        f.round_vessel(-0.12, f.oy - 0.25 * ih, 9, 13, 150, 230),  # ascending aorta / SVC
        f.round_vessel(-0.02, spine_y - 0.28 * ih, 5, 7, -300, 40, BOWEL),
    ]  # oesophagus
    blobs += f.vertebra(spine_y) + f.ribs(f.count(6, 11))
    blobs += f.tubes(f.count(14, 28), f.inside(lung_r, 0.85), 1.0, 3.5, -20, 80, 0.6)
    blobs += f.tubes(f.count(14, 28), f.inside(lung_l, 0.85), 1.0, 3.5, -20, 80, 0.6)
    blobs += f.calcifications(f.count(1, 5), f.inside(cav, 0.4))
    return blobs


def _gallbladder(f: _AnatomyFrame, liver: Blob) -> Blob:
    """Fluid ellipsoid under the liver: a hypodense look-alike of liver lesions."""
    r = f.u(10, 17)
    return Blob(
        liver.cx + 0.3 * liver.a,
        liver.cy + 0.4 * liver.b,
        r,
        r * 0.7,
        f.u(0, 20),
        FLUID,
        theta=f.u(0, math.pi),
        zc=liver.zc - 0.3 * f.z_len,
        rz=f.u(20, 40),
        edge=1.0,
    )


def _kidney(f: _AnatomyFrame, side: int, kidney_z: Tuple[float, float] | None) -> Tuple[Blob, Blob]:
    """Kidney on ``side`` (-1 right, 1 left) and its renal sinus."""
    k = f.organ(
        side * 0.42,
        0.38,
        f.u(0.14, 0.18),
        f.u(0.22, 0.28),
        f.u(140, 190),
        KIDNEY,
        zc_frac=f.u(-0.3, 0.3),
        rz_frac=1.0,
        theta=side * f.u(0.2, 0.6),
        edge=1.0,
    )
    if kidney_z is not None:
        k.zc, k.rz = kidney_z[0] + f.u(-5, 5), kidney_z[1] * f.u(0.9, 1.1)
    sinus = Blob(
        k.cx - side * 0.35 * k.a,
        k.cy - 0.1 * k.b,
        k.a * 0.35,
        k.b * 0.3,
        f.u(-80, 10),
        RENAL_SINUS,
        theta=k.theta,
        zc=k.zc,
        rz=k.rz * 0.5,
        edge=1.0,
    )
    return k, sinus


def _abdomen(f: _AnatomyFrame, cav: Blob, kidney_z: Tuple[float, float] | None) -> List[Blob]:
    """Cavity, bowel, psoas, liver (gallbladder), spleen, kidneys, great vessels, spine, ribs."""
    blobs = [cav] + f.bowel(f.count(4, 9), f.within(-0.5, 0.6, -0.7, 0.2))
    blobs += [
        f.organ(-0.5, 0.55, 0.11, 0.3, f.u(45, 55), MUSCLE, theta=0.3),
        f.organ(0.5, 0.55, 0.11, 0.3, f.u(45, 55), MUSCLE, theta=-0.3),
    ]
    liver = f.organ(
        -0.45,
        -0.15,
        f.u(0.42, 0.52),
        f.u(0.55, 0.7),
        f.u(65, 80),
        LIVER,
        zc_frac=f.u(-0.6, 0.2),
        rz_frac=1.4,
        theta=f.u(-0.3, 0.3),
    )
    blobs.append(liver)
    if f.rng.random() < 0.5:
        blobs.append(_gallbladder(f, liver))
    blobs.append(
        f.organ(
            0.62,
            0.15,
            0.22,
            0.35,
            f.u(45, 60),
            SPLEEN,
            zc_frac=f.u(-0.5, 0.2),
            rz_frac=0.8,
            theta=-0.4,
        )
    )
    for side in (-1, 1):
        blobs += _kidney(f, side, kidney_z)
    spine_y, ih = f.spine_y, f.ih
    blobs += [
        f.round_vessel(0.1, spine_y - 0.3 * ih, 9, 13, 150, 230),  # aorta
        f.round_vessel(-0.15, spine_y - 0.32 * ih, 9, 14, 110, 170),
    ]  # inferior vena cava
    blobs += f.vertebra(spine_y) + f.ribs(f.count(2, 6))
    blobs += f.tubes(f.count(4, 10), f.inside(liver, 0.75), 2.0, 5.0, 150, 210, 0.5)
    blobs += f.calcifications(f.count(2, 7), f.inside(cav, 0.6))
    return blobs


def _pelvic_side(f: _AnatomyFrame, side: int) -> List[Blob]:
    """Iliac wing (cortex, marrow) and gluteal muscle on ``side`` (-1 right, 1 left)."""
    out = []
    for fa, fb, hu, label in (
        (0.22, 0.12, f.u(650, 900), CORTEX),
        (0.17, 0.07, f.u(200, 320), BONE),
    ):
        out.append(
            f.organ(side * 0.72, 0.35, fa, fb, hu, label, theta=side * 0.9, rz_frac=3.0, edge=0.8)
        )
    out.append(
        f.organ(side * 0.55, 0.85, 0.28, 0.15, f.u(45, 55), MUSCLE, theta=side * 0.3, rz_frac=3.0)
    )
    return out


def _pelvis(f: _AnatomyFrame, cav: Blob) -> List[Blob]:
    """Cavity, bowel, bladder, rectum, pelvic bones and muscles, sacrum, iliac vessels."""
    blobs = [cav] + f.bowel(f.count(3, 7), f.within(-0.5, 0.5, -0.6, 0.1))
    blobs.append(
        f.organ(
            0.0,
            -0.1,
            f.u(0.22, 0.32),
            f.u(0.25, 0.35),
            f.u(0, 20),
            BLADDER,
            zc_frac=f.u(-0.3, 0.3),
            rz_frac=0.9,
            edge=1.0,
        )
    )
    blobs.append(f.organ(0.0, 0.45, 0.12, 0.12, f.u(30, 45), BOWEL, rz_frac=3.0))
    for side in (-1, 1):
        blobs += _pelvic_side(f, side)
    blobs += f.vertebra(f.oy + f.ih * 0.72, scale=1.1)
    blobs += f.tubes(4, f.within(-0.55, 0.55, 0.05, 0.3), 4.0, 7.0, 140, 210, 0.3)  # iliac
    blobs += f.calcifications(f.count(2, 6), f.inside(cav, 0.6))
    return blobs


def build_anatomy(
    region: str,
    fov_mm: float,
    z_len: float,
    rng: np.random.Generator,
    kidney_z: Tuple[float, float] | None = None,
) -> Tuple[List[Blob], Dict]:
    """Blobs of one body region ('chest', 'abdomen', 'pelvis'), painter's order, and key geometry.

    ``kidney_z`` = (centre, half extent) in mm places both kidneys along z (abdomen only).
    The geometry holds ``body`` and ``cavity`` (ox, oy, semi-axes), and ``kidneys`` (the kidney
    blobs) for the abdomen.

    Distractors are part of the anatomy: vessels (tubes crossing the slices), calcified spots,
    bowel loops, gallbladder, ribs; they look lesion-like on a single slice.
    """
    if region not in _REGIONS:
        raise ValueError(f"unknown body region {region!r}: expected chest, abdomen or pelvis")
    frame, blobs, cav, geo = _body(fov_mm, z_len, rng)
    if region == "chest":
        blobs += _chest(frame, cav)
    elif region == "abdomen":
        organs = _abdomen(frame, cav, kidney_z)
        blobs += organs
        geo["kidneys"] = [b for b in organs if b.label == KIDNEY]
    else:
        blobs += _pelvis(frame, cav)
    return blobs, geo
