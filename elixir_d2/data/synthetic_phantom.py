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
from typing import Dict, List, Sequence, Tuple

import numpy as np

# Tissue labels of the label map rendered with each slice.
AIR, SUBCUT_FAT, MUSCLE, VISCERAL_FAT, MEDIASTINAL_FAT, LUNG, LIVER, SPLEEN, KIDNEY = range(9)
(BONE, CORTEX, VESSEL, BOWEL, HEART, BLADDER, FLUID, CALCIFICATION, LESION,
 RENAL_SINUS) = range(9, 19)

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


def ellipse_box(cx: float, cy: float, a: float, b: float,
                theta: float) -> Tuple[float, float, float, float]:
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


def render_series(blobs: Sequence[Blob], z_mm: Sequence[float], size: int, spacing: float,
                  noise_hu: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Render every slice: (HU volume float32 (n, size, size) with noise, label volume uint8)."""
    n = len(z_mm)
    vol = np.empty((n, size, size), dtype=np.float32)
    lab = np.empty((n, size, size), dtype=np.uint8)
    # The leading z-invariant blobs (body, wall, cavity: the largest ones) are painted once.
    static = 0
    while static < len(blobs) and blobs[static].tube and blobs[static].slope == (0.0, 0.0) \
            and all(abs(z - blobs[static].zc) < blobs[static].rz for z in z_mm):
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


def tissue_texture(n: int, size: int, rng: np.random.Generator,
                   amplitude: float = 6.0) -> np.ndarray:
    """Smooth low-frequency HU variation, varying slowly along z (organ inhomogeneity)."""
    coarse = rng.normal(0.0, amplitude, size=(2, 9, 9)).astype(np.float32)
    grid = np.linspace(0, 8, size, dtype=np.float32)
    i0 = np.minimum(grid.astype(int), 7)
    f = grid - i0

    def upsample(c: np.ndarray) -> np.ndarray:
        rows = c[i0] * (1 - f)[:, None] + c[i0 + 1] * f[:, None]
        return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]

    top, bottom = upsample(coarse[0]), upsample(coarse[1])
    w = (np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None, None] if n > 1
         else np.zeros((1, 1, 1), np.float32))
    return top[None] * (1 - w) + bottom[None] * w


def correlated_noise(shape: Tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std ``sigma`` with a slight in-plane correlation."""
    white = rng.standard_normal(size=shape, dtype=np.float32)
    k = NOISE_SMOOTHING
    smooth = k[0] * np.roll(white, 1, axis=-1) + k[1] * white + k[2] * np.roll(white, -1, axis=-1)
    smooth = (k[0] * np.roll(smooth, 1, axis=-2) + k[1] * smooth
              + k[2] * np.roll(smooth, -1, axis=-2))
    gain = 1.0 / float(np.sum(k * k))  # variance kept at sigma^2 after the two passes
    return smooth * (sigma * gain)


# ----------------------------------------------------------------------------- anatomy
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def build_anatomy(region: str, fov_mm: float, z_len: float, rng: np.random.Generator,
                  kidney_z: Tuple[float, float] | None = None) -> Tuple[List[Blob], Dict]:
    """Blobs of one body region ('chest', 'abdomen', 'pelvis'), painter's order, and key geometry.

    ``kidney_z`` = (centre, half extent) in mm places both kidneys along z (abdomen only).

    Distractors are part of the anatomy: vessels (tubes crossing the slices), calcified spots,
    bowel loops, gallbladder, ribs; they look lesion-like on a single slice.
    """
    W = fov_mm * _u(rng, 0.36, 0.45)  # body half-width
    H = W * _u(rng, 0.66, 0.8)
    ox, oy = _u(rng, -0.03, 0.03) * fov_mm, _u(rng, -0.02, 0.04) * fov_mm
    fat_t, mus_t = _u(rng, 8, 28), _u(rng, 6, 13)
    big = 4.0 * z_len + 200.0  # z extent of the body: never ends inside the series
    blobs = [
        Blob(ox, oy, W, H, _u(rng, -110, -90), SUBCUT_FAT, rz=big, tube=True, edge=1.0),
        Blob(ox, oy, W - fat_t, H - fat_t, _u(rng, 40, 55), MUSCLE, rz=big, tube=True, edge=1.0),
    ]
    iw, ih = W - fat_t - mus_t, H - fat_t - mus_t  # cavity semi-axes
    cav = Blob(ox, oy, iw, ih, _u(rng, -105, -85), VISCERAL_FAT, rz=big, tube=True, edge=1.0)
    geo = {"body": (ox, oy, W, H), "cavity": (ox, oy, iw, ih)}
    spine_y = oy + ih * 0.62

    def organ(fx, fy, fa, fb, hu, label, zc_frac=0.0, rz_frac=2.0, theta=0.0, edge=1.2):
        return Blob(ox + fx * iw, oy + fy * ih, fa * iw, fb * ih, hu, label, theta=theta,
                    zc=zc_frac * z_len, rz=max(rz_frac * z_len, 40.0) * _u(rng, 0.9, 1.2),
                    edge=edge)

    def tubes(count, region_fn, r_lo, r_hi, hu_lo, hu_hi, max_slope):
        out = []
        for _ in range(count):
            x, y = region_fn()
            r = _u(rng, r_lo, r_hi)
            out.append(Blob(x, y, r * _u(rng, 1.0, 1.3), r, _u(rng, hu_lo, hu_hi), VESSEL,
                            theta=_u(rng, 0, math.pi), zc=_u(rng, -0.5, 0.5) * z_len,
                            rz=_u(rng, 0.4, 1.5) * z_len + 5.0, tube=True,
                            slope=(_u(rng, -max_slope, max_slope), _u(rng, -max_slope, max_slope)),
                            edge=0.8))
        return out

    def inside(blob: Blob, frac: float = 0.8):
        def pick():
            rr, ang = math.sqrt(_u(rng, 0, 1)) * frac, _u(rng, 0, 2 * math.pi)
            return blob.cx + rr * blob.a * math.cos(ang), blob.cy + rr * blob.b * math.sin(ang)
        return pick

    def vertebra(y, scale=1.0):
        r = _u(rng, 15, 20) * scale
        return [
            Blob(ox, y, r, r * 0.85, _u(rng, 700, 950), CORTEX, rz=big, edge=0.8),
            Blob(ox, y, r - 2.5, r * 0.85 - 2.5, _u(rng, 220, 320), BONE, rz=big, edge=0.8),
            Blob(ox, y + r * 1.25, r * 0.45, r * 0.4, _u(rng, 10, 30), FLUID, rz=big, edge=0.8),
            Blob(ox, y + r * 2.0, r * 0.9, r * 0.35, _u(rng, 500, 800), CORTEX, rz=big, edge=0.8),
        ]

    def ribs(count):
        out = []
        for _ in range(count):
            phi = _u(rng, 0.0, 2 * math.pi)
            if abs(phi - math.pi / 2) < 0.4:  # the spine sits there
                phi += math.pi
            r = _u(rng, 3, 6)
            out.append(Blob(ox + (iw + 0.5 * mus_t) * math.cos(phi),
                            oy + (ih + 0.5 * mus_t) * math.sin(phi),
                            r * 1.6, r, _u(rng, 450, 800), CORTEX, theta=phi + math.pi / 2,
                            zc=_u(rng, -0.5, 0.5) * z_len, rz=_u(rng, 8, 25), tube=True,
                            slope=(0.0, _u(rng, -0.5, 0.5)), edge=0.8))
        return out

    def round_vessel(fx, y, r_lo, r_hi, hu_lo, hu_hi, label=VESSEL):
        r = _u(rng, r_lo, r_hi)
        return Blob(ox + fx * iw, y, r, r * _u(rng, 0.85, 1.0), _u(rng, hu_lo, hu_hi), label,
                    rz=big, edge=1.0)

    def bowel(count, region_fn):
        out = []
        for _ in range(count):
            x, y = region_fn()
            a = _u(rng, 7, 18)
            b = a * _u(rng, 0.6, 1.0)
            kind = rng.choice(3, p=[0.55, 0.25, 0.2])
            content = (_u(rng, 0, 25), _u(rng, -1000, -900), _u(rng, 150, 300))[kind]
            wall = _u(rng, 2.0, 3.5)
            common = dict(theta=_u(rng, 0, math.pi), zc=_u(rng, -0.6, 0.6) * z_len,
                          rz=_u(rng, 15, 45), slope=(_u(rng, -0.4, 0.4), _u(rng, -0.4, 0.4)))
            out.append(Blob(x, y, a, b, _u(rng, 35, 55), BOWEL, edge=1.0, **common))
            out.append(Blob(x, y, max(a - wall, 1.0), max(b - wall, 1.0), content, BOWEL, edge=1.0,
                            **common))
        return out

    def calcifications(count, region_fn):
        out = []
        for _ in range(count):
            x, y = region_fn()
            r = _u(rng, 1.0, 2.5)
            out.append(Blob(x, y, r, r * _u(rng, 0.7, 1.0), _u(rng, 300, 800), CALCIFICATION,
                            zc=_u(rng, -0.5, 0.5) * z_len, rz=_u(rng, 1.5, 4.0), edge=0.6))
        return out

    if region == "chest":
        cav.hu, cav.label = _u(rng, 35, 50), MUSCLE  # chest wall where the lungs do not reach
        blobs.append(cav)
        blobs.append(organ(0.0, -0.05, _u(rng, 0.28, 0.36), 0.75, _u(rng, -100, -80),
                           MEDIASTINAL_FAT, edge=1.0))
        lung_r = organ(-0.5, -0.02, 0.47, 0.88, _u(rng, -880, -820), LUNG, edge=0.8)
        lung_l = organ(0.5, -0.02, 0.45, 0.86, _u(rng, -880, -820), LUNG, edge=0.8)
        blobs += [lung_r, lung_l]
        blobs.append(organ(0.1, -0.2, 0.3, 0.35, _u(rng, 35, 50), HEART, zc_frac=_u(rng, 0.4, 1.0),
                           rz_frac=0.8))
        blobs += [round_vessel(0.08, spine_y - 0.34 * ih, 11, 15, 170, 260),  # descending aorta
                  round_vessel(-0.12, oy - 0.25 * ih, 9, 13, 150, 230),  # ascending aorta / SVC
                  round_vessel(-0.02, spine_y - 0.28 * ih, 5, 7, -300, 40, BOWEL)]  # oesophagus
        blobs += vertebra(spine_y) + ribs(int(rng.integers(6, 11)))
        blobs += tubes(int(rng.integers(14, 28)), inside(lung_r, 0.85), 1.0, 3.5, -20, 80, 0.6)
        blobs += tubes(int(rng.integers(14, 28)), inside(lung_l, 0.85), 1.0, 3.5, -20, 80, 0.6)
        blobs += calcifications(int(rng.integers(1, 5)), inside(cav, 0.4))
    elif region == "abdomen":
        blobs.append(cav)
        blobs += bowel(int(rng.integers(4, 9)),
                       lambda: (ox + _u(rng, -0.5, 0.6) * iw, oy + _u(rng, -0.7, 0.2) * ih))
        blobs += [organ(-0.5, 0.55, 0.11, 0.3, _u(rng, 45, 55), MUSCLE, theta=0.3),
                  organ(0.5, 0.55, 0.11, 0.3, _u(rng, 45, 55), MUSCLE, theta=-0.3)]
        liver = organ(-0.45, -0.15, _u(rng, 0.42, 0.52), _u(rng, 0.55, 0.7), _u(rng, 65, 80), LIVER,
                      zc_frac=_u(rng, -0.6, 0.2), rz_frac=1.4, theta=_u(rng, -0.3, 0.3))
        blobs.append(liver)
        if rng.random() < 0.5:
            r = _u(rng, 10, 17)  # gallbladder: a hypodense look-alike of liver lesions
            blobs.append(Blob(liver.cx + 0.3 * liver.a, liver.cy + 0.4 * liver.b, r, r * 0.7,
                              _u(rng, 0, 20), FLUID,
                              theta=_u(rng, 0, math.pi), zc=liver.zc - 0.3 * z_len,
                              rz=_u(rng, 20, 40), edge=1.0))
        blobs.append(organ(0.62, 0.15, 0.22, 0.35, _u(rng, 45, 60), SPLEEN,
                           zc_frac=_u(rng, -0.5, 0.2), rz_frac=0.8, theta=-0.4))
        for side in (-1, 1):
            k = organ(side * 0.42, 0.38, _u(rng, 0.14, 0.18), _u(rng, 0.22, 0.28),
                      _u(rng, 140, 190), KIDNEY,
                      zc_frac=_u(rng, -0.3, 0.3), rz_frac=1.0, theta=side * _u(rng, 0.2, 0.6),
                      edge=1.0)
            if kidney_z is not None:
                k.zc, k.rz = kidney_z[0] + _u(rng, -5, 5), kidney_z[1] * _u(rng, 0.9, 1.1)
            blobs.append(k)
            blobs.append(Blob(k.cx - side * 0.35 * k.a, k.cy - 0.1 * k.b, k.a * 0.35, k.b * 0.3,
                              _u(rng, -80, 10), RENAL_SINUS, theta=k.theta, zc=k.zc, rz=k.rz * 0.5,
                              edge=1.0))
        geo["kidneys"] = [b for b in blobs if b.label == KIDNEY]
        blobs += [round_vessel(0.1, spine_y - 0.3 * ih, 9, 13, 150, 230),  # aorta
                  round_vessel(-0.15, spine_y - 0.32 * ih, 9, 14, 110, 170)]  # inferior vena cava
        blobs += vertebra(spine_y) + ribs(int(rng.integers(2, 6)))
        blobs += tubes(int(rng.integers(4, 10)), inside(liver, 0.75), 2.0, 5.0, 150, 210, 0.5)
        blobs += calcifications(int(rng.integers(2, 7)), inside(cav, 0.6))
    elif region == "pelvis":
        blobs.append(cav)
        blobs += bowel(int(rng.integers(3, 7)),
                       lambda: (ox + _u(rng, -0.5, 0.5) * iw, oy + _u(rng, -0.6, 0.1) * ih))
        blobs.append(organ(0.0, -0.1, _u(rng, 0.22, 0.32), _u(rng, 0.25, 0.35), _u(rng, 0, 20),
                           BLADDER, zc_frac=_u(rng, -0.3, 0.3), rz_frac=0.9, edge=1.0))
        blobs.append(organ(0.0, 0.45, 0.12, 0.12, _u(rng, 30, 45), BOWEL, rz_frac=3.0))
        for side in (-1, 1):
            for fa, fb, hu, label in ((0.22, 0.12, _u(rng, 650, 900), CORTEX),
                                      (0.17, 0.07, _u(rng, 200, 320), BONE)):
                blobs.append(organ(side * 0.72, 0.35, fa, fb, hu, label, theta=side * 0.9,
                                   rz_frac=3.0, edge=0.8))
            blobs.append(organ(side * 0.55, 0.85, 0.28, 0.15, _u(rng, 45, 55), MUSCLE,
                               theta=side * 0.3, rz_frac=3.0))
        blobs += vertebra(oy + ih * 0.72, scale=1.1)
        blobs += tubes(4, lambda: (ox + _u(rng, -0.55, 0.55) * iw, oy + _u(rng, 0.05, 0.3) * ih),
                       4.0, 7.0, 140, 210, 0.3)  # iliac vessels
        blobs += calcifications(int(rng.integers(2, 6)), inside(cav, 0.6))
    else:
        raise ValueError(f"unknown body region {region!r}: expected chest, abdomen or pelvis")
    return blobs, geo
