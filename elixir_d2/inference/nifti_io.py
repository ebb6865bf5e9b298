"""NIfTI CT volumes for inference (``.nii`` / ``.nii.gz``), header checked before any voxel is
read."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from detectron2.utils.file_io import PathManager

from ..data.nifti_check import nifti_scan
from .hu_check import check_hu
from .orientation import DEFAULT_MAX_VOXELS, check_voxel_cap, to_lps_array
from .volume_io import (
    CTInputError,
    CTVolume,
    _first_line,
    _sitk,
    check_mm,
    check_slice_side,
    check_spacing,
)

__all__ = ["read_nifti", "nifti_pixdim", "oriented_volume", "MAX_NON_FINITE_FRACTION"]

# NaN / inf voxels a NIfTI may hold and still be read (as 0 HU, ITK's rule), with a warning: a
# stray voxel is no reason to refuse a scan, a region of them is.
MAX_NON_FINITE_FRACTION = 1e-4


def oriented_volume(img, source: str, name: str, kind: str) -> CTVolume:
    """SimpleITK image -> LPS-reoriented CTVolume (HU float32), converted slab by slab; spacing,
    slice size and values checked as CT (:func:`.hu_check.check_hu`)."""
    hu, (sx, sy, sz), origin, direction = to_lps_array(img)
    check_spacing(source, (sx, sy), sz)
    check_slice_side(source, hu.shape[2], hu.shape[1])
    check_hu(source, hu)
    return CTVolume(
        name=name,
        source=source,
        kind=kind,
        hu=hu,
        slice_numbers=list(range(hu.shape[0])),
        spacing=(float(sx), float(sy)),
        slice_interval=float(sz),
        origin=origin,
        direction=direction,
    )


def nifti_pixdim(path: str) -> Optional[Tuple[float, ...]]:
    """pixdim[1..3] of a NIfTI-1 / NIfTI-2 header (.nii or .nii.gz), None if it is neither.
    ITK silently turns a zero pixdim into 1 mm, so the header is read here to catch it."""
    import gzip
    import struct

    with PathManager.open(path, "rb") as raw:
        head = raw.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(PathManager.get_local_path(path), "rb") as f:
            hdr = f.read(540)
    except (OSError, EOFError):
        return None
    for endian in "<>":
        if len(hdr) >= 348 and struct.unpack(endian + "i", hdr[:4])[0] == 348:
            return struct.unpack(endian + "8f", hdr[76:108])[1:4]
        if len(hdr) >= 540 and struct.unpack(endian + "i", hdr[:4])[0] == 540:
            return struct.unpack(endian + "8d", hdr[104:168])[1:4]
    return None


def read_nifti(path: str, name: str, max_voxels: Optional[int] = DEFAULT_MAX_VOXELS) -> CTVolume:
    """A NIfTI CT volume in HU; 2-D, 4-D, multi-component (RGB) or non-HU images are refused,
    as is a header without spacing (pixdim 0) or one declaring more than ``max_voxels`` voxels
    (checked on the header, before anything is decompressed or allocated)."""
    sitk = _sitk()
    local = PathManager.get_local_path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(local)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CTInputError(f"{path}: unreadable NIfTI file ({_first_line(e)})") from None
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise CTInputError(
            f"{path}: not a CT volume ({reader.GetNumberOfComponents()} components "
            "per voxel, e.g. RGB)"
        )
    if reader.GetDimension() == 2 or (reader.GetDimension() == 3 and min(size) == 1):
        raise CTInputError(f"{path}: a 2-D image (size {size}); inference needs a 3-D CT volume")
    if reader.GetDimension() != 3:
        raise CTInputError(f"{path}: {reader.GetDimension()}-D image; expected a 3-D CT volume")
    check_voxel_cap(path, size, max_voxels, CTInputError)
    pixdim = nifti_pixdim(path)
    if pixdim is not None and not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise CTInputError(
            f"{path}: missing spacing (NIfTI pixdim[1:4] = {tuple(float(v) for v in pixdim)})"
        )
    # In mm as ITK scales the header's units; which axis is in-plane is known only after the
    # reorientation, and all three share one plausible range.
    for v in reader.GetSpacing():
        check_mm(path, "voxel spacing", float(v))
    # SimpleITK zero-fills what a cut-off file lacks and reads NaN / inf as 0: both are counted
    # in the file itself.
    truncated, non_finite, voxels = nifti_scan(path)
    if truncated:
        raise CTInputError(f"{path}: unreadable NIfTI file ({truncated})")
    warnings: List[str] = []
    if non_finite:
        what = f"{path}: {non_finite:,} of {voxels:,} voxels are NaN or infinite"
        if non_finite > MAX_NON_FINITE_FRACTION * voxels:
            raise CTInputError(
                f"{what}; at most {MAX_NON_FINITE_FRACTION:.2%} may be (a corrupt "
                "or non-CT volume?)"
            )
        warnings.append(f"{what}; read as 0 HU (at most {MAX_NON_FINITE_FRACTION:.2%} are)")
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise CTInputError(f"{path}: unreadable NIfTI file ({_first_line(e)})") from None
    del reader  # only the image and the float32 volume from here on
    vol = oriented_volume(img, path, name, "nifti")
    vol.warnings.extend(warnings)
    return vol
