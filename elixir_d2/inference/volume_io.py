"""Read CT inputs for inference into HU volumes, with validation that names the input at fault.

Supported inputs (found by :func:`.discovery.discover_cases`):

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

Case names come from file and folder names (:mod:`.case_ids` makes them safe and unique). Sizes
are checked on headers against a voxel cap (:data:`.orientation.DEFAULT_MAX_VOXELS`) before any
volume is allocated. The NIfTI and DICOM readers live in :mod:`.nifti_io` and :mod:`.dicom_io`.
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

from ..data.ct_mapper import png_size, read_hu_slice
from .case_ids import unique_case_ids
from .orientation import DEFAULT_MAX_VOXELS, check_voxel_cap

logger = logging.getLogger(__name__)

__all__ = [
    "CTInputError",
    "CTVolume",
    "CaseSource",
    "single_file_case",
    "read_case",
    "read_png_series",
    "read_nifti",
    "read_dicom_series",
    "context_slices_needed",
    "check_context",
]

_PNG_SLICE = re.compile(r"^(\d+)\.png$")
_NIFTI_EXT = (".nii.gz", ".nii")
_DICOM_EXT = (".dcm", ".dicom", ".ima")
# Even-spacing tolerance of DICOM slice positions: scanners write positions rounded to ~1e-3 mm.
_SPACING_RTOL, _SPACING_ATOL_MM = 0.01, 0.01
_MAX_DEPTH = 4
# Plausible CT geometry. Spacing: 0.05 mm (micro-CT) to 50 mm (a coarse scout); slices below
# 16 px a side hold no anatomy (CT slices are 512 px; 16 keeps small synthetic test series).
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 50.0
MIN_SLICE_SIDE = 16


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
    # DICOM: the series' files (paths only; --dicom-sr reads their headers, nothing else does)
    series_files: Optional[List[str]] = None
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

    def physical_point(
        self, x: float, y: float, number: int
    ) -> Optional[Tuple[float, float, float]]:
        """LPS position (mm) of continuous pixel coordinate (x, y) on slice ``number``
        (pixel i spans [i, i + 1), so its centre is voxel index i); None without geometry."""
        if self.origin is None or self.direction is None:
            return None
        idx = np.array(
            [(x - 0.5) * self.spacing[0], (y - 0.5) * self.spacing[1], number * self.slice_interval]
        )
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


def single_file_case(path: str) -> Tuple[List[CaseSource], List[str]]:
    """The case of ``path`` when it is one file the user named (a NIfTI volume or a DeepLesion key
    slice), as ``([case], [])``; folders are walked by :func:`.discovery.discover_cases`.

    Raises:
        CTInputError: ``path`` does not exist or is a file of an unsupported type.
    """
    path = os.path.normpath(path)
    if not PathManager.exists(path):
        raise CTInputError(f"{path}: no such file or folder")
    base = os.path.basename(path)
    low = base.lower()
    if low.endswith(_NIFTI_EXT):
        return [CaseSource(unique_case_ids([_strip_nifti_ext(base)])[0], path, "nifti")], []
    m = _PNG_SLICE.match(base)
    if m:
        folder = os.path.dirname(path) or "."
        name = unique_case_ids([os.path.basename(os.path.abspath(folder))])[0]
        return [CaseSource(name, folder, "deeplesion", int(m.group(1)))], []
    if low.endswith(".png"):
        raise CTInputError(
            f"{path}: a DeepLesion key slice must be named <number>.png inside its series folder"
        )
    if _is_dicom_file(path):
        raise CTInputError(
            f"{path}: a single DICOM file is a 2-D image; pass the folder of its series"
        )
    raise CTInputError(
        f"{path}: unsupported input (expected a DeepLesion slice folder or .png "
        "key slice, a .nii / .nii.gz volume, a DICOM series folder, or a folder "
        "of these)"
    )


# ---------------------------------------------------------------------------------- context
def context_slices_needed(offsets_mm: Sequence[float], slice_interval: float) -> int:
    """Fewest slices a series needs so that one key slice has every neighbour of the context
    (neighbours interpolated between the two nearest slices):
    2 * ceil(max|offset| / interval) + 1."""
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
            f"{volume.source}: {have} slice(s) at {volume.slice_interval:g} mm; the "
            f"{len(offsets_mm)}-slice context (key +- {span:g} mm) needs at least {need}"
        )


# ---------------------------------------------------------------------------------- readers
def read_case(
    case: CaseSource,
    spacing: Optional[float] = None,
    slice_interval: Optional[float] = None,
    context_mm: float = 2.0,
    max_voxels: Optional[int] = DEFAULT_MAX_VOXELS,
) -> CTVolume:
    """Read one discovered case. ``spacing`` / ``slice_interval`` override what a DeepLesion folder
    gets from DL_info.csv (NIfTI and DICOM carry their own); a case of more than ``max_voxels``
    voxels (None: no cap) is refused from its header."""
    if case.kind == "deeplesion":
        return read_png_series(
            case.path,
            case.name,
            key_slice=case.key_slice,
            spacing=spacing,
            slice_interval=slice_interval,
            context_mm=context_mm,
            max_voxels=max_voxels,
        )
    if case.kind == "nifti":
        return read_nifti(case.path, case.name, max_voxels)
    if case.kind == "dicom":
        return read_dicom_series(case.path, case.name, max_voxels)
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


def read_png_series(
    folder: str,
    name: str,
    key_slice: Optional[int] = None,
    spacing: Optional[float] = None,
    slice_interval: Optional[float] = None,
    context_mm: float = 2.0,
    max_voxels: Optional[int] = DEFAULT_MAX_VOXELS,
) -> CTVolume:
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
                f"{folder}: missing spacing (no DL_info.csv row for series "
                f"{os.path.basename(os.path.abspath(folder))!r} in the dataset root); pass "
                "--spacing MM and --slice-intv MM"
            )
        spacing = spacing if spacing is not None else found[0]
        slice_interval = slice_interval if slice_interval is not None else found[1]
    check_spacing(folder, spacing, slice_interval)
    if len(numbers) < 2:
        raise CTInputError(
            f"{folder}: a single slice is a 2-D image; inference needs the neighbouring slices"
        )
    wanted = sorted(numbers)
    if key_slice is not None:
        reach = int(math.ceil(context_mm / slice_interval - 1e-6)) + 1
        wanted = [n for n in wanted if abs(n - key_slice) <= reach]
    # Every slice's IHDR is checked before any is decoded: the cap counts the real sizes.
    first = numbers[wanted[0]]
    h, w = png_size(first)
    check_slice_side(first, w, h)
    for n in wanted[1:]:
        hn, wn = png_size(numbers[n])
        if (hn, wn) != (h, w):
            raise CTInputError(
                f"{numbers[n]}: {wn} x {hn} px, where {os.path.basename(first)} is "
                f"{w} x {h}; the slices of a series share one size"
            )
    check_voxel_cap(folder, (w, h, len(wanted)), max_voxels, CTInputError)
    slices = [read_hu_slice(numbers[n]) for n in wanted]
    return CTVolume(
        name=name,
        source=folder if key_slice is None else numbers[key_slice],
        kind="deeplesion",
        hu=np.stack(slices),
        slice_numbers=wanted,
        spacing=(float(spacing), float(spacing)),
        slice_interval=float(slice_interval),
        key_slices=None if key_slice is None else [key_slice],
        series_range=(min(numbers), max(numbers)),
    )


def check_mm(where: str, what: str, v) -> None:
    """A spacing must be a number of mm within [MIN_SPACING_MM, MAX_SPACING_MM]: a pixdim of
    1e30 is a broken header, not a scan."""
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise CTInputError(f"{where}: {what} must be a positive number of mm, got {v!r}")
    if not MIN_SPACING_MM <= v <= MAX_SPACING_MM:
        raise CTInputError(
            f"{where}: {what} {float(v):g} mm is outside the plausible "
            f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm of a CT"
        )


def check_spacing(where: str, spacing, slice_interval) -> None:
    """:func:`check_mm` on the pixel spacing (one number, or one per in-plane axis) and the
    slice interval."""
    for v in spacing if isinstance(spacing, (tuple, list)) else (spacing,):
        check_mm(where, "pixel spacing", v)
    check_mm(where, "slice interval", slice_interval)


def check_slice_side(where: str, width: int, height: int) -> None:
    """Refuse slices smaller than MIN_SLICE_SIDE a side (a 1 x 1 PNG, a 2-px-wide scout)."""
    if min(width, height) < MIN_SLICE_SIDE:
        raise CTInputError(
            f"{where}: {width} x {height} px slices; a CT slice needs at least "
            f"{MIN_SLICE_SIDE} px a side"
        )


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as e:  # listed in install_requires; say so rather than fail obscurely
        raise ImportError("NIfTI / DICOM input needs SimpleITK (pip install SimpleITK)") from e
    return sitk


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# The readers build on the classes above; imported last so `volume_io` keeps offering them.
from .dicom_io import read_dicom_series  # noqa: E402
from .nifti_io import nifti_pixdim, read_nifti  # noqa: E402,F401  (re-exported)
