"""LPS reorientation of a SimpleITK image into a float32 HU volume, slab by slab, and the voxel cap.

``sitk.DICOMOrient`` followed by ``GetArrayFromImage`` and ``astype(float32)`` holds the image
four times over. Reorienting to LPS only permutes and flips axes, so the same result is read
here through a numpy view of the image and converted into the output one slab of slices at a
time: the image plus the float32 output, nothing else of the volume's size.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["DEFAULT_MAX_VOXELS", "check_voxel_cap", "lps_layout", "to_lps_array"]

# 512 x 512 x 2048 slices: a whole-body thin-slice CT fits; 2 GiB as float32.
DEFAULT_MAX_VOXELS = 512 * 512 * 2048
_SLAB = 16


def check_voxel_cap(where: str, size: Sequence[int], max_voxels: Optional[int], error) -> None:
    """Raise ``error`` naming ``where`` when a volume of ``size`` voxels exceeds ``max_voxels``
    (None: no cap); called on header sizes, before anything of that size is allocated."""
    n = int(np.prod([int(v) for v in size], dtype=np.float64))
    if max_voxels is not None and n > max_voxels:
        shown = " x ".join(str(int(v)) for v in size)
        raise error(
            f"{where}: {shown} = {n:,} voxels exceeds the limit of {max_voxels:,} "
            f"(predict_net.py --max-voxels N raises it)"
        )


def lps_layout(
    direction: np.ndarray,
) -> Optional[Tuple[Tuple[int, int, int], Tuple[bool, bool, bool]]]:
    """For LPS axes j = 0, 1, 2: the index axis running most along j and whether it runs
    backwards (ITK's rule for DICOMOrient); None when two index axes share a dominant axis."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    dominant = [int(np.argmax(np.abs(d[:, i]))) for i in range(3)]
    if sorted(dominant) != [0, 1, 2]:
        return None
    perm = tuple(dominant.index(j) for j in range(3))
    flips = tuple(bool(d[j, perm[j]] < 0) for j in range(3))
    return perm, flips  # type: ignore[return-value]


def to_lps_array(
    img,
) -> Tuple[np.ndarray, Tuple[float, float, float], Tuple[float, float, float], np.ndarray]:
    """(hu as (z, y, x) float32, spacing, origin, direction) of ``img`` reoriented to LPS."""
    import SimpleITK as sitk

    layout = lps_layout(np.asarray(img.GetDirection()))
    if layout is None:  # a 45-degree oblique: leave the choice to ITK (whole copies)
        img = sitk.DICOMOrient(img, "LPS")
        return (
            sitk.GetArrayFromImage(img).astype(np.float32, copy=False),
            tuple(img.GetSpacing()),
            tuple(img.GetOrigin()),
            np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3),
        )
    perm, flips = layout
    size, sp = img.GetSize(), img.GetSpacing()
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    corner = [0, 0, 0]
    for j in range(3):
        if flips[j]:
            corner[perm[j]] = size[perm[j]] - 1
    origin = tuple(float(v) for v in img.TransformIndexToPhysicalPoint(corner))
    direction = np.stack([d[:, perm[j]] * (-1.0 if flips[j] else 1.0) for j in range(3)], axis=1)
    spacing = tuple(float(sp[perm[j]]) for j in range(3))
    view = sitk.GetArrayViewFromImage(img)  # numpy axis k = index axis 2 - k
    view = view.transpose(2 - perm[2], 2 - perm[1], 2 - perm[0])
    view = view[tuple(slice(None, None, -1) if flips[2 - k] else slice(None) for k in range(3))]
    hu = np.empty(view.shape, dtype=np.float32)
    for k in range(0, hu.shape[0], _SLAB):
        hu[k : k + _SLAB] = view[k : k + _SLAB]
    return hu, spacing, origin, direction
