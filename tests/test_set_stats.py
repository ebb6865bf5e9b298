"""set_stats.py's Markdown table: one cell per column in every row, values formatted as the header
says."""

import set_stats


def test_table_rows_and_separator_have_the_header_s_cells():
    stats = {
        "patients": 3,
        "key_slices": 5,
        "lesions": 7,
        "long_mm_q": [8.04, 15.5, 24.36],
        "long_px_q": [4.4, 8.3, 13.0],
        "under_10mm": 0.171,
        "abs_contrast_hu_median": 121.6,
        "contrast_hu_q": [-153.2, 101.0, 684.6],
        "hypodense": 0.29,
        "spots_per_key_slice": 17.04,
        "mimics": None,
    }
    lines = set_stats.table(
        {"synthetic": {"val": stats}, "synthetic_v2": {"test": {**stats, "mimics": 12}}}
    ).split("\n")
    cells = [line.count("|") - 1 for line in lines]
    assert cells == [13, 13, 13, 13]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    assert lines[2] == (
        "| synthetic | val | 3 | 5 | 7 | 8.0/15.5/24.4 | 4.4/8.3/13.0 | 17% | "
        "122 | -153/101/685 | 29% | 17.0 | - |"
    )
    assert lines[3].endswith("| 17.0 | 12 |")
