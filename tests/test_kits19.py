"""KiTS19: connected-component boxes from known masks, NIfTI reading (both slice layouts), errors,
the PNG cache (idempotent), the 80/20 patient split and registration."""

import json
import os
from collections import deque

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from elixir_d2.data.kits19 import (
    KiTS19Error,
    case_records,
    component_boxes,
    label_components,
    load_kits19_dicts,
    prepare_kits19,
    read_kits19_case,
    register_kits19,
    split_cases,
)


def mask_from(rows):
    """A boolean mask from strings: '#' = True."""
    return np.array([[c == "#" for c in r] for r in rows])


# ----------------------------------------------------------------------------- components
def test_single_pixel_box_is_one_pixel_wide():
    m = np.zeros((6, 8), bool)
    m[3, 5] = True
    assert component_boxes(m) == [[5.0, 3.0, 6.0, 4.0]]  # x2 = max col + 1, y2 = max row + 1


def test_diagonal_pixels_join_under_8_connectivity():
    m = mask_from(["#...", ".#..", "..#.", "...."])
    assert component_boxes(m) == [[0.0, 0.0, 3.0, 3.0]]


def test_u_shape_merges_two_runs_that_start_apart():
    m = mask_from(["#...#", "#...#", "#####"])
    labels, n = label_components(m)
    assert n == 1
    assert component_boxes(m) == [[0.0, 0.0, 5.0, 3.0]]


def test_separate_components_boxes_in_raster_order():
    m = mask_from(
        [
            ".....##",
            "##...##",
            "##.....",
            ".......",
            "...#.#.",  # one-column gap: two components
            ".......",
        ]
    )
    assert component_boxes(m) == [
        [5.0, 0.0, 7.0, 2.0],  # first pixel at row 0
        [0.0, 1.0, 2.0, 3.0],
        [3.0, 4.0, 4.0, 5.0],
        [5.0, 4.0, 6.0, 5.0],
    ]


def _bfs_components(mask):
    """Independent reference: flood fill with 8 neighbours -> set of frozenset pixel sets."""
    seen = np.zeros_like(mask, bool)
    comps = set()
    h, w = mask.shape
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            q, comp = deque([(r0, c0)]), []
            seen[r0, c0] = True
            while q:
                r, c = q.popleft()
                comp.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            q.append((rr, cc))
            comps.add(frozenset(comp))
    return comps


def test_labels_match_flood_fill_on_random_masks():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.4, 0.55):
        mask = rng.random((30, 41)) < density
        labels, n = label_components(mask)
        got = {frozenset(map(tuple, np.argwhere(labels == k))) for k in range(1, n + 1)}
        assert got == _bfs_components(mask)
        assert (labels > 0).sum() == mask.sum()


# ----------------------------------------------------------------------------- NIfTI cases
SPACING_XYZ = (0.75, 0.75, 3.0)


def make_volume():
    """(slice, row, col) HU volume and segmentation with tumours on slices 2 and 3."""
    hu = np.full((6, 20, 24), -100, np.int16)
    seg = np.zeros((6, 20, 24), np.uint8)
    seg[1:5, 4:16, 3:10] = 1  # kidney on slices 1..4
    seg[2, 6:9, 4:8] = 2  # tumour A: rows 6..8, cols 4..7
    seg[2, 12:14, 18:21] = 2  # tumour B (outside the kidney): rows 12..13, cols 18..20
    seg[3, 7, 5] = 2  # single-pixel tumour on slice 3
    seg[3, 8, 6] = 2  # diagonal neighbour: same component
    hu[seg == 1] = 160
    hu[seg == 2] = 50
    hu[0, 0, 0] = -1000
    return hu, seg


def write_case(case_dir, hu, seg, layout="standard", spacing=SPACING_XYZ, seg_shape=None):
    """Write a case; 'kits' puts slices on the first NIfTI axis, as the real KiTS19 files do."""
    os.makedirs(case_dir, exist_ok=True)
    for name, arr in (("imaging", hu), ("segmentation", seg)):
        if layout == "kits":  # numpy view of SimpleITK is [k, j, i]; slices on voxel axis i
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
            img.SetSpacing((spacing[2], spacing[1], spacing[0]))
        else:
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(spacing)
        sitk.WriteImage(img, os.path.join(case_dir, f"{name}.nii.gz"), True)


EXPECTED = {  # slice -> boxes per the x2 = max col + 1 rule, computed by hand from make_volume
    2: [[4.0, 6.0, 8.0, 9.0], [18.0, 12.0, 21.0, 14.0]],
    3: [[5.0, 7.0, 7.0, 9.0]],
}


@pytest.mark.parametrize("layout", ["standard", "kits"])
def test_case_records_boxes_from_known_masks(tmp_path, layout):
    hu, seg = make_volume()
    case_dir = str(tmp_path / "data" / "case_00007")
    write_case(case_dir, hu, seg, layout)
    case = read_kits19_case(case_dir)
    assert case["slice_axis"] == (2 if layout == "standard" else 0)
    np.testing.assert_array_equal(case["image"], hu)
    np.testing.assert_array_equal(case["seg"], seg)
    recs = case_records(case_dir)
    assert [r["slice_idx"] for r in recs] == [2, 3]
    for r in recs:
        assert [a["bbox"] for a in r["annotations"]] == EXPECTED[r["slice_idx"]]
        assert r["slice_intv"] == pytest.approx(3.0) and r["spacing"] == pytest.approx(0.75)
        assert (r["height"], r["width"], r["slice_range"]) == (20, 24, (0, 5))
        assert r["case"] == f"case_00007_{r['slice_idx']:03d}"
        for i, a in enumerate(r["annotations"]):
            assert a["bbox_mode"] == BoxMode.XYXY_ABS and a["category_id"] == 0
            assert a["lesion_type"] == -1 and a["noisy"] is False and a["lesion_idx"] == i
    a = recs[0]["annotations"][0]  # 4 columns x 3 rows of 0.75 mm
    assert a["diameter_mm"] == pytest.approx((3.0, 2.25))


def test_shape_mismatch_names_case_and_files(tmp_path):
    hu, seg = make_volume()
    case_dir = str(tmp_path / "case_00003")
    write_case(case_dir, hu, seg)
    img = sitk.GetImageFromArray(seg[:, :, :20])
    img.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(img, os.path.join(case_dir, "segmentation.nii.gz"), True)
    with pytest.raises(
        KiTS19Error,
        match=r"case_00003: image and mask shapes "
        r"differ.*imaging.nii.gz.*segmentation",
    ):
        case_records(case_dir)


def test_missing_unreadable_and_bad_labels(tmp_path):
    hu, seg = make_volume()
    case_dir = str(tmp_path / "case_00001")
    write_case(case_dir, hu, seg)
    seg_path = os.path.join(case_dir, "segmentation.nii.gz")
    bad = seg.copy()
    bad[0, 0, 0] = 3
    img = sitk.GetImageFromArray(bad)
    img.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(img, seg_path, True)
    with pytest.raises(KiTS19Error, match=r"segmentation.nii.gz: labels must be .*found \[3\]"):
        case_records(case_dir)
    with open(seg_path, "wb") as f:
        f.write(b"not a nifti at all")
    with pytest.raises(
        KiTS19Error, match=r"cannot read case_00001 segmentation .*segmentation.nii.gz"
    ):
        case_records(case_dir)
    os.remove(seg_path)
    with pytest.raises(
        FileNotFoundError, match=r"case_00001 segmentation not found: .*segmentation.nii.gz"
    ):
        case_records(case_dir)


# --------------------------------------------------------------------- cache, split, catalog
def test_split_cases_is_80_20_seeded_and_disjoint():
    ids = [f"case_{i:05d}" for i in range(10)]
    train, test = split_cases(list(reversed(ids)), seed=0)
    assert (len(train), len(test)) == (8, 2)
    assert sorted(train + test) == ids
    assert split_cases(ids, seed=0) == (train, test)  # input order does not matter
    others = {tuple(split_cases(ids, seed=s)[1]) for s in range(1, 6)}
    assert len(others | {tuple(test)}) > 1  # the seed changes the split
    with pytest.raises(ValueError, match="at least 2 cases"):
        split_cases(["case_00000"])


def test_prepare_cache_is_idempotent_and_loads_by_split(tmp_path):
    hu, seg = make_volume()
    root = tmp_path / "kits19"
    for i in range(5):
        write_case(str(root / "data" / f"case_{i:05d}"), hu, seg, "kits" if i % 2 else "standard")
    cache = str(tmp_path / "cache")
    s1 = prepare_kits19(str(root), cache)
    assert s1 == {
        "cases": 5,
        "decoded": 5,
        "tumour_slices": 10,
        "boxes": 15,
        "cases_without_tumour": [],
    }
    png = os.path.join(cache, "case_00001", "003.png")
    arr = np.array(Image.open(png))
    with open(png, "rb") as f:
        assert f.read(26)[24:26] == b"\x10\x00"  # IHDR: 16-bit grayscale
    np.testing.assert_array_equal(arr, hu[3].astype(np.int32) + 32768)
    assert sorted(os.listdir(os.path.join(cache, "case_00001"))) == [
        f"{z:03d}.png" for z in range(6)
    ] + ["case.json"]
    mtime = os.path.getmtime(png)
    with open(os.path.join(cache, "records.json"), encoding="utf-8") as f:
        first = f.read()

    s2 = prepare_kits19(str(root), cache)  # nothing changed: no NIfTI decoded, same output
    assert s2["decoded"] == 0 and os.path.getmtime(png) == mtime
    with open(os.path.join(cache, "records.json"), encoding="utf-8") as f:
        assert f.read() == first

    train, test = load_kits19_dicts(cache, "train"), load_kits19_dicts(cache, "test")
    train_cases = {r["case"][:10] for r in train}
    test_cases = {r["case"][:10] for r in test}
    assert (len(train_cases), len(test_cases)) == (4, 1) and not train_cases & test_cases
    assert (sorted(train_cases), sorted(test_cases)) == split_cases(
        [f"case_{i:05d}" for i in range(5)]
    )
    for r in train + test:
        assert (
            os.path.isfile(r["file_name"])
            and r["file_name"] == f"{r['slice_dir']}/{r['slice_idx']:03d}.png"
        )
        assert [a["bbox"] for a in r["annotations"]] == EXPECTED[r["slice_idx"]]
        assert r["annotations"][0]["bbox_mode"] == BoxMode.XYXY_ABS

    margin = str(tmp_path / "cache_margin")  # only slices within 3 mm of tumour slices (2..3 +- 1)
    prepare_kits19(str(root), margin, margin_mm=3.0)
    expected = [f"{z:03d}.png" for z in range(1, 5)] + ["case.json"]
    assert sorted(os.listdir(os.path.join(margin, "case_00000"))) == expected
    assert load_kits19_dicts(margin, "test")[0]["slice_range"] == (1, 4)


def test_register_and_missing_cache_message(tmp_path):
    hu, seg = make_volume()
    for i in range(2):
        write_case(str(tmp_path / "data" / f"case_{i:05d}"), hu, seg)
    names = register_kits19(str(tmp_path), prefix="kits19_unit")
    assert names == ["kits19_unit_train", "kits19_unit_test"]
    meta = MetadataCatalog.get("kits19_unit_train")
    assert meta.thing_classes == ["lesion"] and meta.evaluator_type == "lesion"
    with pytest.raises(
        FileNotFoundError, match=r"python -m elixir_d2.data.kits19 --root .* --cache .*cache"
    ):
        DatasetCatalog.get("kits19_unit_train")
    prepare_kits19(str(tmp_path), str(tmp_path / "cache"))
    assert (
        len(DatasetCatalog.get("kits19_unit_train")) == 2
        and len(DatasetCatalog.get("kits19_unit_test")) == 2
    )
    with open(tmp_path / "cache" / "records.json", encoding="utf-8") as f:
        assert json.load(f)["cases"] == ["case_00000", "case_00001"]
