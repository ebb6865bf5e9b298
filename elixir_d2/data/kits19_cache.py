"""KiTS19 slice cache: every case's slices as 16-bit PNG (HU + 32768) + records.json, so training
never decodes NIfTI (see :mod:`elixir_d2.data.kits19`)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from detectron2.utils.file_io import PathManager

from ..atomic_io import atomic_write_json, build_dir_atomically, file_lock, remove_stale_tmp
from .ct_mapper import hu_to_png16
from .kits19 import (
    CACHE_VERSION,
    RECORDS_FILE,
    TUMOR_LABEL,
    _slice_records,
    find_cases,
    read_kits19_case,
    split_cases,
)

logger = logging.getLogger("elixir_d2.data.kits19")

__all__ = ["prepare_kits19", "main"]

_HASH_BYTES = 1 << 20


def _write_png16(hu_slice: np.ndarray, path: str) -> int:
    """Write a slice as 16-bit PNG (HU + 32768); returns the file's size."""
    arr = hu_to_png16(hu_slice)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    with PathManager.open(path, "wb") as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


def _fingerprint(path: str) -> List:
    """Size, mtime in ns and a hash of the first and last MiB: a rewritten NIfTI of the same size
    within the same second still differs."""
    local = PathManager.get_local_path(path)
    st = os.stat(local)
    h = hashlib.sha256()
    with open(local, "rb") as f:
        h.update(f.read(_HASH_BYTES))
        if st.st_size > 2 * _HASH_BYTES:
            f.seek(-_HASH_BYTES, os.SEEK_END)
            h.update(f.read(_HASH_BYTES))
    return [st.st_size, st.st_mtime_ns, h.hexdigest()]


def _source_stamp(case_dir: str, params: Dict) -> Dict:
    stamp = dict(params)
    for f in ("imaging.nii.gz", "segmentation.nii.gz"):
        stamp[f] = _fingerprint(os.path.join(case_dir, f))
    return stamp


def _cached_records(out_dir: str, stamp: Dict) -> Optional[List[Dict]]:
    """The records of a complete case cache made from the same files and options, else None:
    case.json must parse, match ``stamp``, and every PNG it lists must be there at its size."""
    try:
        with open(os.path.join(out_dir, "case.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("stamp") != stamp:
            return None
        for name, size in meta["pngs"].items():
            if os.path.getsize(os.path.join(out_dir, name)) != size:
                return None
        return meta["records"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _prepare_case(
    case_dir: str, cache_dir: str, slice_axis, margin_mm: Optional[float]
) -> Tuple[List[Dict], bool]:
    """Cache one case's slices + its records (relative to ``cache_dir``); reuse a matching cache.

    The case is written into a temporary folder with case.json (the completion marker: source
    fingerprints, options, PNG sizes, records) last, then renamed into place.
    """
    name = os.path.basename(os.path.normpath(case_dir))
    out_dir = os.path.join(cache_dir, name)
    stamp = _source_stamp(
        case_dir, {"version": CACHE_VERSION, "slice_axis": slice_axis, "margin_mm": margin_mm}
    )
    records = _cached_records(out_dir, stamp)
    if records is not None:
        return records, False
    case = read_kits19_case(case_dir, slice_axis)
    n = case["seg"].shape[0]
    first, last = 0, n - 1
    if margin_mm is not None:
        tumour_z = np.nonzero((case["seg"] == TUMOR_LABEL).any(axis=(1, 2)))[0]
        if tumour_z.size == 0:
            first, last = 0, -1
        else:
            pad = int(np.ceil(margin_mm / case["slice_intv"]))
            first, last = max(0, int(tumour_z.min()) - pad), min(n - 1, int(tumour_z.max()) + pad)

    def build(tmp: str) -> Dict:
        pngs = {}
        for z in range(first, last + 1):
            pngs[f"{z:03d}.png"] = _write_png16(case["image"][z], os.path.join(tmp, f"{z:03d}.png"))
        recs = _slice_records(case, name, lambda z: f"{name}/{z:03d}.png", (first, last))
        for r in recs:  # JSON-friendly: BoxMode as its int value
            for a in r["annotations"]:
                a["bbox_mode"] = int(a["bbox_mode"])
        atomic_write_json(
            os.path.join(tmp, "case.json"),
            {
                "stamp": stamp,
                "slice_axis": case["slice_axis"],
                "num_slices": n,
                "pngs": pngs,
                "records": recs,
            },
        )
        return {"records": recs}

    records = build_dir_atomically(out_dir, build, None)["records"]  # case.json is the marker
    logger.info(
        f"KiTS19 {name}: cached slices {first}..{last} of {n}, {len(records)} tumour slices"
    )
    return records, True


def prepare_kits19(
    root: str,
    cache_dir: str,
    slice_axis: Union[str, int] = "auto",
    margin_mm: Optional[float] = None,
) -> Dict:
    """Cache every case under ``root`` into ``cache_dir`` (PNG slices + records.json); idempotent.

    ``margin_mm`` caches only slices within that distance of the case's tumour slices (default:
    every slice). A case whose complete cache matches its NIfTI files (size, mtime in ns, a hash of
    their ends), the options, and whose PNGs are all there at their recorded sizes is not re-read.
    Every file is written under a temporary name and renamed; concurrent runs take turns (lock).
    Returns a summary: cases, cases re-read, tumour slices, boxes, cases without tumour.
    """
    cases = find_cases(root)
    PathManager.mkdirs(cache_dir)
    all_records, names, decoded, no_tumour = [], [], 0, []
    # One preparing process per cache at a time; a second one then finds the cases done.
    with file_lock(os.path.join(cache_dir, ".prepare.lock")):
        for case_dir in cases:
            case_name = os.path.basename(os.path.normpath(case_dir))
            remove_stale_tmp(cache_dir, case_name)
            records, did = _prepare_case(case_dir, cache_dir, slice_axis, margin_mm)
            decoded += int(did)
            names.append(case_name)
            if not records:
                no_tumour.append(names[-1])
            all_records.extend(records)
        atomic_write_json(
            os.path.join(cache_dir, RECORDS_FILE),
            {"version": CACHE_VERSION, "source": root, "cases": names, "records": all_records},
        )
    if no_tumour:
        logger.warning(f"KiTS19: {len(no_tumour)} case(s) without tumour (no records): {no_tumour}")
    return {
        "cases": len(names),
        "decoded": decoded,
        "tumour_slices": len(all_records),
        "boxes": sum(len(r["annotations"]) for r in all_records),
        "cases_without_tumour": no_tumour,
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description="Cache KiTS19 slices as 16-bit PNG + records.json")
    parser.add_argument(
        "--root",
        default=None,
        help="KiTS19 root holding data/case_XXXXX/ (default: $DETECTRON2_DATASETS/kits19)",
    )
    parser.add_argument("--cache", default=None, help="cache folder (default: <root>/cache)")
    parser.add_argument(
        "--slice-axis", default="auto", help="voxel axis of the slices: auto, 0, 1 or 2"
    )
    parser.add_argument(
        "--margin-mm",
        type=float,
        default=None,
        help="cache only slices within this distance of tumour slices (default: all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    axis = args.slice_axis if args.slice_axis == "auto" else int(args.slice_axis)
    if args.root is None:
        from . import datasets_root

        args.root = os.path.join(datasets_root(), "kits19")
    cache = args.cache or os.path.join(args.root, "cache")
    summary = prepare_kits19(args.root, cache, slice_axis=axis, margin_mm=args.margin_mm)
    with PathManager.open(os.path.join(cache, RECORDS_FILE), "r", encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    train, test = split_cases(cases)
    summary.update({"cache": cache, "train_cases": len(train), "test_cases": len(test)})
    print(json.dumps(summary, indent=1))
    return summary
