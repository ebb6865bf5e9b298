"""Is a volume read from NIfTI or DICOM plausibly CT in Hounsfield units? One rule for both readers,
on robust statistics, so that a single odd voxel neither lets an MR through nor stops a CT.

The rule (docs/inference.md, "Which volumes count as CT"), on the finite voxels:

* the 99th percentile is at most :data:`MAX_P99_HU` (4095): CT's 12-bit scale ends at 3071 HU and
  only metal goes past it, never on 1% of a scan; an MR (intensities in the thousands), HU + 32768
  or a wrong RescaleSlope fail here;
* the 1st percentile is at least :data:`MIN_P1_HU` (-33792, the lowest 16-bit value under the usual
  -1024 intercept): padding outside the field of view (-2048, -3024 ...) is CT, -1e33 is not;
* at least :data:`MIN_LOW_SHARE` (1%) of voxels lie at or below -100 HU: a body CT holds air, lung
  or fat; an MR / PET (no negative values), a mask, or HU stored with an offset has none.

Percentiles come from an evenly strided sample of at most :data:`_SAMPLE` voxels.
"""

from __future__ import annotations

import numpy as np

from .volume_io import CTInputError

__all__ = ["MAX_P99_HU", "MIN_P1_HU", "MIN_LOW_SHARE", "check_hu"]

MAX_P99_HU = 4095.0
MIN_P1_HU = -33792.0
LOW_HU = -100.0
MIN_LOW_SHARE = 0.01
_SAMPLE = 1 << 20
_SLAB = 16


def _non_finite(hu: np.ndarray) -> int:
    """Count NaN / inf slab by slab: no volume-sized boolean mask."""
    return int(
        sum(np.count_nonzero(~np.isfinite(hu[k : k + _SLAB])) for k in range(0, hu.shape[0], _SLAB))
    )


def check_hu(where: str, hu: np.ndarray) -> None:
    """Raise CTInputError naming ``where`` unless ``hu`` (S, H, W) passes the module's rule; any
    NaN or infinite voxel is refused too (the NIfTI reader, which sees them in the file, tolerates
    a few before this and says so)."""
    if hu.size == 0:
        raise CTInputError(f"{where}: an empty volume")
    bad = _non_finite(hu)
    if bad:
        raise CTInputError(
            f"{where}: {bad:,} of {hu.size:,} voxels are NaN or infinite (after the rescale to HU)"
        )
    flat = hu.reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLE)].astype(np.float64)
    p1, p50, p99 = np.percentile(sample, [1, 50, 99])
    low = float(np.mean(sample <= LOW_HU))
    if p99 > MAX_P99_HU:
        why = f"99th percentile {p99:g} HU is above {MAX_P99_HU:g}, where CT's scale ends at 3071"
    elif p1 < MIN_P1_HU:
        why = f"1st percentile {p1:g} HU is below {MIN_P1_HU:g}, lower than a CT scanner stores"
    elif low < MIN_LOW_SHARE:
        why = (
            f"{low:.2%} of voxels at or below {LOW_HU:g} HU, where a body CT has air, lung and "
            f"fat on at least {MIN_LOW_SHARE:.0%}"
        )
    else:
        return
    raise CTInputError(
        f"{where}: not a CT volume in Hounsfield units ({why}; median {p50:g}, "
        f"1st-99th percentile {p1:g}..{p99:g}): an MR / PET image, a mask, HU "
        "stored with an offset, or a wrong RescaleSlope / scl_slope?"
    )
