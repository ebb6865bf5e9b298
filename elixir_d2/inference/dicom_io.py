"""DICOM CT series for inference: geometry tags validated as read from the files (only geometry,
modality and rescale tags are read: no patient identifier enters a CTVolume)."""
from __future__ import annotations

import math
import os
from typing import Dict, Optional

import numpy as np

from detectron2.utils.file_io import PathManager

from .nifti_io import oriented_volume
from .orientation import DEFAULT_MAX_VOXELS, check_voxel_cap
from .volume_io import _SPACING_ATOL_MM, _SPACING_RTOL, CTInputError, CTVolume, _first_line, _sitk

__all__ = ["read_dicom_series"]


def _header(sitk, path: str, folder: str) -> Dict:
    """Only the tags inference needs (geometry, modality): nothing that identifies the patient."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CTInputError(f"{folder}: unreadable DICOM file {os.path.basename(path)} "
                           f"({_first_line(e)})") from None
    tags = {"modality": "0008|0060", "position": "0020|0032", "orientation": "0020|0037",
            "spacing": "0028|0030"}
    out = {k: reader.GetMetaData(t).strip() for k, t in tags.items() if reader.HasMetaDataKey(t)}
    out["size"] = tuple(reader.GetSize())
    return out


def _numbers(text: str, n: int, what: str, where: str) -> np.ndarray:
    try:
        vals = [float(v) for v in text.replace(" ", "").split("\\") if v != ""]
    except ValueError:
        vals = []
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        raise CTInputError(f"{where}: malformed {what} {text!r}")
    return np.asarray(vals)


def read_dicom_series(folder: str, name: str,
                      max_voxels: Optional[int] = DEFAULT_MAX_VOXELS) -> CTVolume:
    """A DICOM CT series folder in HU (one series per folder; modality CT; a positive
    PixelSpacing and evenly spaced ImagePositionPatient on every slice; at most ``max_voxels``
    voxels, checked on the headers before the pixel data is read)."""
    sitk = _sitk()
    local = PathManager.get_local_path(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(local)
    if not ids:
        raise CTInputError(f"{folder}: no readable DICOM series")
    if len(ids) > 1:
        raise CTInputError(f"{folder}: {len(ids)} DICOM series in one folder; put each series in "
                           "its own folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(local, ids[0]))
    if len(files) < 2:
        raise CTInputError(f"{folder}: a single DICOM slice is a 2-D image; inference needs a "
                           "series")
    headers = [_header(sitk, f, folder) for f in files]
    modalities = {h.get("modality", "") for h in headers}
    if modalities != {"CT"}:
        shown = sorted(m or "<missing>" for m in modalities)
        raise CTInputError(f"{folder}: not a CT series (Modality {', '.join(shown)})")
    for f, h in zip(files, headers):
        for key, tag in (("spacing", "PixelSpacing 0028|0030"),
                         ("position", "ImagePositionPatient 0020|0032")):
            if key not in h:
                raise CTInputError(f"{folder}: missing spacing ({tag} absent from "
                                   f"{os.path.basename(f)})")
    iop = _numbers(headers[0].get("orientation", "1\\0\\0\\0\\1\\0"), 6, "ImageOrientationPatient",
                   folder)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([_numbers(h["position"], 3, "ImagePositionPatient", folder) @ normal
                    for h in headers])
    gaps = np.diff(np.sort(pos))
    step = float(np.median(gaps))
    if step <= 0 or np.any(np.abs(gaps - step) > _SPACING_RTOL * step + _SPACING_ATOL_MM):
        shown = ", ".join(f"{g:.3g}" for g in gaps[:8]) + (" ..." if len(gaps) > 8 else "")
        raise CTInputError(f"{folder}: inconsistent slice spacing (gaps between slice positions: "
                           f"{shown} mm)")
    pixel = {tuple(_numbers(h["spacing"], 2, "PixelSpacing", folder)) for h in headers}
    if len(pixel) != 1:
        raise CTInputError(f"{folder}: PixelSpacing differs between slices {sorted(pixel)}")
    # GDCM reads a PixelSpacing of 0 as 1 mm: the raw tag is checked instead.
    bad = [(os.path.basename(f), h["spacing"]) for f, h in zip(files, headers)
           if not all(v > 0 for v in _numbers(h["spacing"], 2, "PixelSpacing", folder))]
    if bad:
        series = os.path.basename(os.path.normpath(folder))
        more = f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else ""
        raise CTInputError(f"{folder}: DICOM series {series!r} has PixelSpacing {bad[0][1]!r} "
                           f"(in {bad[0][0]}{more}): pixel spacing must be positive mm")
    rows_cols = {h["size"][:2] for h in headers}
    if len(rows_cols) != 1:
        raise CTInputError(f"{folder}: slices differ in size {sorted(rows_cols)}")
    check_voxel_cap(folder, next(iter(rows_cols)) + (len(files),), max_voxels, CTInputError)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise CTInputError(f"{folder}: unreadable DICOM series ({_first_line(e)})") from None
    # GDCM derives the series' z spacing from the same positions; ours was checked above.
    img.SetSpacing(tuple(img.GetSpacing()[:2]) + (step,))
    return oriented_volume(img, folder, name, "dicom")
