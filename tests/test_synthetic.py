"""Synthetic generator: DL_info.csv format (all 18 columns), 16-bit PNG series on disk, HU ranges,
lesions under their boxes, determinism, round trip through the DeepLesion loader; KiTS19 variant."""

import csv
import filecmp
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from elixir_d2.data import synthetic_phantom as P
from elixir_d2.data.ct_mapper import SliceStack
from elixir_d2.data.deeplesion import DL_INFO_COLUMNS, load_deeplesion_dicts
from elixir_d2.data.kits19 import case_records, read_kits19_case
from elixir_d2.data.synthetic import generate_deeplesion, generate_kits19, main

SIZE = 160
KW = dict(num_patients=10, slices_per_series=(8, 10), image_size=SIZE, seed=3)
# 1.6-2.2 mm at 192 px, the field kept at other sizes
SPACING = (1.6 * 192 / SIZE, 2.2 * 192 / SIZE)


def floats(text, n):
    parts = text.split(", ")
    assert len(parts) == n, text
    return [float(p) for p in parts]


def read_png_hu(path):
    with open(path, "rb") as f:
        head = f.read(26)
    # 16-bit gray
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] == 0, path
    return np.array(Image.open(path), dtype=np.float64) - 32768


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic") / "set")
    summary = generate_deeplesion(out, **KW)
    with open(os.path.join(out, "DL_info.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    return out, summary, header, rows


def test_dl_info_has_all_18_columns_in_their_formats(dataset):
    out, summary, header, rows = dataset
    assert tuple(header) == DL_INFO_COLUMNS and len(header) == 18
    assert len(rows) == sum(s["lesions"] for s in summary["splits"].values()) > 0
    split_of_patient = {}
    for r in rows:
        m = re.fullmatch(r"(\d{6})_(\d{2})_(\d{2})_(\d{3})\.png", r["File_name"])
        assert m, r["File_name"]
        assert [int(g) for g in m.groups()] == [
            int(r[c]) for c in ("Patient_index", "Study_index", "Series_ID", "Key_slice_index")
        ]
        first, last = (int(v) for v in floats(r["Slice_range"], 2))
        assert first <= int(r["Key_slice_index"]) - 2 and int(r["Key_slice_index"]) + 2 <= last
        sx, sy, sz = floats(r["Spacing_mm_px_"], 3)
        assert sx == sy and SPACING[0] <= sx <= SPACING[1] and sz in (1.0, 1.25, 2.0, 2.5, 5.0)
        assert floats(r["Image_size"], 2) == [SIZE, SIZE]
        lo, hi = floats(r["DICOM_windows"], 2)
        assert lo < hi
        x1, y1, x2, y2 = (v - 1 for v in floats(r["Bounding_boxes"], 4))  # written +1
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
        recist = np.array(floats(r["Measurement_coordinates"], 8)) - 1
        long_px, short_px = floats(r["Lesion_diameters_Pixel_"], 2)
        assert long_px >= short_px > 0
        assert 3.0 - 1e-6 <= long_px * sx <= 30.0 + 1e-6  # lesions of 3 to 30 mm
        assert math.dist(recist[0:2], recist[2:4]) == pytest.approx(long_px, abs=2e-3)
        assert math.dist(recist[4:6], recist[6:8]) == pytest.approx(short_px, abs=2e-3)
        axes = (recist[2:4] - recist[0:2]) @ (recist[6:8] - recist[4:6])
        assert abs(axes) < 1e-2 * long_px * short_px + 1e-3  # long and short axes perpendicular
        xs, ys = recist[0::2], recist[1::2]
        assert (
            x1 - 1e-3 <= xs.min()
            and xs.max() <= x2 + 1e-3
            and y1 - 1e-3 <= ys.min()
            and ys.max() <= y2 + 1e-3
        )
        assert all(0.0 <= v <= 1.0 for v in floats(r["Normalized_lesion_location"], 3))
        split = int(r["Train_Val_Test"])
        assert split in (1, 2, 3)
        lesion_type = int(r["Coarse_lesion_type"])
        assert lesion_type == -1 if split == 1 else 1 <= lesion_type <= 8
        assert r["Possibly_noisy"] in ("0", "1")
        assert r["Patient_gender"] in ("M", "F") and 18 <= int(r["Patient_age"]) < 90
        assert split_of_patient.setdefault(r["Patient_index"], split) == split  # split by patient
    assert set(split_of_patient.values()) == {1, 2, 3}
    per_key = {}
    for r in rows:
        per_key[r["File_name"]] = per_key.get(r["File_name"], 0) + 1
    assert set(per_key.values()) <= {1, 2, 3}


def test_series_on_disk_match_slice_range_and_are_16_bit(dataset):
    out, summary, _, rows = dataset
    series = {}
    for r in rows:
        series[r["File_name"][:12]] = tuple(int(v) for v in floats(r["Slice_range"], 2))
    assert sorted(os.listdir(os.path.join(out, "Images_png"))) == sorted(series)
    written = 0
    for folder, (first, last) in series.items():
        names = sorted(os.listdir(os.path.join(out, "Images_png", folder)))
        assert names == [f"{i:03d}.png" for i in range(first, last + 1)]
        written += len(names)
        hu = read_png_hu(os.path.join(out, "Images_png", folder, names[0]))
        assert hu.shape == (SIZE, SIZE)
        corners = np.concatenate([hu[:3, :3].ravel(), hu[-3:, -3:].ravel()])
        assert np.all(np.abs(corners + 1000) < 100)  # air outside the body, with noise
        assert -1024 <= hu.min() and hu.max() <= 3071
    assert written == summary["slices_written"]


def test_boxes_lie_on_lesions_that_span_neighbouring_slices(dataset):
    out, _, _, rows = dataset
    contrast, neighbour = [], []
    for r in rows:
        if r["Possibly_noisy"] == "1":  # deliberately shifted annotations
            continue
        folder, key = r["File_name"][:12], int(r["Key_slice_index"])
        x1, y1, x2, y2 = (v - 1 for v in floats(r["Bounding_boxes"], 4))
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
        inner = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 < 0.35
        near = (np.abs(xx - cx) < w / 2 + 3) & (np.abs(yy - cy) < h / 2 + 3)
        ring = near & ~((np.abs(xx - cx) < w / 2 + 1) & (np.abs(yy - cy) < h / 2 + 1))
        if not inner.any():
            continue

        def diff(k):
            hu = read_png_hu(os.path.join(out, "Images_png", folder, f"{k:03d}.png"))
            return abs(hu[inner].mean() - np.median(hu[ring]))

        contrast.append(diff(key))
        sx, _, sz = floats(r["Spacing_mm_px_"], 3)
        # z half-extent > 1.5 intervals
        if floats(r["Lesion_diameters_Pixel_"], 2)[1] * sx / 2 * 0.7 > 1.5 * sz:
            neighbour.append(min(diff(key - 1), diff(key + 1)))
    contrast = np.array(contrast)
    assert len(contrast) >= 10
    # the box holds a lesion, not its host
    assert np.mean(contrast >= 30) >= 0.85, np.sort(contrast)[:10]
    assert np.median(contrast) >= 60
    assert neighbour and np.mean(np.array(neighbour) >= 20) >= 0.8  # 3-D: visible on the neighbours


def test_organ_hu_ranges_at_known_pixels():
    rng = np.random.default_rng(0)
    for region in ("chest", "abdomen", "pelvis"):
        blobs, _ = P.build_anatomy(region, fov_mm=SIZE * 2.0, z_len=20.0, rng=rng)
        vol, lab = P.render_series(blobs, [0.0], SIZE, 2.0, noise_hu=15.0, rng=rng)
        hu, lab = vol[0], lab[0]
        assert abs(hu[0, 0] + 1000) < 80  # a corner: air
        # Pixels well inside a tissue (all 8 neighbours the same label), by tissue.
        same = np.ones_like(lab, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                same &= np.roll(np.roll(lab, dy, 0), dx, 1) == lab
        expected = {
            P.SUBCUT_FAT: (-130, -70),
            P.MUSCLE: (20, 75),
            P.LUNG: (-900, -780),
            P.LIVER: (50, 100),
            P.KIDNEY: (120, 210),
            P.CORTEX: (400, 1000),
            P.VISCERAL_FAT: (-130, -65),
            P.MEDIASTINAL_FAT: (-125, -55),
            P.BLADDER: (-20, 40),
        }
        seen = 0
        for label, (lo, hi) in expected.items():
            px = hu[same & (lab == label)]
            if px.size >= 20:
                seen += 1
                assert lo <= np.median(px) <= hi, (region, label, np.median(px))
                if label in (P.SUBCUT_FAT, P.LIVER):  # one object each: spread = noise (+ texture)
                    assert 10 <= px.std() <= 25, (region, label, px.std())
        assert seen >= 4, region


def test_deterministic_by_seed(tmp_path):
    kw = dict(KW, num_patients=4)
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_deeplesion(a, **kw)
    generate_deeplesion(b, **kw)
    generate_deeplesion(c, **dict(kw, seed=4))
    cmp = filecmp.dircmp(a, b)
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    files = []
    for root, _, names in os.walk(a):
        files += [os.path.relpath(os.path.join(root, n), a) for n in names]
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(files) > 20
    with (
        open(os.path.join(a, "DL_info.csv"), encoding="utf-8") as fa,
        open(os.path.join(c, "DL_info.csv"), encoding="utf-8") as fc,
    ):
        assert fa.read() != fc.read()


def test_every_type_in_val_and_test(tmp_path):
    # 4 val and 4 test patients (the default 10 % val would leave 2, too few for 8 types).
    s = generate_deeplesion(
        str(tmp_path / "t"),
        num_patients=24,
        slices_per_series=(8, 9),
        image_size=128,
        seed=0,
        val_frac=0.15,
        test_frac=0.15,
    )
    for split in ("val", "test"):
        assert all(n > 0 for n in s["splits"][split]["types"].values()), s["splits"][split]
    assert s["splits"]["train"]["lesions"] > s["splits"]["val"]["lesions"]


def test_round_trip_through_deeplesion_loader(dataset):
    out, summary, _, rows = dataset
    for split, code in (("train", "1"), ("val", "2"), ("test", "3")):
        csv_rows = [r for r in rows if r["Train_Val_Test"] == code]
        recs = load_deeplesion_dicts(out, split)
        assert (
            len(recs)
            == len({r["File_name"] for r in csv_rows})
            == summary["splits"][split]["key_slices"]
        )
        boxes = sorted(
            tuple(round(v, 3) for v in a["bbox"]) for rec in recs for a in rec["annotations"]
        )
        want = sorted(
            tuple(round(v - 1, 3) for v in floats(r["Bounding_boxes"], 4)) for r in csv_rows
        )
        assert boxes == want
        for rec in recs:
            assert os.path.isfile(rec["file_name"]) and (rec["height"], rec["width"]) == (
                SIZE,
                SIZE,
            )
            stack = SliceStack(rec["slice_dir"], rec["slice_idx"], rec["slice_range"])
            for offset_mm in (-2.0, 2.0):
                stack.at_offset(offset_mm / rec["slice_intv"])
            assert stack.fallbacks == 0  # every neighbour is on disk
    typed = load_deeplesion_dicts(out, "test", typed=True)
    assert {a["category_id"] for r in typed for a in r["annotations"]} <= set(range(8))


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="num_patients"):
        generate_deeplesion(str(tmp_path / "x"), num_patients=2)
    with pytest.raises(ValueError, match="image_size"):
        generate_deeplesion(str(tmp_path / "x"), image_size=32)
    with pytest.raises(ValueError, match="num_cases"):
        generate_kits19(str(tmp_path / "x"), num_cases=0)


def test_kits19_variant_reads_back(tmp_path):
    main(
        [
            "--out",
            str(tmp_path),
            "--format",
            "kits19",
            "--patients",
            "2",
            "--size",
            "64",
            "--slices",
            "16",
            "18",
        ]
    )
    for i in range(2):
        case_dir = str(tmp_path / "data" / f"case_{i:05d}")
        case = read_kits19_case(case_dir)
        img, seg = case["image"], case["seg"]
        assert img.dtype == np.int16 and seg.dtype == np.uint8 and img.shape == seg.shape
        assert img.shape[1:] == (64, 64) and 16 <= img.shape[0] <= 18 and case["slice_axis"] == 2
        # 64 px
        assert 1.6 * 3 <= case["spacing"] <= 2.2 * 3 and case["slice_intv"] in (2.5, 3.0, 5.0)
        assert set(np.unique(seg)) == {0, 1, 2}
        # tumour darker than kidney
        assert np.median(img[seg == 1]) - np.median(img[seg == 2]) >= 40
        recs = case_records(case_dir)
        assert [r["slice_idx"] for r in recs] == np.nonzero((seg == 2).any(axis=(1, 2)))[0].tolist()
