"""Truncated NIfTI files and NaN voxels: SimpleITK reads a cut-off .nii / .nii.gz without complaint
and fills the missing voxels with zeros, and its NIfTI reader turns NaN / infinite float voxels
into 0, so the readers (kits19.read_nifti_image, inference.volume_io.read_nifti) check the voxel
data against the header, and count non-finite voxels, in the file itself first."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from typing import NamedTuple, Optional, Tuple

import numpy as np

from detectron2.utils.file_io import PathManager

__all__ = ["nifti_truncation", "nifti_scan"]

_CHUNK = 1 << 22


# NIfTI datatype codes of float voxels, the only ones that can hold NaN / inf (complex types have
# two components and are refused by the readers before their values matter).
_FLOAT_TYPES = {16: "f4", 64: "f8"}


class _Layout(NamedTuple):
    start: int  # vox_offset
    end: int  # vox_offset + voxel bytes
    dtype: Optional[np.dtype]  # of float voxels; None for any other type
    voxels: int


def _layout(hdr: bytes) -> Optional[_Layout]:
    """Where a single-file NIfTI-1 / NIfTI-2 header puts its voxels; None if not one."""
    for endian in "<>":
        if len(hdr) >= 348 and struct.unpack(endian + "i", hdr[:4])[0] == 348:
            if hdr[344:347] != b"n+1":  # .hdr/.img pair: the voxels are in another file
                return None
            dims = struct.unpack(endian + "8h", hdr[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", hdr[70:74])
            offset = struct.unpack(endian + "f", hdr[108:112])[0]
        elif len(hdr) >= 540 and struct.unpack(endian + "i", hdr[:4])[0] == 540:
            if hdr[4:7] != b"n+2":
                return None
            dims = struct.unpack(endian + "8q", hdr[16:80])
            datatype, bitpix = struct.unpack(endian + "2h", hdr[12:16])
            offset = struct.unpack(endian + "q", hdr[168:176])[0]
        else:
            continue
        ndim = dims[0]
        if not 1 <= ndim <= 7 or bitpix <= 0 or not math.isfinite(offset) or offset < 0:
            return None  # a header this broken is left to SimpleITK's own error
        voxels = math.prod(max(int(d), 0) for d in dims[1 : ndim + 1])
        kind = _FLOAT_TYPES.get(datatype)
        dtype = np.dtype(endian + kind) if kind and np.dtype(kind).itemsize * 8 == bitpix else None
        return _Layout(int(offset), int(offset) + voxels * bitpix // 8, dtype, voxels)
    return None


class _NonFinite:
    """Counts NaN / inf among float voxels fed as consecutive chunks of the file's bytes."""

    def __init__(self, start: int, end: int, dtype: np.dtype):
        self.start, self.end, self.dtype = start, end, dtype
        self.pos, self.carry, self.count = 0, b"", 0

    def feed(self, chunk: bytes) -> None:
        lo, hi = max(self.start - self.pos, 0), min(self.end - self.pos, len(chunk))
        self.pos += len(chunk)
        if lo >= hi:
            return
        data = self.carry + chunk[lo:hi]
        whole = len(data) - len(data) % self.dtype.itemsize  # a voxel may straddle two chunks
        self.carry = data[whole:]
        values = np.frombuffer(data[:whole], dtype=self.dtype)
        self.count += int(values.size - np.count_nonzero(np.isfinite(values)))


def nifti_truncation(path: str) -> Optional[str]:
    """Why ``path`` (a .nii or .nii.gz) holds less than its header declares, or None if complete
    (or not a single-file NIfTI this check understands). A .nii.gz is decompressed to count."""
    return nifti_scan(path, count_non_finite=False)[0]


class _Scan:
    """What one pass over a NIfTI file's bytes has seen: the header, its voxel layout, the bytes
    present and (for float voxels, when asked) the non-finite count."""

    def __init__(self, count_non_finite: bool):
        self.count_non_finite = count_non_finite
        self.hdr, self.layout, self.counter, self.present = b"", None, None, 0

    def take(self, chunk: bytes) -> None:
        if len(self.hdr) < 540:
            self.hdr += chunk[: 540 - len(self.hdr)]
            self.layout = _layout(self.hdr)
            if (
                self.count_non_finite
                and self.counter is None
                and self.layout is not None
                and self.layout.dtype
            ):
                self.counter = _NonFinite(self.layout.start, self.layout.end, self.layout.dtype)
        if self.counter is not None:
            self.counter.feed(chunk)
        self.present += len(chunk)

    @property
    def complete(self) -> bool:
        return self.layout is not None and self.present >= self.layout.end


def _read(f, scan: _Scan, gzipped: bool) -> None:
    """Feed ``f`` to ``scan`` until the declared voxels are all there or the file ends."""
    while True:
        chunk = f.read(_CHUNK if scan.hdr else 540)  # the header alone first
        if not chunk:
            return
        scan.take(chunk)
        if scan.complete:
            return  # all declared voxels are there; whatever follows is never read
        if not gzipped and scan.counter is None and len(scan.hdr) >= 540:
            f.seek(0, 2)  # nothing to count: the file's size says enough
            scan.present = f.tell()
            return


def nifti_scan(path: str, count_non_finite: bool = True) -> Tuple[Optional[str], int, int]:
    """(why ``path`` is truncated or None, its NaN / infinite voxels, its voxels) in one pass over
    the file: float voxels are read to count, integer ones never (they cannot be NaN); a .nii.gz
    is decompressed. Counts are 0 for a file this check does not understand."""
    local = PathManager.get_local_path(path)
    with open(local, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    scan = _Scan(count_non_finite)
    try:
        with gzip.open(local, "rb") if gzipped else open(local, "rb") as f:
            _read(f, scan, gzipped)
    except EOFError:
        return "the gzip stream ends before its end marker (truncated file)", 0, 0
    except (OSError, zlib.error) as e:
        if not gzipped:
            raise
        return f"corrupt gzip stream ({e})", 0, 0
    layout = scan.layout if scan.layout is not None else _layout(scan.hdr)
    if layout is not None and scan.present < layout.end:
        return (
            (
                f"{scan.present} bytes of header and voxels where the header declares "
                f"{layout.end} (truncated file)"
            ),
            0,
            0,
        )
    return (
        None,
        scan.counter.count if scan.counter is not None else 0,
        layout.voxels if layout is not None else 0,
    )
