"""Read CT inputs for inference into HU volumes, with validation that names the input at fault.

Supported inputs (see :func:`discover_cases`):

* a DeepLesion slice folder (``NNN.png``, uint16, HU + 32768) or one key slice in it;
* a NIfTI volume (``.nii`` / ``.nii.gz``);
* a DICOM series folder (SimpleITK ``ImageSeriesReader``; GDCM applies RescaleSlope /
  RescaleIntercept, so values are HU; spacing comes from PixelSpacing and the
  ImagePositionPatient of consecutive slices);
* a folder holding any number of the above (searched recursively).

NIfTI and DICOM volumes are reoriented to LPS (``sitk.DICOMOrient``): axis 0 runs along the
patient's superior axis and slices show the patient's right on the image's left, anterior at
the top, the radiological display DeepLesion's PNGs use. Only the geometry, modality and rescale
tags of DICOM headers are read: no patient identifier ever enters a :class:`CTVolume`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.utils.file_io import PathManager

from ..data.ct_mapper import CTSliceError, read_hu_slice
from ..data.nifti_check import nifti_truncation

logger = logging.getLogger(__name__)

__all__ = [
    "CTInputError", "CTVolume", "CaseSource", "discover_cases", "read_case", "read_png_series",
    "read_nifti", "read_dicom_series", "context_slices_needed", "check_context",
]

_PNG_SLICE = re.compile(r"^(\d+)\.png$")
_NIFTI_EXT = (".nii.gz", ".nii")
_DICOM_EXT = (".dcm", ".dicom", ".ima")
# Even-spacing tolerance of DICOM slice positions: scanners write positions rounded to ~1e-3 mm.
_SPACING_RTOL, _SPACING_ATOL_MM = 0.01, 0.01
_MAX_DEPTH = 4


class CTInputError(ValueError):
    """An input that cannot be used for inference; the message names the file or folder."""


@dataclass
class CTVolume:
    """A CT series in HU, ready for slice-by-slice inference.

    ``hu[i]`` is the slice numbered ``slice_numbers[i]`` (DeepLesion: the PNG's number; NIfTI
    and DICOM: 0..S-1 along the superior axis after reorientation). Neighbour positions are in
    units of slice numbers, ``slice_interval`` mm apart.
    """

    name: str
    source: str
    kind: str  # "deeplesion", "nifti" or "dicom"
    hu: np.ndarray  # (S, H, W) float32
    slice_numbers: List[int]
    spacing: Tuple[float, float]  # (x, y) mm per pixel
    slice_interval: float  # mm between consecutive slice numbers
    key_slices: Optional[List[int]] = None  # slice numbers to predict; None = all
    series_range: Optional[Tuple[int, int]] = None  # first/last number of the whole series
    origin: Optional[Tuple[float, float, float]] = None  # LPS mm of voxel (0, 0, 0)
    direction: Optional[np.ndarray] = None  # 3x3 index -> LPS direction cosines
    warnings: List[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.hu.shape[1])

    @property
    def width(self) -> int:
        return int(self.hu.shape[2])

    def slices_to_predict(self) -> List[int]:
        return list(self.key_slices) if self.key_slices is not None else list(self.slice_numbers)

    @functools.cached_property
    def rows(self) -> Dict[int, int]:
        """Slice number -> row of ``hu``."""
        return {n: i for i, n in enumerate(self.slice_numbers)}

    def physical_point(self, x: float, y: float, number: int) -> Optional[Tuple[float, float, float]]:
        """LPS position (mm) of continuous pixel coordinate (x, y) on slice ``number``
        (pixel i spans [i, i + 1), so its centre is voxel index i); None without geometry."""
        if self.origin is None or self.direction is None:
            return None
        idx = np.array([(x - 0.5) * self.spacing[0], (y - 0.5) * self.spacing[1],
                        number * self.slice_interval])
        p = np.asarray(self.origin) + self.direction @ idx
        return tuple(float(v) for v in p)


@dataclass
class CaseSource:
    """One case found under the input path (not read yet)."""

    name: str
    path: str
    kind: str  # "deeplesion", "nifti" or "dicom"
    key_slice: Optional[int] = None


# ---------------------------------------------------------------------------------- discovery
def _png_numbers(folder: str) -> Dict[int, str]:
    out = {}
    for f in PathManager.ls(folder):
        m = _PNG_SLICE.match(os.path.basename(f))
        if m:
            out[int(m.group(1))] = os.path.join(folder, os.path.basename(f))
    return out


def _is_dicom_file(path: str) -> bool:
    if path.lower().endswith(_DICOM_EXT):
        return True
    try:
        with PathManager.open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _strip_nifti_ext(name: str) -> str:
    for ext in _NIFTI_EXT:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _classify_dir(folder: str) -> Optional[str]:
    files = [os.path.join(folder, f) for f in PathManager.ls(folder)]
    plain = [f for f in files if PathManager.isfile(f)]
    if any(_PNG_SLICE.match(os.path.basename(f)) for f in plain):
        return "deeplesion"
    if any(_is_dicom_file(f) for f in plain[:64]):
        return "dicom"
    return None


def discover_cases(path: str) -> Tuple[List[CaseSource], List[str]]:
    """Cases under ``path`` and the files that were ignored (neither CT nor a folder of CT).

    Raises:
        CTInputError: ``path`` does not exist, is a file of an unsupported type, or holds no case.
    """
    path = os.path.normpath(path)
    if not PathManager.exists(path):
        raise CTInputError(f"{path}: no such file or folder")
    if PathManager.isfile(path):
        base = os.path.basename(path)
        low = base.lower()
        if low.endswith(_NIFTI_EXT):
            return [CaseSource(_strip_nifti_ext(base), path, "nifti")], []
        m = _PNG_SLICE.match(base)
        if m:
            folder = os.path.dirname(path) or "."
            return [CaseSource(os.path.basename(os.path.abspath(folder)), folder, "deeplesion", int(m.group(1)))], []
        if low.endswith(".png"):
            raise CTInputError(f"{path}: a DeepLesion key slice must be named <number>.png inside its series folder")
        if _is_dicom_file(path):
            raise CTInputError(f"{path}: a single DICOM file is a 2-D image; pass the folder of its series")
        raise CTInputError(f"{path}: unsupported input (expected a DeepLesion slice folder or .png key slice, "
                           f"a .nii / .nii.gz volume, a DICOM series folder, or a folder of these)")
    cases: List[CaseSource] = []
    ignored: List[str] = []
    _walk(path, cases, ignored, depth=0)
    if not cases:
        raise CTInputError(f"{path}: no CT input found (DeepLesion PNG slices, NIfTI volumes or DICOM series)")
    # Case names become output folder names: make them unique.
    seen: Dict[str, int] = {}
    for c in cases:
        k = seen.get(c.name, 0)
        seen[c.name] = k + 1
        if k:
            c.name = f"{c.name}_{k + 1}"
    return cases, ignored


def _walk(folder: str, cases: List[CaseSource], ignored: List[str], depth: int) -> None:
    kind = _classify_dir(folder)
    if kind is not None:
        cases.append(CaseSource(os.path.basename(os.path.abspath(folder)), folder, kind))
        return
    for entry in sorted(PathManager.ls(folder)):
        child = os.path.join(folder, entry)
        if PathManager.isdir(child):
            if depth + 1 <= _MAX_DEPTH:
                before = len(cases)
                _walk(child, cases, ignored, depth + 1)
                if len(cases) == before and not PathManager.ls(child):
                    ignored.append(child)
            else:
                ignored.append(child)
        elif entry.lower().endswith(_NIFTI_EXT):
            cases.append(CaseSource(_strip_nifti_ext(entry), child, "nifti"))
        else:
            ignored.append(child)


# ---------------------------------------------------------------------------------- context
def context_slices_needed(offsets_mm: Sequence[float], slice_interval: float) -> int:
    """Fewest slices a series needs so that one key slice has every neighbour of the context
    (neighbours interpolated between the two nearest slices): 2 * ceil(max|offset| / interval) + 1."""
    reach = max(abs(o) for o in offsets_mm) / slice_interval
    return 2 * int(math.ceil(reach - 1e-6)) + 1


def check_context(volume: CTVolume, offsets_mm: Sequence[float]) -> None:
    """Raise CTInputError when the series is shorter than the slice context needs (a series at
    least that long still lets its edge slices fall back toward the key slice, as in training)."""
    first, last = volume.series_range or (min(volume.slice_numbers), max(volume.slice_numbers))
    have = last - first + 1
    need = context_slices_needed(offsets_mm, volume.slice_interval)
    if have < need:
        span = max(abs(o) for o in offsets_mm)
        raise CTInputError(
            f"{volume.source}: {have} slice(s) at {volume.slice_interval:g} mm; the {len(offsets_mm)}-slice "
            f"context (key +- {span:g} mm) needs at least {need}"
        )


# ---------------------------------------------------------------------------------- readers
def read_case(case: CaseSource, spacing: Optional[float] = None, slice_interval: Optional[float] = None,
              context_mm: float = 2.0) -> CTVolume:
    """Read one discovered case. ``spacing`` / ``slice_interval`` override what a DeepLesion folder
    gets from DL_info.csv (NIfTI and DICOM carry their own)."""
    if case.kind == "deeplesion":
        return read_png_series(case.path, case.name, key_slice=case.key_slice, spacing=spacing,
                               slice_interval=slice_interval, context_mm=context_mm)
    if case.kind == "nifti":
        return read_nifti(case.path, case.name)
    if case.kind == "dicom":
        return read_dicom_series(case.path, case.name)
    raise ValueError(f"unknown case kind {case.kind!r} for {case.path}")


@functools.lru_cache(maxsize=4)
def _dl_info_spacing(csv_path: str) -> Dict[str, Tuple[float, float]]:
    from ..data.deeplesion import read_dl_info

    out: Dict[str, Tuple[float, float]] = {}
    for les in read_dl_info(csv_path):
        out.setdefault(les["series_dir"], (les["spacing"][0], les["spacing"][2]))
    return out


def deeplesion_spacing(folder: str) -> Optional[Tuple[float, float]]:
    """(pixel spacing, slice interval) of a DeepLesion series folder from the DL_info.csv of its
    dataset root (``<root>/Images_png/<series>``), or None when there is no such row."""
    series = os.path.basename(os.path.abspath(folder))
    parent = os.path.dirname(os.path.abspath(folder))
    for root in (os.path.dirname(parent), parent):
        csv_path = os.path.join(root, "DL_info.csv")
        if PathManager.exists(csv_path):
            found = _dl_info_spacing(csv_path).get(series)
            if found is not None:
                return found
    return None


def read_png_series(folder: str, name: str, key_slice: Optional[int] = None, spacing: Optional[float] = None,
                    slice_interval: Optional[float] = None, context_mm: float = 2.0) -> CTVolume:
    """A DeepLesion-format slice folder as a volume; with ``key_slice`` only the slices within
    ``context_mm`` (+ one) of it are read. Spacing: arguments, else DL_info.csv, else an error."""
    numbers = _png_numbers(folder)
    if not numbers:
        raise CTInputError(f"{folder}: no <number>.png slices")
    if key_slice is not None and key_slice not in numbers:
        raise CTInputError(f"{folder}/{key_slice:03d}.png: no such key slice")
    if spacing is None or slice_interval is None:
        found = deeplesion_spacing(folder)
        if found is None:
            raise CTInputError(
                f"{folder}: missing spacing (no DL_info.csv row for series {os.path.basename(os.path.abspath(folder))!r} "
                f"in the dataset root); pass --spacing MM and --slice-intv MM"
            )
        spacing = spacing if spacing is not None else found[0]
        slice_interval = slice_interval if slice_interval is not None else found[1]
    _check_positive(folder, spacing, slice_interval)
    if len(numbers) < 2:
        raise CTInputError(f"{folder}: a single slice is a 2-D image; inference needs the neighbouring slices")
    wanted = sorted(numbers)
    if key_slice is not None:
        reach = int(math.ceil(context_mm / slice_interval - 1e-6)) + 1
        wanted = [n for n in wanted if abs(n - key_slice) <= reach]
    slices = [read_hu_slice(numbers[n]) for n in wanted]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise CTSliceError(f"{folder}: slices differ in size {sorted(shapes)}")
    return CTVolume(
        name=name, source=folder if key_slice is None else numbers[key_slice], kind="deeplesion",
        hu=np.stack(slices), slice_numbers=wanted, spacing=(float(spacing), float(spacing)),
        slice_interval=float(slice_interval), key_slices=None if key_slice is None else [key_slice],
        series_range=(min(numbers), max(numbers)),
    )


def _check_positive(where: str, spacing, slice_interval) -> None:
    for what, v in (("pixel spacing", spacing), ("slice interval", slice_interval)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise CTInputError(f"{where}: {what} must be a positive number of mm, got {v!r}")


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as e:  # listed in install_requires; say so rather than fail obscurely
        raise ImportError("NIfTI / DICOM input needs SimpleITK (pip install SimpleITK)") from e
    return sitk


def _oriented_volume(img, source: str, name: str, kind: str) -> CTVolume:
    """LPS-reoriented SimpleITK image -> CTVolume (HU float32)."""
    sitk = _sitk()
    img = sitk.DICOMOrient(img, "LPS")
    sx, sy, sz = img.GetSpacing()
    _check_positive(source, min(sx, sy), sz)
    hu = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    return CTVolume(
        name=name, source=source, kind=kind, hu=hu, slice_numbers=list(range(hu.shape[0])),
        spacing=(float(sx), float(sy)), slice_interval=float(sz),
        origin=tuple(float(v) for v in img.GetOrigin()),
        direction=np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3),
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


def read_nifti(path: str, name: str) -> CTVolume:
    """A NIfTI CT volume in HU; 2-D, 4-D, multi-component (RGB) or non-HU images are refused,
    as is a header without spacing (pixdim 0)."""
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
        raise CTInputError(f"{path}: not a CT volume ({reader.GetNumberOfComponents()} components per voxel, e.g. RGB)")
    if reader.GetDimension() == 2 or (reader.GetDimension() == 3 and min(size) == 1):
        raise CTInputError(f"{path}: a 2-D image (size {size}); inference needs a 3-D CT volume")
    if reader.GetDimension() != 3:
        raise CTInputError(f"{path}: {reader.GetDimension()}-D image; expected a 3-D CT volume")
    pixdim = nifti_pixdim(path)
    if pixdim is not None and not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise CTInputError(f"{path}: missing spacing (NIfTI pixdim[1:4] = {tuple(float(v) for v in pixdim)})")
    truncated = nifti_truncation(path)  # SimpleITK zero-fills what a cut-off file lacks
    if truncated:
        raise CTInputError(f"{path}: unreadable NIfTI file ({truncated})")
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise CTInputError(f"{path}: unreadable NIfTI file ({_first_line(e)})") from None
    vol = _oriented_volume(img, path, name, "nifti")
    if vol.hu.size and float(vol.hu.min()) >= 0.0:
        raise CTInputError(
            f"{path}: not a CT volume in Hounsfield units (no value below 0 HU, where a body CT has air "
            f"and fat; range {float(vol.hu.min()):g}..{float(vol.hu.max()):g}): an MR / PET image, a mask, "
            f"or HU stored with an offset?"
        )
    return vol


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _header(sitk, path: str, folder: str) -> Dict[str, str]:
    """Only the tags inference needs (geometry, modality): nothing that identifies the patient."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CTInputError(f"{folder}: unreadable DICOM file {os.path.basename(path)} ({_first_line(e)})") from None
    tags = {"modality": "0008|0060", "position": "0020|0032", "orientation": "0020|0037", "spacing": "0028|0030"}
    return {k: reader.GetMetaData(t).strip() for k, t in tags.items() if reader.HasMetaDataKey(t)}


def _numbers(text: str, n: int, what: str, where: str) -> np.ndarray:
    try:
        vals = [float(v) for v in text.replace(" ", "").split("\\") if v != ""]
    except ValueError:
        vals = []
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        raise CTInputError(f"{where}: malformed {what} {text!r}")
    return np.asarray(vals)


def read_dicom_series(folder: str, name: str) -> CTVolume:
    """A DICOM CT series folder in HU (one series per folder; modality CT; PixelSpacing and
    evenly spaced ImagePositionPatient on every slice)."""
    sitk = _sitk()
    local = PathManager.get_local_path(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(local)
    if not ids:
        raise CTInputError(f"{folder}: no readable DICOM series")
    if len(ids) > 1:
        raise CTInputError(f"{folder}: {len(ids)} DICOM series in one folder; put each series in its own folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(local, ids[0]))
    if len(files) < 2:
        raise CTInputError(f"{folder}: a single DICOM slice is a 2-D image; inference needs a series")
    headers = [_header(sitk, f, folder) for f in files]
    modalities = {h.get("modality", "") for h in headers}
    if modalities != {"CT"}:
        shown = sorted(m or "<missing>" for m in modalities)
        raise CTInputError(f"{folder}: not a CT series (Modality {', '.join(shown)})")
    for f, h in zip(files, headers):
        for key, tag in (("spacing", "PixelSpacing 0028|0030"), ("position", "ImagePositionPatient 0020|0032")):
            if key not in h:
                raise CTInputError(f"{folder}: missing spacing ({tag} absent from {os.path.basename(f)})")
    iop = _numbers(headers[0].get("orientation", "1\\0\\0\\0\\1\\0"), 6, "ImageOrientationPatient", folder)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([_numbers(h["position"], 3, "ImagePositionPatient", folder) @ normal for h in headers])
    gaps = np.diff(np.sort(pos))
    step = float(np.median(gaps))
    if step <= 0 or np.any(np.abs(gaps - step) > _SPACING_RTOL * step + _SPACING_ATOL_MM):
        shown = ", ".join(f"{g:.3g}" for g in gaps[:8]) + (" ..." if len(gaps) > 8 else "")
        raise CTInputError(f"{folder}: inconsistent slice spacing (gaps between slice positions: {shown} mm)")
    pixel = {tuple(_numbers(h["spacing"], 2, "PixelSpacing", folder)) for h in headers}
    if len(pixel) != 1:
        raise CTInputError(f"{folder}: PixelSpacing differs between slices {sorted(pixel)}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise CTInputError(f"{folder}: unreadable DICOM series ({_first_line(e)})") from None
    # GDCM derives the series' z spacing from the same positions; ours was checked above.
    img.SetSpacing(tuple(img.GetSpacing()[:2]) + (step,))
    return _oriented_volume(img, folder, name, "dicom")
