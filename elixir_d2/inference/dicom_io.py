"""DICOM CT series for inference: geometry tags validated as read from the files (only geometry,
modality, pixel-layout and rescale tags are read: no patient identifier enters a CTVolume)."""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

from detectron2.utils.file_io import PathManager

from .nifti_io import oriented_volume
from .orientation import DEFAULT_MAX_VOXELS, check_voxel_cap
from .volume_io import (
    _SPACING_ATOL_MM,
    _SPACING_RTOL,
    CTInputError,
    CTVolume,
    _first_line,
    _sitk,
    check_slice_side,
    check_spacing,
)

__all__ = ["read_dicom_series"]


# Orientations of one series may differ by rounding (6 decimals in most headers), not more.
_ORIENTATION_ATOL = 0.01
_TAGS = {
    "modality": "0008|0060",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "spacing": "0028|0030",
    "rows": "0028|0010",
    "columns": "0028|0011",
    "bits": "0028|0100",
    "samples": "0028|0002",
    "frames": "0028|0008",
}
_IMPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
_UNCOMPRESSED = {_IMPLICIT_LE, "1.2.840.10008.1.2.1", _EXPLICIT_BE}
# Explicit-VR value representations whose length field is 4 bytes after 2 reserved ones.
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_PIXEL_VRS = {b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN"}
_MAX_CANDIDATES = 64


def _header(sitk, path: str, folder: str) -> Dict:
    """Only the tags inference needs (geometry, modality, pixel layout): nothing that identifies
    the patient."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CTInputError(
            f"{folder}: unreadable DICOM file {os.path.basename(path)} ({_first_line(e)})"
        ) from None
    out = {k: reader.GetMetaData(t).strip() for k, t in _TAGS.items() if reader.HasMetaDataKey(t)}
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


def _int_tag(h: Dict, key: str, default: Optional[int] = None) -> Optional[int]:
    try:
        return int(float(h[key]))
    except (KeyError, ValueError):
        return default


def _shown(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):g}" for x in v) + ")"


def _transfer_syntax(data) -> str:
    """Transfer syntax UID from the file meta group (implicit VR little endian without one)."""
    if data[128:132] != b"DICM":
        return _IMPLICIT_LE
    i = 132
    while i + 8 <= len(data) and data[i : i + 2] == b"\x02\x00":  # group 0002, explicit VR LE
        element, vr = struct.unpack("<H", data[i + 2 : i + 4])[0], bytes(data[i + 4 : i + 6])
        if vr in _LONG_VRS:
            length, value = struct.unpack("<I", data[i + 8 : i + 12])[0], i + 12
        else:
            length, value = struct.unpack("<H", data[i + 6 : i + 8])[0], i + 8
        if element == 0x0010:
            return bytes(data[value : value + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        i = value + length
    return _IMPLICIT_LE


def _pixel_data_shortfall(path: str, h: Dict) -> Optional[str]:
    """Why the Pixel Data element of ``path`` holds fewer bytes than Rows x Columns x frames x
    BitsAllocated need, or None (enough, compressed, or a layout this check does not know).
    GDCM zero-fills what is missing, so the element is found and measured here."""
    rows, cols = _int_tag(h, "rows"), _int_tag(h, "columns")
    bits, samples = _int_tag(h, "bits"), _int_tag(h, "samples", 1)
    if not rows or not cols or not bits:
        return None
    frames = max(_int_tag(h, "frames", 1) or 1, 1)
    need = (rows * cols * samples * frames * bits + 7) // 8
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            syntax = _transfer_syntax(data)
            if syntax not in _UNCOMPRESSED:
                return None  # encapsulated: the decoder checks its own stream
            big, implicit = syntax == _EXPLICIT_BE, syntax == _IMPLICIT_LE
            tag = b"\x7f\xe0\x00\x10" if big else b"\xe0\x7f\x10\x00"
            held, i = [], data.find(tag, 132 if data[128:132] == b"DICM" else 0)
            # (7FE0,0010) may also occur inside other values (an icon's pixels, private data):
            # the series is refused only when no occurrence holds enough bytes.
            while i >= 0 and len(held) < _MAX_CANDIDATES:
                if implicit:
                    length, start = struct.unpack("<I", data[i + 4 : i + 8])[0], i + 8
                elif bytes(data[i + 4 : i + 6]) in _PIXEL_VRS and data[i + 6 : i + 8] == b"\0\0":
                    length, start = (
                        struct.unpack(">I" if big else "<I", data[i + 8 : i + 12])[0],
                        i + 12,
                    )
                else:
                    length, start = None, 0
                if length == 0xFFFFFFFF:
                    return None  # encapsulated fragments
                if length is not None:
                    held.append(max(min(length, size - start), 0))
                i = data.find(tag, i + 1)
    if not held:
        if size >= need:
            return None
        return f"the file is {size} bytes where {cols} x {rows} pixels of {bits} bits need {need}"
    if max(held) >= need:
        return None
    frames_shown = f" x {frames} frames" if frames > 1 else ""
    return (
        f"pixel data holds {max(held)} bytes where {cols} x {rows} pixels{frames_shown} of "
        f"{bits} bits need {need}"
    )


def _orientations(folder: str, files: List[str], headers: List[Dict]) -> np.ndarray:
    """The series' one ImageOrientationPatient (row, column cosines); refused when a file's is
    malformed or differs from the first file's (scouts mixed in, slices rotated in-plane)."""
    present = [h.get("orientation") is not None for h in headers]
    if not any(present):
        return np.array([1.0, 0, 0, 0, 1, 0])  # GDCM's default too
    if not all(present):
        missing = os.path.basename(files[present.index(False)])
        raise CTInputError(
            f"{folder}: slices differ in orientation: {missing} has no "
            "ImageOrientationPatient (0020|0037) where others have one"
        )
    iops = []
    for f, h in zip(files, headers):
        iop = _numbers(h["orientation"], 6, "ImageOrientationPatient", folder)
        r, c = iop[:3], iop[3:]
        if (
            abs(np.linalg.norm(r) - 1) > _ORIENTATION_ATOL
            or abs(np.linalg.norm(c) - 1) > _ORIENTATION_ATOL
            or abs(float(r @ c)) > _ORIENTATION_ATOL
        ):
            raise CTInputError(
                f"{folder}: {os.path.basename(f)} has ImageOrientationPatient "
                f"{_shown(iop)}: not two orthogonal unit vectors"
            )
        iops.append(iop)
    for f, iop in zip(files[1:], iops[1:]):
        if np.max(np.abs(iop - iops[0])) > _ORIENTATION_ATOL:
            raise CTInputError(
                f"{folder}: slices differ in orientation: {os.path.basename(files[0])} has "
                f"ImageOrientationPatient {_shown(iops[0])} but {os.path.basename(f)} has "
                f"{_shown(iop)}; one series must be one stack (scouts or another series mixed "
                "in?)"
            )
    return iops[0]


def _stack_drift(
    folder: str,
    files: List[str],
    pos: np.ndarray,
    iop: np.ndarray,
    along: np.ndarray,
    step: float,
    tol: float,
) -> Optional[str]:
    """Refuse slices whose positions leave the straight line (or the uniformly tilted one) the
    others lie on; a warning when that line is tilted (gantry tilt: read unsheared)."""
    inplane = pos @ np.stack([iop[:3], iop[3:]], axis=1)  # (n, 2) mm along rows, columns
    order = np.argsort(along)
    d, q = along[order], inplane[order]
    # A robust line: the median in-plane step per mm along the normal, the median offset.
    slope = np.median(np.diff(q, axis=0) / np.diff(d)[:, None], axis=0)
    offset = np.median(q - d[:, None] * slope, axis=0)
    off = np.linalg.norm(q - (d[:, None] * slope + offset), axis=1)
    worst = int(np.argmax(off))
    if off[worst] > tol:
        f = files[order[worst]]
        raise CTInputError(
            f"{folder}: slice positions do not form one stack: {os.path.basename(f)} lies "
            f"{off[worst]:.3g} mm off the line through the others (ImagePositionPatient "
            f"{_shown(pos[order[worst]])})"
        )
    per_slice = float(np.linalg.norm(slope)) * step
    if per_slice * (len(files) - 1) > tol:
        return (
            f"{folder}: the slices drift {per_slice:.3g} mm in-plane per slice (a gantry "
            "tilt?); read as an unsheared stack"
        )
    return None


def _check_series_files(folder: str, files: List[str], headers: List[Dict]) -> None:
    """One file per slice, at least two of them, all CT, each with spacing and position tags."""
    for f, h in zip(files, headers):
        frames = _int_tag(h, "frames", 1) or 1
        if frames > 1:
            raise CTInputError(
                f"{folder}: {os.path.basename(f)} is a multi-frame DICOM file "
                f"({frames} frames), which is not supported; export the series "
                "as one file per slice"
            )
    if len(files) < 2:
        raise CTInputError(
            f"{folder}: a single DICOM slice is a 2-D image; inference needs a series"
        )
    modalities = {h.get("modality", "") for h in headers}
    if modalities != {"CT"}:
        shown = sorted(m or "<missing>" for m in modalities)
        raise CTInputError(f"{folder}: not a CT series (Modality {', '.join(shown)})")
    for f, h in zip(files, headers):
        for key, tag in (
            ("spacing", "PixelSpacing 0028|0030"),
            ("position", "ImagePositionPatient 0020|0032"),
        ):
            if key not in h:
                raise CTInputError(
                    f"{folder}: missing spacing ({tag} absent from {os.path.basename(f)})"
                )


def _slice_step(folder: str, positions: np.ndarray, normal: np.ndarray) -> Tuple[np.ndarray, float]:
    """(each slice's position along ``normal``, the median gap), refusing uneven gaps."""
    pos = positions @ normal
    gaps = np.diff(np.sort(pos))
    step = float(np.median(gaps))
    if step <= 0 or np.any(np.abs(gaps - step) > _SPACING_RTOL * step + _SPACING_ATOL_MM):
        shown = ", ".join(f"{g:.3g}" for g in gaps[:8]) + (" ..." if len(gaps) > 8 else "")
        raise CTInputError(
            f"{folder}: inconsistent slice spacing (gaps between slice positions: {shown} mm)"
        )
    return pos, step


def _pixel_spacing(folder: str, files: List[str], headers: List[Dict]) -> Tuple[float, float]:
    """The series' one PixelSpacing (row, column mm), positive."""
    pixel = {tuple(_numbers(h["spacing"], 2, "PixelSpacing", folder)) for h in headers}
    if len(pixel) != 1:
        raise CTInputError(f"{folder}: PixelSpacing differs between slices {sorted(pixel)}")
    # GDCM reads a PixelSpacing of 0 as 1 mm: the raw tag is checked instead.
    bad = [
        (os.path.basename(f), h["spacing"])
        for f, h in zip(files, headers)
        if not all(v > 0 for v in _numbers(h["spacing"], 2, "PixelSpacing", folder))
    ]
    if bad:
        series = os.path.basename(os.path.normpath(folder))
        more = f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else ""
        raise CTInputError(
            f"{folder}: DICOM series {series!r} has PixelSpacing {bad[0][1]!r} "
            f"(in {bad[0][0]}{more}): pixel spacing must be positive mm"
        )
    return next(iter(pixel))


def read_dicom_series(
    folder: str, name: str, max_voxels: Optional[int] = DEFAULT_MAX_VOXELS
) -> CTVolume:
    """A DICOM CT series folder in HU (one series per folder; modality CT; one file per slice,
    all of one orientation and size, positions evenly spaced along one line; a positive
    PixelSpacing; pixel data as long as Rows x Columns; at most ``max_voxels`` voxels, checked
    on the headers before the pixel data is read; HU checked by :func:`.hu_check.check_hu`)."""
    sitk = _sitk()
    local = PathManager.get_local_path(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(local)
    if not ids:
        raise CTInputError(f"{folder}: no readable DICOM series")
    if len(ids) > 1:
        raise CTInputError(
            f"{folder}: {len(ids)} DICOM series in one folder; put each series in its own folder"
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(local, ids[0]))
    headers = [_header(sitk, f, folder) for f in files]
    _check_series_files(folder, files, headers)
    iop = _orientations(folder, files, headers)
    positions = np.array(
        [_numbers(h["position"], 3, "ImagePositionPatient", folder) for h in headers]
    )
    pos, step = _slice_step(folder, positions, np.cross(iop[:3], iop[3:]))
    spacing = _pixel_spacing(folder, files, headers)
    check_spacing(folder, spacing, step)
    # Half a pixel: a slice further off the others' line does not stack onto their grid.
    drift = _stack_drift(
        folder, files, positions, iop, pos, step, tol=0.5 * min(spacing) + _SPACING_ATOL_MM
    )
    rows_cols = {h["size"][:2] for h in headers}
    if len(rows_cols) != 1:
        raise CTInputError(f"{folder}: slices differ in size {sorted(rows_cols)}")
    check_slice_side(folder, *next(iter(rows_cols)))
    check_voxel_cap(folder, next(iter(rows_cols)) + (len(files),), max_voxels, CTInputError)
    for f, h in zip(files, headers):
        short = _pixel_data_shortfall(f, h)
        if short:
            raise CTInputError(
                f"{os.path.join(folder, os.path.basename(f))}: {short} (a "
                "truncated or inconsistent file)"
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise CTInputError(f"{folder}: unreadable DICOM series ({_first_line(e)})") from None
    # GDCM derives the series' z spacing from the same positions; ours was checked above.
    img.SetSpacing(tuple(img.GetSpacing()[:2]) + (step,))
    vol = oriented_volume(img, folder, name, "dicom")
    vol.series_files = files
    if drift:
        vol.warnings.append(drift)
    return vol
