"""Truncated NIfTI files: SimpleITK reads a cut-off .nii / .nii.gz without complaint and fills
the missing voxels with zeros, so the readers (kits19.read_nifti_image,
inference.volume_io.read_nifti) check the voxel data against the header first."""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from typing import Optional

from detectron2.utils.file_io import PathManager

__all__ = ["nifti_truncation"]

_CHUNK = 1 << 22


def _expected_bytes(hdr: bytes) -> Optional[int]:
    """vox_offset + voxel bytes of a single-file NIfTI-1 / NIfTI-2 header; None if not one."""
    for endian in "<>":
        if len(hdr) >= 348 and struct.unpack(endian + "i", hdr[:4])[0] == 348:
            if hdr[344:347] != b"n+1":  # .hdr/.img pair: the voxels are in another file
                return None
            dims = struct.unpack(endian + "8h", hdr[40:56])
            bitpix = struct.unpack(endian + "h", hdr[72:74])[0]
            offset = struct.unpack(endian + "f", hdr[108:112])[0]
        elif len(hdr) >= 540 and struct.unpack(endian + "i", hdr[:4])[0] == 540:
            if hdr[4:7] != b"n+2":
                return None
            dims = struct.unpack(endian + "8q", hdr[16:80])
            bitpix = struct.unpack(endian + "h", hdr[14:16])[0]
            offset = struct.unpack(endian + "q", hdr[168:176])[0]
        else:
            continue
        ndim = dims[0]
        if not 1 <= ndim <= 7 or bitpix <= 0 or not math.isfinite(offset) or offset < 0:
            return None  # a header this broken is left to SimpleITK's own error
        return int(offset) + math.prod(max(int(d), 0) for d in dims[1 : ndim + 1]) * bitpix // 8
    return None


def nifti_truncation(path: str) -> Optional[str]:
    """Why ``path`` (a .nii or .nii.gz) holds less than its header declares, or None if complete
    (or not a single-file NIfTI this check understands). A .nii.gz is decompressed to count."""
    local = PathManager.get_local_path(path)
    with open(local, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        with open(local, "rb") as f:
            hdr = f.read(540)
            f.seek(0, 2)
            present = f.tell()
        expected = _expected_bytes(hdr)
    else:
        present, hdr, expected = 0, b"", None
        try:
            with gzip.open(local, "rb") as f:
                while True:
                    chunk = f.read(_CHUNK)
                    if not chunk:
                        break
                    if len(hdr) < 540:
                        hdr += chunk[: 540 - len(hdr)]
                        expected = _expected_bytes(hdr)
                    present += len(chunk)
                    if expected is not None and present >= expected:
                        break  # all declared voxels are there; whatever follows is never read
        except EOFError:
            return "the gzip stream ends before its end marker (truncated file)"
        except (OSError, zlib.error) as e:
            return f"corrupt gzip stream ({e})"
        expected = expected if expected is not None else _expected_bytes(hdr)
    if expected is not None and present < expected:
        return (f"{present} bytes of header and voxels where the header declares {expected} "
                "(truncated file)")
    return None
