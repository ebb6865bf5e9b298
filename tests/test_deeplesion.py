"""DL_info.csv parsing, file-name mapping, grouping by key slice, box convention, errors."""

import numpy as np
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from elixir_d2.data.deeplesion import (
    LOAD_STATS,
    DeepLesionFormatError,
    load_deeplesion_dicts,
    read_dl_info,
    register_deeplesion,
    series_dir_and_slice,
)

from conftest import dl_row, write_dl_info, write_slice

BLANK = np.zeros((64, 64))


def test_file_name_to_folder_and_slice():
    assert series_dir_and_slice("000001_01_01_109.png") == ("000001_01_01", 109)
    assert series_dir_and_slice("004427_03_02_007.png") == ("004427_03_02", 7)
    with pytest.raises(DeepLesionFormatError, match="not of the form"):
        series_dir_and_slice("scan.png")


def test_parse_all_columns_and_box_minus_one(dl_root):
    csv_path = write_dl_info(
        dl_root, [dl_row(box=(11.5, 21, 31, 41.25), lesion_type=4, noisy=1, split=2)]
    )
    (les,) = read_dl_info(csv_path)
    assert les["bbox"] == [10.5, 20.0, 30.0, 40.25]  # DL_info minus 1
    assert les["series_dir"] == "000001_01_01" and les["name_slice"] == 5 and les["key_slice"] == 5
    assert les["lesion_type"] == 4 and les["noisy"] is True and les["split"] == 2
    assert les["spacing"] == [0.8, 0.8, 2.0] and les["slice_range"] == (1, 9)
    assert les["size"] == (64, 64) and les["hu_window"] == (-175.0, 275.0)
    assert les["recist"] == [12, 22, 30, 40, 14, 38, 28, 24]
    assert les["location"] == [0.3, 0.4, 0.5] and les["diameter_px"] == [25.4, 19.8]
    assert (les["patient"], les["study"], les["series"]) == (1, 1, 1)


def test_grouping_one_record_per_key_slice(dl_root):
    rows = [
        dl_row("000001_01_01_005.png", box=(11, 11, 21, 21), split=3),
        dl_row("000002_01_01_003.png", box=(5, 5, 9, 9), split=3),
        dl_row("000001_01_01_005.png", box=(31, 31, 41, 46), split=3, noisy=1),
        dl_row("000003_01_01_004.png", split=1),  # train: not in test
    ]
    write_dl_info(dl_root, rows)
    write_slice(dl_root, "000001_01_01", 5, BLANK)
    write_slice(dl_root, "000002_01_01", 3, BLANK)
    recs = load_deeplesion_dicts(dl_root, "test")
    assert [r["case"] for r in recs] == ["000001_01_01_005", "000002_01_01_003"]
    r0 = recs[0]
    assert r0["file_name"].endswith("Images_png/000001_01_01/005.png")
    assert r0["slice_dir"].endswith("Images_png/000001_01_01") and r0["slice_idx"] == 5
    assert [a["bbox"] for a in r0["annotations"]] == [[10, 10, 20, 20], [30, 30, 40, 45]]
    assert [a["noisy"] for a in r0["annotations"]] == [False, True]
    assert all(a["category_id"] == 0 for a in r0["annotations"])
    # diameters in mm = pixels x spacing (0.8 mm)
    assert r0["annotations"][0]["diameter_mm"] == pytest.approx((25.4 * 0.8, 19.8 * 0.8))
    assert r0["slice_intv"] == 2.0 and r0["spacing"] == 0.8
    assert len({r["image_id"] for r in recs}) == 2


def test_typed_split_uses_lesion_type_as_category(dl_root):
    write_dl_info(
        dl_root,
        [dl_row(lesion_type=5, split=2), dl_row(lesion_type=1, split=2, box=(40, 40, 50, 50))],
    )
    write_slice(dl_root, "000001_01_01", 5, BLANK)
    (rec,) = load_deeplesion_dicts(dl_root, "val", typed=True)
    assert [a["category_id"] for a in rec["annotations"]] == [4, 0]
    with pytest.raises(ValueError, match="no lesion types"):
        load_deeplesion_dicts(dl_root, "train", typed=True)


def test_missing_key_slice_is_counted_not_silent(dl_root, caplog):
    write_dl_info(dl_root, [dl_row("000001_01_01_005.png"), dl_row("000009_01_01_002.png")])
    write_slice(dl_root, "000001_01_01", 5, BLANK)
    recs = load_deeplesion_dicts(dl_root, "test")
    assert len(recs) == 1
    assert LOAD_STATS[(dl_root, "test", False)]["missing_key_slice"] == 1
    assert "skipped 1 of 2 key slices" in caplog.text


@pytest.mark.parametrize(
    "over, column",
    [
        ({"Bounding_boxes": "1, 2, 3"}, "Bounding_boxes"),
        ({"Bounding_boxes": "30, 20, 10, 40"}, "Bounding_boxes"),
        ({"Spacing_mm_px_": "0.8, abc, 1"}, "Spacing_mm_px_"),
        ({"Coarse_lesion_type": "12"}, "Coarse_lesion_type"),
        ({"Train_Val_Test": "7"}, "Train_Val_Test"),
        ({"Possibly_noisy": "yes"}, "Possibly_noisy"),
        ({"File_name": "bad.png"}, "File_name"),
    ],
)
def test_malformed_row_names_file_row_and_column(dl_root, over, column):
    path = write_dl_info(dl_root, [dl_row(), dl_row(**over)])
    with pytest.raises(DeepLesionFormatError) as e:
        read_dl_info(path)
    assert path in str(e.value) and "row 3" in str(e.value) and column in str(e.value)


def test_headerless_or_missing_columns(dl_root):
    path = write_dl_info(
        dl_root, [dl_row()], columns=[c for c in dl_row() if c != "Spacing_mm_px_"]
    )
    with pytest.raises(DeepLesionFormatError, match="Spacing_mm_px_"):
        read_dl_info(path)


def test_missing_csv_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="DL_info.csv"):
        load_deeplesion_dicts(str(tmp_path), "test")


def test_registration_names_and_metadata(dl_root):
    write_dl_info(dl_root, [dl_row(lesion_type=3, split=3)])
    write_slice(dl_root, "000001_01_01", 5, BLANK)
    names = register_deeplesion(dl_root, prefix="unittest_dl")
    assert set(names) == {
        f"unittest_dl_{s}" for s in ("train", "val", "test", "val_typed", "test_typed")
    }
    assert MetadataCatalog.get("unittest_dl_test").thing_classes == ["lesion"]
    assert len(MetadataCatalog.get("unittest_dl_test_typed").thing_classes) == 8
    assert MetadataCatalog.get("unittest_dl_test").evaluator_type == "lesion"
    assert DatasetCatalog.get("unittest_dl_test_typed")[0]["annotations"][0]["category_id"] == 2
