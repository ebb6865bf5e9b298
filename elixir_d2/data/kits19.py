"""KiTS19: NIfTI cases -> one record per tumour slice, a PNG slice cache, the 80/20 patient split.

Layout (docs/design.md, Data conventions):
``<root>/data/case_XXXXX/{imaging,segmentation}.nii.gz`` (``<root>/case_XXXXX`` also accepted);
segmentation 0 background, 1 kidney, 2 tumour. Boxes are the connected components
(8-connectivity) of the tumour label on each axial slice: x1 = min column, x2 = max column + 1,
likewise y. ``prepare_kits19`` caches every slice as a DeepLesion-style 16-bit PNG (HU + 32768) plus
``records.json`` so training never decodes NIfTI.

Slice axis. The real KiTS19 files store slices on the NIfTI's first voxel axis (nibabel's axis 0),
which SimpleITK's numpy view puts last; a conventionally written CT (and the synthetic variant)
has them on the third voxel axis, SimpleITK's numpy axis 0. ``slice_axis="auto"`` takes the voxel
axis whose spacing differs from the two equal in-plane spacings (CT pixels are square), else the
axis the direction matrix points most along the body (z).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..union_find import UnionFind
from .nifti_check import nifti_truncation

logger = logging.getLogger(__name__)

KIDNEY_LABEL, TUMOR_LABEL = 1, 2
KIDNEY_HU_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window (W400 / L40), for display
CASE_RE = re.compile(r"^case_(\d+)$")
RECORDS_FILE = "records.json"
CACHE_VERSION = 2  # 2: case.json lists its PNGs; source fingerprints in ns + hash
# (slice, row, col) as SimpleITK voxel axes, per slice axis; SimpleITK's numpy axis = 2 - voxel
# axis. Slices on axis 0 (KiTS19) give nibabel's view (as KiTS19's own tools), on axis 2 the usual
# one.
_VIEW = {0: (0, 1, 2), 1: (1, 2, 0), 2: (2, 1, 0)}


class KiTS19Error(ValueError):
    """A KiTS19 case that cannot be used; the message names the case and file."""


# ----------------------------------------------------------------------------- components
def _runs(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True as (row, start, end) arrays, end exclusive, in raster order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    starts = np.argwhere(diff == 1)  # row-major order pairs starts and ends run by run
    ends = np.argwhere(diff == -1)
    return starts[:, 0], starts[:, 1], ends[:, 1]


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """Label 8-connected components of a 2-D boolean mask (scipy is not a dependency).

    Runs of each row are merged with overlapping-or-diagonal runs of the row above through a
    union-find; labels 1..n are numbered in raster order of each component's first pixel.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"label_components expects a 2-D mask, got shape {mask.shape}")
    rows, starts, ends = _runs(mask)
    runs = UnionFind(len(rows))
    # Runs of row r - 1 touch a run [s, e) of row r (8-connectivity) when they overlap
    # [s - 1, e + 1).
    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for i in range(len(rows)):
        r = rows[i]
        if r == 0:
            continue
        j0, j1 = row_first[r - 1], row_first[r]
        for j in range(j0, j1):
            if starts[j] <= ends[i] and starts[i] <= ends[j]:
                runs.union(i, j)
    labels = np.zeros(mask.shape, dtype=np.int32)
    ids: Dict[int, int] = {}
    for i in range(len(rows)):
        root = runs.find(i)
        if root not in ids:
            ids[root] = len(ids) + 1
        labels[rows[i], starts[i] : ends[i]] = ids[root]
    return labels, len(ids)


def component_boxes(mask: np.ndarray) -> List[List[float]]:
    """XYXY boxes of the 8-connected components: x1 = min col, x2 = max col + 1, likewise y."""
    labels, n = label_components(mask)
    boxes = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    return boxes


# ----------------------------------------------------------------------------- NIfTI I/O
def read_nifti_image(path: str, what: str = "NIfTI"):
    """Read a NIfTI with SimpleITK (through PathManager); errors name the file."""
    import SimpleITK as sitk

    if not PathManager.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    local = PathManager.get_local_path(path)
    try:
        img = sitk.ReadImage(local)
    except RuntimeError as e:
        raise KiTS19Error(f"cannot read {what} {path}: {str(e).strip().splitlines()[-1]}") from None
    truncated = nifti_truncation(path)  # SimpleITK zero-fills what a cut-off file lacks
    if truncated:
        raise KiTS19Error(f"cannot read {what} {path}: {truncated}")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise KiTS19Error(
            f"{what} {path}: expected a 3-D scalar volume, got dimension "
            f"{img.GetDimension()} with {img.GetNumberOfComponentsPerPixel()} "
            "component(s)"
        )
    return img


def write_nifti(array_zyx: np.ndarray, spacing_xyz: Sequence[float], path: str) -> None:
    """Write a (z, y, x) array as a compressed NIfTI with the given voxel spacing (mm)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    PathManager.mkdirs(os.path.dirname(path))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        sitk.WriteImage(img, local, True)
        PathManager.copy_from_local(local, path, overwrite=True)


def slice_axis_of(img, slice_axis: Union[str, int] = "auto") -> int:
    """The voxel axis (SimpleITK / NIfTI order) that indexes axial slices; see the module doc."""
    if slice_axis != "auto":
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 'auto', 0, 1 or 2, got {slice_axis!r}")
        return int(slice_axis)
    sp = img.GetSpacing()
    for ax in range(3):
        o = [sp[i] for i in range(3) if i != ax]
        if abs(o[0] - o[1]) <= 1e-3 * max(o) and abs(sp[ax] - o[0]) > 1e-2 * max(o):
            return ax
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2])))  # column = voxel axis, row 2 = world z


def read_kits19_case(case_dir: str, slice_axis: Union[str, int] = "auto") -> Dict:
    """Load one case as (slice, row, col) arrays: ``image`` (HU, int16/float), ``seg`` (uint8).

    Also returns ``spacing`` (in-plane mm/px), ``slice_intv`` (mm) and ``slice_axis`` (voxel axis).
    Raises KiTS19Error naming the case when files are unreadable, shapes or spacings differ, or the
    segmentation holds labels other than 0, 1, 2; FileNotFoundError when a file is missing.
    """
    import SimpleITK as sitk

    name = os.path.basename(os.path.normpath(case_dir))
    img_path = os.path.join(case_dir, "imaging.nii.gz")
    seg_path = os.path.join(case_dir, "segmentation.nii.gz")
    img = read_nifti_image(img_path, f"{name} imaging")
    seg = read_nifti_image(seg_path, f"{name} segmentation")
    if img.GetSize() != seg.GetSize():
        raise KiTS19Error(
            f"{name}: image and mask shapes differ: {img_path} has size "
            f"{img.GetSize()}, {seg_path} has size {seg.GetSize()}"
        )
    if not np.allclose(img.GetSpacing(), seg.GetSpacing(), rtol=1e-3):
        raise KiTS19Error(
            f"{name}: image and mask spacings differ: {img.GetSpacing()} "
            f"({img_path}) vs {seg.GetSpacing()} ({seg_path})"
        )
    axis = slice_axis_of(img, slice_axis)
    order = _VIEW[axis]
    transpose = tuple(2 - a for a in order)
    image = np.transpose(sitk.GetArrayFromImage(img), transpose)
    seg_arr = np.transpose(sitk.GetArrayFromImage(seg), transpose)
    bad = np.setdiff1d(np.unique(seg_arr), [0, KIDNEY_LABEL, TUMOR_LABEL])
    if bad.size:
        raise KiTS19Error(
            f"{seg_path}: labels must be 0 (background), 1 (kidney), 2 (tumour); "
            f"found {bad.tolist()}"
        )
    sp = img.GetSpacing()
    row_sp, col_sp = sp[order[1]], sp[order[2]]
    if min(sp) <= 0:
        raise KiTS19Error(f"{img_path}: voxel spacing must be positive, got {sp}")
    return {
        "name": name,
        "image": image,
        "seg": seg_arr.astype(np.uint8),
        "spacing": 0.5 * (row_sp + col_sp),
        "spacing_rc": (row_sp, col_sp),
        "slice_intv": float(sp[order[0]]),
        "slice_axis": axis,
    }


# ----------------------------------------------------------------------------- records
def _case_number(name: str) -> int:
    m = CASE_RE.match(name)
    if not m:
        raise KiTS19Error(f"case folder {name!r} is not named case_XXXXX")
    return int(m.group(1))


def _slice_records(case: Dict, slice_dir: str, file_of, slice_range: Tuple[int, int]) -> List[Dict]:
    name, seg = case["name"], case["seg"]
    row_sp, col_sp = case["spacing_rc"]
    number = _case_number(name)
    records = []
    for z in np.nonzero((seg == TUMOR_LABEL).any(axis=(1, 2)))[0].tolist():
        annotations = []
        for k, box in enumerate(component_boxes(seg[z] == TUMOR_LABEL)):
            w_mm, h_mm = (box[2] - box[0]) * col_sp, (box[3] - box[1]) * row_sp
            annotations.append(
                {
                    "bbox": box,
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": 0,
                    "lesion_type": -1,
                    "noisy": False,
                    "diameter_mm": (max(w_mm, h_mm), min(w_mm, h_mm)),
                    "lesion_idx": k,
                }
            )
        records.append(
            {
                "file_name": file_of(z),
                "image_id": number * 10000 + z,
                "height": int(seg.shape[1]),
                "width": int(seg.shape[2]),
                "slice_dir": slice_dir,
                "slice_idx": z,
                "slice_range": slice_range,
                "slice_intv": case["slice_intv"],
                "spacing": case["spacing"],
                "hu_window": KIDNEY_HU_WINDOW,
                "case": f"{name}_{z:03d}",
                "annotations": annotations,
            }
        )
    return records


def case_records(case_dir: str, slice_axis: Union[str, int] = "auto") -> List[Dict]:
    """One record per slice with tumour, one box per 8-connected tumour component.

    Records point into ``case_dir`` (``slice_dir`` = ``case_dir``, ``file_name`` = the imaging
    NIfTI): only ``prepare_kits19`` turns them into PNG-backed records a mapper can read.
    """
    case = read_kits19_case(case_dir, slice_axis)
    img_path = os.path.join(case_dir, "imaging.nii.gz")
    return _slice_records(case, case_dir, lambda z: img_path, (0, case["seg"].shape[0] - 1))


def find_cases(root: str) -> List[str]:
    """Case folders under ``root/data`` (or ``root``), sorted by name."""
    base = os.path.join(root, "data") if PathManager.isdir(os.path.join(root, "data")) else root
    if not PathManager.isdir(base):
        raise FileNotFoundError(f"KiTS19 root not found: {root} (expected {root}/data/case_XXXXX/)")
    names = sorted(
        n
        for n in PathManager.ls(base)
        if CASE_RE.match(n) and PathManager.isdir(os.path.join(base, n))
    )
    if not names:
        raise FileNotFoundError(f"no case_XXXXX folders under {base}")
    return [os.path.join(base, n) for n in names]


# ----------------------------------------------------------------------------- split / catalog
def split_cases(
    case_ids: Sequence[str], seed: int = 0, train_frac: float = 0.8
) -> Tuple[List[str], List[str]]:
    """Patient-level split: a seeded permutation of the sorted ids, ``train_frac`` to train."""
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    ids = sorted(set(case_ids))
    if len(ids) < 2:
        raise ValueError(f"need at least 2 cases to split, got {len(ids)}")
    perm = np.random.RandomState(seed).permutation(len(ids))  # legacy generator: frozen stream
    n_train = min(max(int(round(train_frac * len(ids))), 1), len(ids) - 1)
    return sorted(ids[i] for i in perm[:n_train]), sorted(ids[i] for i in perm[n_train:])


def load_kits19_dicts(
    cache_dir: str, split: str, seed: int = 0, train_frac: float = 0.8
) -> List[Dict]:
    """Records of the ``split`` ('train' / 'test') cases of a prepared cache, paths made
    absolute."""
    if split not in ("train", "test"):
        raise ValueError(f"KiTS19 split must be 'train' or 'test', got {split!r}")
    path = os.path.join(cache_dir, RECORDS_FILE)
    if not PathManager.exists(path):
        norm = os.path.normpath(cache_dir)
        root = os.path.dirname(norm) if os.path.basename(norm) == "cache" else "<kits19 root>"
        raise FileNotFoundError(
            f"KiTS19 cache not found: {path}; run `python -m "
            f"elixir_d2.data.kits19 --root {root} --cache {cache_dir}` (see "
            "datasets/README.md)"
        )
    with PathManager.open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != CACHE_VERSION or "records" not in data or "cases" not in data:
        raise KiTS19Error(
            f"{path}: not a KiTS19 cache of version {CACHE_VERSION}; prepare it again"
        )
    train, test = split_cases(data["cases"], seed, train_frac)
    keep = set(train if split == "train" else test)
    out = []
    for r in data["records"]:
        if r["case"].rsplit("_", 1)[0] not in keep:
            continue
        r = dict(r)
        r["file_name"] = os.path.join(cache_dir, r["file_name"])
        r["slice_dir"] = os.path.join(cache_dir, r["slice_dir"])
        r["slice_range"] = tuple(r["slice_range"])
        r["hu_window"] = tuple(r["hu_window"])
        r["annotations"] = [
            dict(a, bbox_mode=BoxMode(a["bbox_mode"]), diameter_mm=tuple(a["diameter_mm"]))
            for a in r["annotations"]
        ]
        out.append(r)
    logger.info(
        f"Loaded {len(out)} tumour slices of KiTS19 {split} ({len(keep)} cases) from {cache_dir}"
    )
    return out


def register_kits19(root_or_cache: str, prefix: str = "kits19") -> List[str]:
    """Register ``<prefix>_{train,test}`` lazily from a cache (a folder holding records.json, or
    ``<root>/cache`` of a KiTS19 root)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    cache = root_or_cache
    if not PathManager.exists(os.path.join(root_or_cache, RECORDS_FILE)):
        cache = os.path.join(root_or_cache, "cache")
    names = []
    for split in ("train", "test"):
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda c=cache, s=split: load_kits19_dicts(c, s))
        MetadataCatalog.get(name).set(
            thing_classes=["lesion"], evaluator_type="lesion", dataset_root=cache
        )
        names.append(name)
    return names


# Cache preparation lives in kits19_cache; imported last because it builds on this module.
# prepare_kits19 is re-exported: callers import it from here.
from .kits19_cache import main, prepare_kits19  # noqa: E402,F401

if __name__ == "__main__":
    main()
