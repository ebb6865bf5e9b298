"""Shared test fixtures: tiny hand-made DeepLesion-format folders."""

import csv
import locale
import os

import numpy as np
import pytest
import torch
from PIL import Image

from elixir_d2.data.deeplesion import DL_INFO_COLUMNS

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one thread, whatever an earlier one set (a script's main called in
    process may set its own): float sums then do not depend on the order the tests ran in."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _process_locale_restored():
    """GDCM's DICOM writer (SimpleITK, used by the tests' DICOM helpers) leaves the process in the
    C locale, whose default text encoding is ASCII: every later test would then run under it."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


def dl_row(
    file_name="000001_01_01_005.png",
    box=(11, 21, 31, 41),
    split=3,
    lesion_type=-1,
    noisy=0,
    spacing=(0.8, 0.8, 2.0),
    size=(64, 64),
    slice_range=(1, 9),
    **over,
):
    """One DL_info.csv row as a dict; values written as the real file writes them."""
    pat, study, series, key = os.path.splitext(file_name)[0].split("_")
    row = {
        "File_name": file_name,
        "Patient_index": str(int(pat)),
        "Study_index": str(int(study)),
        "Series_ID": str(int(series)),
        "Key_slice_index": str(int(key)),
        "Measurement_coordinates": "12, 22, 30, 40, 14, 38, 28, 24",
        "Bounding_boxes": ", ".join(str(v) for v in box),
        "Lesion_diameters_Pixel_": "25.4, 19.8",
        "Normalized_lesion_location": "0.3, 0.4, 0.5",
        "Coarse_lesion_type": str(lesion_type),
        "Possibly_noisy": str(noisy),
        "Slice_range": f"{slice_range[0]}, {slice_range[1]}",
        "Spacing_mm_px_": ", ".join(str(v) for v in spacing),
        "Image_size": f"{size[0]}, {size[1]}",
        "DICOM_windows": "-175, 275",
        "Patient_gender": "F",
        "Patient_age": "51",
        "Train_Val_Test": str(split),
    }
    row.update(over)
    return row


def write_dl_info(root, rows, columns=DL_INFO_COLUMNS):
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "DL_info.csv")
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


def write_slice(root, series, idx, hu):
    """Write a uint16 PNG holding ``hu`` (HU + 32768) as Images_png/<series>/<idx:03d>.png."""
    d = os.path.join(root, "Images_png", series)
    os.makedirs(d, exist_ok=True)
    arr = (np.asarray(hu, dtype=np.int32) + 32768).astype(np.uint16)
    Image.fromarray(arr).save(os.path.join(d, f"{idx:03d}.png"))


@pytest.fixture
def dl_root(tmp_path):
    return str(tmp_path / "DeepLesion")
