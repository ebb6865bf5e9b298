"""The scanner model of the second generator: geometry draws, slice-thickness partial volume,
in-plane blur, CT-textured (band-pass correlated) noise and beam-hardening streaks.

Pixel spacing is drawn as 0.6-1.0 mm at 512 px and scaled to the image size so that the field
stays a body (307-512 mm): 1.6-2.67 mm at 192 px. The writer defaults to 512 px.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import cv2
import numpy as np

from .tissues import HU_AIR, Structure

SPACING_MM_AT_512 = (0.6, 1.0)
SLICE_INTERVALS_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SCANNER_HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit scanner stores


def draw_geometry(rng: np.random.Generator, image_size: int) -> Tuple[float, float]:
    """(pixel spacing mm, slice interval mm) of one series."""
    spacing = float(rng.uniform(*SPACING_MM_AT_512)) * 512.0 / image_size
    interval = float(rng.choice(SLICE_INTERVALS_MM))
    return spacing, interval


def pixel_centres(size: int, spacing: float) -> np.ndarray:
    """mm coordinate of each pixel centre along one axis (the image centre is 0)."""
    return ((np.arange(size, dtype=np.float32) + 0.5) - size / 2) * spacing


def paint_plane(
    structures: Sequence[Structure], z: float, size: int, spacing: float, oversample: int = 1
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU, label, texture amplitude) of the plane at ``z``, later structures over earlier ones;
    ``oversample`` > 1 paints a grid that many times finer."""
    n = size * oversample
    xs = pixel_centres(n, spacing / oversample)
    hu = np.full((n, n), HU_AIR, np.float32)
    label = np.zeros((n, n), np.uint8)
    amp = np.zeros((n, n), np.float32)
    step = spacing / oversample
    for s in structures:
        box = s.shape.bbox(z)
        if box is None:
            continue
        c0, r0 = (max(0, int(math.floor(v / step + n / 2))) for v in box[:2])
        c1, r1 = (min(n, int(math.ceil(v / step + n / 2)) + 1) for v in box[2:])
        if c0 >= c1 or r0 >= r1:
            continue
        m = s.shape.inside(xs[None, c0:c1], xs[r0:r1, None], z)
        win = (slice(r0, r1), slice(c0, c1))
        hu[win][m], label[win][m], amp[win][m] = s.hu, s.label, s.texture
    return hu, label, amp


def texture_fields(size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, float]:
    """Two smooth unit-variance fields and a z period: organ inhomogeneity turning along z."""
    fields = []
    for _ in range(2):
        f = cv2.GaussianBlur(
            rng.standard_normal((size, size)).astype(np.float32), (0, 0), size / 24
        )
        fields.append(f / (f.std() or 1.0))
    return fields[0], fields[1], float(rng.uniform(20, 45))


def ct_noise(shape: Tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with CT's texture: white noise band-passed (a difference of Gaussians, as the
    ramp-filtered back-projection leaves a mid-frequency peak), scaled to std ``sigma``."""
    w = rng.standard_normal(shape).astype(np.float32)
    band = cv2.GaussianBlur(w, (0, 0), 0.8) - 0.6 * cv2.GaussianBlur(w, (0, 0), 2.2)
    return band * (sigma / (float(band.std()) or 1.0))


def streaks(size: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Dark beam-hardening bands between dense structures: a few lines through the body centre,
    the same on every slice of the series."""
    img = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        ang = rng.uniform(0, math.pi)
        cx, cy = size / 2 + rng.normal(0, size / 12), size / 2 + rng.normal(0, size / 12)
        dx, dy = math.cos(ang) * size, math.sin(ang) * size
        cv2.line(
            img,
            (int(cx - dx), int(cy - dy)),
            (int(cx + dx), int(cy + dy)),
            float(-rng.uniform(15, 45)),
            max(1, int(round(1.5 / spacing))),
        )
    return cv2.GaussianBlur(img, (0, 0), 1.0)


def acquire(
    structures: Sequence[Structure],
    z_mm: Sequence[float],
    size: int,
    spacing: float,
    interval: float,
    noise_hu: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The written series (n, size, size) in HU: each slice averages sub-planes across its
    thickness (= the interval), gets organ texture, the in-plane blur of the reconstruction
    kernel, noise and, on some series, streaks; clipped to the scanner range."""
    sub = min(5, max(2, int(round(interval / 0.8))))
    offsets = [((i + 0.5) / sub - 0.5) * interval for i in range(sub)]
    t1, t2, period = texture_fields(size, rng)
    psf = float(rng.uniform(0.5, 1.0)) / spacing
    streak = streaks(size, spacing, rng) if rng.random() < 0.35 else None
    out = np.empty((len(z_mm), size, size), np.float32)
    for k, z in enumerate(z_mm):
        acc = np.zeros((size, size), np.float32)
        tex = np.zeros((size, size), np.float32)
        for dz in offsets:
            hu, _, amp = paint_plane(structures, z + dz, size, spacing)
            acc += hu
            tex += amp
        img = acc / sub
        ph = 2 * math.pi * z / period
        img += (tex / sub) * (math.cos(ph) * t1 + math.sin(ph) * t2)
        img = cv2.GaussianBlur(img, (0, 0), psf)
        body = img > -900
        img += ct_noise((size, size), noise_hu, rng) * np.where(body, 1.0, 0.3)
        if streak is not None:
            img += streak * body
        out[k] = img
    return np.clip(out, *SCANNER_HU_RANGE)


def noise_sigma(half_width_mm: float, rng: np.random.Generator) -> float:
    """Noise std (HU): 8-20 HU, higher for larger patients (more attenuation)."""
    return float(rng.uniform(8, 20)) * (half_width_mm / 150.0) ** 1.2
