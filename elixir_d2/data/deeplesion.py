"""DeepLesion: DL_info.csv parsing, key-slice records, DatasetCatalog registration."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

# The 18 columns of DeepLesion's DL_info.csv, in file order.
DL_INFO_COLUMNS = (
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
)

# Coarse_lesion_type 1..8 (paper Table 4 abbreviations in brackets).
LESION_TYPES = (
    "bone",  # BN
    "abdomen",  # AB
    "mediastinum",  # ME
    "liver",  # LV
    "lung",  # LU
    "kidney",  # KD
    "soft tissue",  # ST
    "pelvis",  # PV
)
LESION_TYPE_ABBREV = ("BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV")

logger = logging.getLogger(__name__)

SPLITS = {"train": 1, "val": 2, "test": 3}


class DeepLesionFormatError(ValueError):
    """A DL_info.csv row or column that cannot be parsed; the message names file, row, column."""


# Counts of what a load left out, per (root, split, typed): reported, never silent.
LOAD_STATS: Dict[Tuple[str, str, bool], Dict[str, int]] = {}


def _floats(text: str, n: Optional[int], where: str) -> List[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p != ""]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DeepLesionFormatError(
            f"{where}: expected numbers separated by ',', got {text!r}"
        ) from None
    if n is not None and len(values) != n:
        raise DeepLesionFormatError(f"{where}: expected {n} values, got {len(values)} in {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise DeepLesionFormatError(f"{where}: NaN or infinite value in {text!r}")
    return values


def _int(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise DeepLesionFormatError(f"{where}: expected an integer, got {text!r}") from None
    # int(float("inf")) raises OverflowError and int(2.5) would truncate silently: refuse both.
    if not math.isfinite(value) or value != int(value):
        raise DeepLesionFormatError(f"{where}: expected an integer, got {text!r}")
    return int(value)


def series_dir_and_slice(file_name: str) -> Tuple[str, int]:
    """``000001_01_01_109.png`` -> (``000001_01_01``, 109): the folder under Images_png and
    slice."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    folder, sep, slice_str = stem.rpartition("_")
    if not sep or not folder or not slice_str.isdigit():
        raise DeepLesionFormatError(
            f"File_name {file_name!r} is not of the form <patient>_<study>_<series>_<slice>.png"
        )
    return folder, int(slice_str)


def parse_dl_info_row(row: Dict[str, str], where: str) -> Dict:
    """Parse one DL_info.csv row (all 18 columns) into a lesion dict; errors name ``where`` +
    column."""

    def col(name: str) -> str:
        value = row.get(name)
        if value is None:
            raise DeepLesionFormatError(f"{where}, column {name}: missing")
        return value.strip()

    def at(name: str) -> str:
        return f"{where}, column {name}"

    file_name = col("File_name")
    try:
        folder, key_slice = series_dir_and_slice(file_name)
    except DeepLesionFormatError as e:
        raise DeepLesionFormatError(f"{at('File_name')}: {e}") from None
    x1, y1, x2, y2 = _floats(col("Bounding_boxes"), 4, at("Bounding_boxes"))
    # The reference code (3DCE) subtracts 1 from DL_info's boxes.
    box = [x1 - 1, y1 - 1, x2 - 1, y2 - 1]
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DeepLesionFormatError(
            f"{at('Bounding_boxes')}: empty or inverted box {col('Bounding_boxes')!r}"
        )
    width, height = _floats(col("Image_size"), 2, at("Image_size"))
    if width < 1 or height < 1:
        raise DeepLesionFormatError(
            f"{at('Image_size')}: expected a positive size, got {col('Image_size')!r}"
        )
    if box[0] >= width or box[1] >= height or box[2] <= 0 or box[3] <= 0:
        raise DeepLesionFormatError(
            f"{at('Bounding_boxes')}: box {col('Bounding_boxes')!r} lies outside the {width:g} x "
            f"{height:g} image"
        )
    spacing = _floats(col("Spacing_mm_px_"), 3, at("Spacing_mm_px_"))
    if min(spacing) <= 0:
        raise DeepLesionFormatError(
            f"{at('Spacing_mm_px_')}: spacing must be positive, got {spacing}"
        )
    diam_px = _floats(col("Lesion_diameters_Pixel_"), 2, at("Lesion_diameters_Pixel_"))
    slice_range = _floats(col("Slice_range"), 2, at("Slice_range"))
    noisy = _int(col("Possibly_noisy"), at("Possibly_noisy"))
    if noisy not in (0, 1):
        raise DeepLesionFormatError(f"{at('Possibly_noisy')}: expected 0 or 1, got {noisy}")
    lesion_type = _int(col("Coarse_lesion_type"), at("Coarse_lesion_type"))
    if lesion_type != -1 and not 1 <= lesion_type <= len(LESION_TYPES):
        raise DeepLesionFormatError(
            f"{at('Coarse_lesion_type')}: expected -1 or 1..8, got {lesion_type}"
        )
    split = _int(col("Train_Val_Test"), at("Train_Val_Test"))
    if split not in SPLITS.values():
        raise DeepLesionFormatError(f"{at('Train_Val_Test')}: expected 1, 2 or 3, got {split}")
    return {
        "file_name": file_name,
        "series_dir": folder,
        "key_slice": _int(col("Key_slice_index"), at("Key_slice_index")),
        "name_slice": key_slice,
        "patient": _int(col("Patient_index"), at("Patient_index")),
        "study": _int(col("Study_index"), at("Study_index")),
        "series": _int(col("Series_ID"), at("Series_ID")),
        "bbox": box,
        "recist": _floats(col("Measurement_coordinates"), 8, at("Measurement_coordinates")),
        "diameter_px": diam_px,
        "location": _floats(col("Normalized_lesion_location"), 3, at("Normalized_lesion_location")),
        "lesion_type": lesion_type,
        "noisy": bool(noisy),
        "slice_range": (int(slice_range[0]), int(slice_range[1])),
        "spacing": spacing,
        "size": (int(height), int(width)),
        "hu_window": tuple(_floats(col("DICOM_windows"), 2, at("DICOM_windows"))),
        "gender": col("Patient_gender"),
        "age": col("Patient_age"),
        "split": split,
    }


def write_dl_info(csv_path: str, rows: List[Dict]) -> None:
    """Write ``rows`` (dicts keyed by :data:`DL_INFO_COLUMNS`) as a DL_info.csv."""
    with PathManager.open(csv_path, "w", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(DL_INFO_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_dl_info(csv_path: str) -> List[Dict]:
    """Parse every row of DL_info.csv; raise DeepLesionFormatError naming file, row and column."""
    try:
        with PathManager.open(csv_path, "r", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DeepLesionFormatError(f"{csv_path}: not a text (UTF-8) file: {e}") from None
    if not text.strip():
        raise DeepLesionFormatError(
            f"{csv_path}: empty file (expected a header row and one row per lesion)"
        )
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in DL_INFO_COLUMNS if c not in header]
    if missing:
        raise DeepLesionFormatError(
            f"{csv_path}: header lacks column(s) {missing} (header: {header})"
        )
    lesions = []
    for i, row in enumerate(reader):
        where = f"{csv_path}, row {i + 2}"  # row 1 is the header
        if None in row:  # more fields than the header has
            raise DeepLesionFormatError(
                f"{where}: {len(header) + len(row[None])} fields, header has {len(header)}"
            )
        lesions.append(parse_dl_info_row(row, where))
    if not lesions:
        raise DeepLesionFormatError(f"{csv_path}: a header but no lesion rows")
    return lesions


def load_deeplesion_dicts(root: str, split: str, typed: bool = False) -> List[Dict]:
    """One detectron2 record per key slice of ``split`` (train / val / test) with all its lesions.

    ``typed`` gives each lesion ``category_id`` = Coarse_lesion_type - 1 (8 classes); otherwise 0.
    Key slices whose PNG is missing are skipped, counted in LOAD_STATS and logged.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if typed and split == "train":
        raise ValueError(
            "DeepLesion's train split has no lesion types: typed=True needs val or test"
        )
    csv_path = os.path.join(root, "DL_info.csv")
    if not PathManager.exists(csv_path):
        raise FileNotFoundError(
            f"DeepLesion annotations not found: {csv_path} (see datasets/README.md)"
        )
    image_root = os.path.join(root, "Images_png")
    grouped: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for lesion in read_dl_info(csv_path):
        if lesion["split"] == SPLITS[split]:
            grouped.setdefault(lesion["file_name"], []).append(lesion)

    stats = {
        "key_slices": len(grouped),
        "missing_key_slice": 0,
        "untyped_lesion": 0,
        "clipped_box": 0,
    }
    records = []
    for image_id, (file_name, lesions) in enumerate(sorted(grouped.items())):
        first = lesions[0]
        slice_dir = os.path.join(image_root, first["series_dir"])
        key_path = os.path.join(slice_dir, f"{first['name_slice']:03d}.png")
        if not PathManager.exists(key_path):
            stats["missing_key_slice"] += 1
            continue
        height, width = first["size"]
        annotations = []
        for idx, les in enumerate(lesions):
            if typed and les["lesion_type"] == -1:
                stats["untyped_lesion"] += 1
                continue
            # A box reaching past the image border (e.g. -0.5 after the minus-1 convention) is
            # clipped to it and counted; one wholly outside was refused by parse_dl_info_row.
            x1, y1, x2, y2 = les["bbox"]
            bbox = [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]
            stats["clipped_box"] += int(bbox != les["bbox"])
            annotations.append(
                {
                    "bbox": bbox,
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": les["lesion_type"] - 1 if typed else 0,
                    "lesion_type": les["lesion_type"],
                    "noisy": les["noisy"],
                    "diameter_mm": tuple(d * les["spacing"][0] for d in les["diameter_px"]),
                    "lesion_idx": idx,
                }
            )
        records.append(
            {
                "file_name": key_path,
                "image_id": image_id,
                "height": height,
                "width": width,
                "case": os.path.splitext(file_name)[0],
                "slice_dir": slice_dir,
                "slice_idx": first["name_slice"],
                "slice_range": first["slice_range"],
                "slice_intv": first["spacing"][2],
                "spacing": first["spacing"][0],
                "hu_window": first["hu_window"],
                "annotations": annotations,
            }
        )
    LOAD_STATS[(root, split, typed)] = stats
    if stats["missing_key_slice"] or stats["untyped_lesion"] or stats["clipped_box"]:
        logger.warning(
            f"DeepLesion {split}{'_typed' if typed else ''} at {root}: skipped "
            f"{stats['missing_key_slice']} of {stats['key_slices']} key slices whose PNG is "
            f"missing, {stats['untyped_lesion']} lesions without a type; clipped "
            f"{stats['clipped_box']} boxes reaching past the image border"
        )
    logger.info(f"Loaded {len(records)} key slices of DeepLesion {split} from {root}")
    return records


def register_deeplesion(
    root: str, prefix: str = "deeplesion", prepare: Optional[Callable[[], object]] = None
) -> List[str]:
    """Register ``<prefix>_{train,val,test}`` and ``<prefix>_{val,test}_typed`` (lazily);
    ``prepare()`` runs before each load (e.g. to generate a missing synthetic set)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    def load(split: str, typed: bool) -> List[Dict]:
        if prepare is not None:
            prepare()
        return load_deeplesion_dicts(root, split, typed)

    names = []
    for split in SPLITS:
        for typed in (False, True) if split != "train" else (False,):
            name = f"{prefix}_{split}{'_typed' if typed else ''}"
            if name in DatasetCatalog.list():
                continue
            DatasetCatalog.register(name, lambda s=split, t=typed: load(s, t))
            MetadataCatalog.get(name).set(
                thing_classes=list(LESION_TYPES) if typed else ["lesion"],
                type_abbrev=list(LESION_TYPE_ABBREV) if typed else ["lesion"],
                evaluator_type="lesion",
                dataset_root=root,
            )
            names.append(name)
    return names
