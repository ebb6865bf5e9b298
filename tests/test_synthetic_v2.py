"""The second synthetic generator (elixir_d2.data.synthetic_v2): a small set read back through the
project's loader and measured from its PNGs with cv2; determinism by seed; the synthetic_v2_* and
synthetic_seed7_* names generated on first use in a child process."""

import csv
import filecmp
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from elixir_d2.data.deeplesion import load_deeplesion_dicts
from elixir_d2.data.synthetic_v2 import generate_deeplesion_v2
from elixir_d2.data.synthetic_v2.series import make_series

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SIZE = 128
KW = dict(num_patients=8, image_size=SIZE, slices_per_series=(6, 8), seed=3)


def floats(text):
    return [float(v) for v in text.split(",")]


def read_hu(out, file_name):
    img = cv2.imread(
        os.path.join(out, "Images_png", file_name[:12], file_name[13:]), cv2.IMREAD_UNCHANGED
    )
    assert img is not None and img.dtype == np.uint16, file_name
    return img.astype(np.float64) - 32768


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("v2") / "set")
    summary = generate_deeplesion_v2(out, **KW)
    with open(os.path.join(out, "DL_info.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, summary, rows


def test_csv_loads_through_the_project_loader_with_the_right_counts(dataset):
    out, summary, rows = dataset
    for split, code in (("train", "1"), ("val", "2"), ("test", "3")):
        mine = [r for r in rows if r["Train_Val_Test"] == code]
        records = load_deeplesion_dicts(out, split)
        assert len(records) == len({r["File_name"] for r in mine}) > 0, split
        assert sum(len(r["annotations"]) for r in records) == len(mine)
        assert len({r["Patient_index"] for r in mine}) <= summary["splits"][split]["patients"]
        for rec in records:
            assert os.path.isfile(rec["file_name"]) and rec["height"] == rec["width"] == SIZE
            lo, hi = rec["slice_range"]
            # every slice of the series is on disk, key slices keep two neighbours each side
            assert all(
                os.path.isfile(os.path.join(rec["slice_dir"], f"{k:03d}.png"))
                for k in range(lo, hi + 1)
            )
            assert lo + 2 <= rec["slice_idx"] <= hi - 2


def test_boxes_hold_hypo_and_hyperdense_lesions_measurable_in_the_png(dataset):
    out, _, rows = dataset
    signs = []
    for r in rows:
        if r["Possibly_noisy"] == "1":  # shifted off its lesion on purpose
            continue
        hu = read_hu(out, r["File_name"])
        x1, y1, x2, y2 = (v - 1 for v in floats(r["Bounding_boxes"]))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        a, b = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
        ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
        e = ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2
        inner = e <= 1
        if not inner.any():
            inner[int(cy), int(cx)] = True
        grow = 1 + max(3, a, b) / max(a, b)
        ring = (((xs - cx) / (a * grow + 1)) ** 2 + ((ys - cy) / (b * grow + 1)) ** 2 <= 1) & (
            ((xs - cx) / (a + 1)) ** 2 + ((ys - cy) / (b + 1)) ** 2 > 1
        )
        diff = hu[inner].mean() - hu[ring].mean()
        assert abs(diff) >= 10, (r["File_name"], r["Bounding_boxes"], diff)
        signs.append(np.sign(diff))
    assert signs.count(-1) >= 2 and signs.count(1) >= 2, signs


def test_sizes_spacings_and_slice_intervals_in_their_ranges(dataset):
    _, _, rows = dataset
    for r in rows:
        long_px, short_px = floats(r["Lesion_diameters_Pixel_"])
        sx, sy, interval = floats(r["Spacing_mm_px_"])
        assert sx == sy and 0.6 <= sx * SIZE / 512 <= 1.0, r["Spacing_mm_px_"]
        assert 1.0 <= interval <= 5.0
        assert 3.0 <= long_px * sx <= 30.0 and 0 < short_px <= long_px
        x1, y1, x2, y2 = floats(r["Bounding_boxes"])
        # the tight box of the section: its diagonal bounds the long diameter
        assert long_px <= np.hypot(x2 - x1, y2 - y1) + 1e-6
        assert max(x2 - x1, y2 - y1) <= long_px + 0.5
        recist = floats(r["Measurement_coordinates"])
        assert np.hypot(recist[2] - recist[0], recist[3] - recist[1]) == pytest.approx(
            long_px, abs=0.01
        )


def test_splits_disjoint_by_patient_and_types_as_deeplesion(dataset):
    _, summary, rows = dataset
    patients = {s: {r["Patient_index"] for r in rows if r["Train_Val_Test"] == s} for s in "123"}
    assert not (
        patients["1"] & patients["2"]
        or patients["1"] & patients["3"]
        or patients["2"] & patients["3"]
    )
    # 8 patients, val 10 % and test 25 %: one and two patients
    assert [summary["splits"][s]["patients"] for s in ("train", "val", "test")] == [5, 1, 2]
    for r in rows:
        t = int(r["Coarse_lesion_type"])
        assert t == -1 if r["Train_Val_Test"] == "1" else 1 <= t <= 8


def test_mimics_are_present_and_not_annotated(dataset):
    out, summary, rows = dataset
    assert sum(sum(s["mimics"].values()) for s in summary["splits"].values()) > 0
    # Rebuild a training patient's series as the writer does (train steers no lesion types):
    # mimics cross its key slices outside every annotated box there.
    pat = min(int(r["Patient_index"]) for r in rows if r["Train_Val_Test"] == "1")
    rng = np.random.default_rng([KW["seed"], 7003, pat])
    ser = make_series(rng, SIZE, KW["slices_per_series"], (3, 6), [])
    assert {k + 1 for k in ser["keys"]} <= {
        int(r["Key_slice_index"]) - int(floats(r["Slice_range"])[0]) + 1
        for r in rows
        if r["Patient_index"] == str(pat)
    }
    outside = 0
    for k, secs in ser["keys"].items():
        boxes = [s["box"] for _, s in secs]
        for st in ser["structures"]:
            box = st.shape.bbox(ser["z_mm"][k]) if st.mimic else None
            if box is None:
                continue
            cx = (box[0] + box[2]) / 2 / ser["spacing"] + SIZE / 2
            cy = (box[1] + box[3]) / 2 / ser["spacing"] + SIZE / 2
            outside += all(not (b[0] <= cx <= b[2] and b[1] <= cy <= b[3]) for b in boxes)
    assert outside > 0


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(num_patients=3, image_size=64, slices_per_series=(5, 6))
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_deeplesion_v2(a, seed=11, **kw)
    generate_deeplesion_v2(b, seed=11, **kw)
    generate_deeplesion_v2(c, seed=12, **kw)

    def files(d):
        return sorted(os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs)

    assert files(a) == files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, files(a), shallow=False)
    assert not mismatch and not errors and len(match) == len(files(a))
    assert not filecmp.cmp(
        os.path.join(a, "DL_info.csv"), os.path.join(c, "DL_info.csv"), shallow=False
    )


_CHILD = """
import json, os
from elixir_d2.data import synthetic_first_use
# a small set for the test; the registration's seeds still apply
synthetic_first_use.FIRST_USE_OPTIONS.update(num_patients=4, image_size=64,
                                             slices_per_series=(5, 6))
from detectron2.data import DatasetCatalog
out = {n: len(DatasetCatalog.get(n)) for n in ("synthetic_v2_test", "synthetic_seed7_test")}
print(json.dumps(out))
"""


def test_names_registered_and_generated_on_first_use(tmp_path):
    datasets = tmp_path / "datasets"
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, generator, seed in (
        ("synthetic_v2", "deeplesion_v2", 0),
        ("synthetic_seed7", "deeplesion", 7),
    ):
        with open(datasets / name / ".complete.json", encoding="utf-8") as f:
            marker = json.load(f)
        assert marker["generator"] == generator and marker["options"]["seed"] == seed
        with open(datasets / name / "DL_info.csv", encoding="utf-8", newline="") as f:
            keys = {r["File_name"] for r in csv.DictReader(f) if r["Train_Val_Test"] == "3"}
        assert loaded[f"{name}_test"] == len(keys) > 0
    assert not (datasets / "synthetic").exists()  # only the names loaded were generated
