"""Caches and generated sets appear whole or not at all (issue 17 point 6), and the synthetic set
is generated on first use, once, when two processes start together (issue 13 point 6)."""

import filecmp
import json
import os
import subprocess
import sys
import time

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from elixir_d2.atomic_io import MARKER, read_marker
from elixir_d2.data import register_all, synthetic_first_use
from elixir_d2.data import synthetic as synthetic_mod
from elixir_d2.data.kits19 import load_kits19_dicts, prepare_kits19
from elixir_d2.data.synthetic import generate_deeplesion

from test_kits19 import make_volume, write_case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_patients=4, slices_per_series=(6, 8), keys_per_series=(1, 2), image_size=64)


def _kits_root(tmp_path, n=2):
    hu, seg = make_volume()
    root = tmp_path / "kits19"
    for i in range(n):
        write_case(str(root / "data" / f"case_{i:05d}"), hu, seg)
    return str(root)


# ----------------------------------------------------------------------------- KiTS19 cache
def test_truncated_case_json_is_rebuilt_not_trusted(tmp_path):
    root, cache = _kits_root(tmp_path), str(tmp_path / "cache")
    prepare_kits19(root, cache)
    meta = os.path.join(cache, "case_00001", "case.json")
    with open(meta, "rb") as f:
        data = f.read()
    with open(meta, "wb") as f:  # a write killed half way
        f.write(data[: len(data) // 2])
    s = prepare_kits19(root, cache)
    assert s["decoded"] == 1 and s["tumour_slices"] == 4
    with open(meta, encoding="utf-8") as f:
        assert json.load(f)["records"][0]["slice_idx"] == 2


def test_truncated_png_is_rebuilt_not_trusted(tmp_path):
    root, cache = _kits_root(tmp_path), str(tmp_path / "cache")
    prepare_kits19(root, cache)
    png = os.path.join(cache, "case_00000", "003.png")
    size = os.path.getsize(png)
    with open(png, "r+b") as f:
        f.truncate(size // 2)
    assert prepare_kits19(root, cache)["decoded"] == 1
    assert os.path.getsize(png) == size


def test_source_rewritten_within_the_same_second_is_decoded_again(tmp_path):
    root, cache = _kits_root(tmp_path), str(tmp_path / "cache")
    prepare_kits19(root, cache)
    img = os.path.join(root, "data", "case_00000", "imaging.nii.gz")
    st = os.stat(img)
    # Same size, same whole second: only the nanoseconds (as a rewrite within that second) differ.
    os.utime(
        img,
        ns=(st.st_atime_ns, st.st_mtime_ns - st.st_mtime_ns % 10**9 + (st.st_mtime_ns + 1) % 10**9),
    )
    assert int(os.stat(img).st_mtime) == int(st.st_mtime)
    assert prepare_kits19(root, cache)["decoded"] == 1


def test_two_concurrent_prepare_runs_decode_each_case_once(tmp_path):
    root, cache = _kits_root(tmp_path, n=3), str(tmp_path / "cache")
    code = (
        "import json, sys; from elixir_d2.data.kits19 import prepare_kits19; "
        "print(json.dumps(prepare_kits19(sys.argv[1], sys.argv[2])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, root, cache], cwd=REPO, stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [
        json.loads(p.communicate(timeout=120)[0].decode().strip().splitlines()[-1]) for p in procs
    ]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["decoded"] for o in outs) == [0, 3]  # the second waited, then reused all 3
    assert len(load_kits19_dicts(cache, "train")) + len(load_kits19_dicts(cache, "test")) == 6
    assert not [e for e in os.listdir(cache) if ".tmp-" in e]


# ----------------------------------------------------------------------------- generated sets
def test_interrupted_regeneration_leaves_the_old_set_whole(tmp_path, monkeypatch):
    out, ref = str(tmp_path / "set"), str(tmp_path / "ref")
    generate_deeplesion(out, seed=3, **TINY)
    generate_deeplesion(ref, seed=3, **TINY)
    calls = []
    real = synthetic_mod._write_png

    def dying_write(arr, path):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt  # pre-empted half way through the new set
        real(arr, path)

    monkeypatch.setattr(synthetic_mod, "_write_png", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate_deeplesion(out, seed=4, **TINY)
    files = [
        os.path.relpath(os.path.join(d, n), ref) for d, _, names in os.walk(ref) for n in names
    ]
    _, mismatch, errors = filecmp.cmpfiles(ref, out, files, shallow=False)
    assert not mismatch and not errors and len(files) > 20
    assert read_marker(out)["options"]["seed"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ref", "set"]  # the temporary folder went too


def test_marker_records_options_seed_and_counts(tmp_path):
    s = generate_deeplesion(str(tmp_path / "s"), seed=5, **TINY)
    m = read_marker(str(tmp_path / "s"))
    assert m["generator"] == "deeplesion"
    assert m["options"]["seed"] == 5 and m["options"]["num_patients"] == 4
    # a default
    assert m["options"]["slices_per_series"] == [6, 8] and m["options"]["noisy_fraction"] == 0.03
    assert m["result"]["splits"] == json.loads(json.dumps(s["splits"]))
    assert s["out_dir"] == str(tmp_path / "s")


def test_paper_quick_kits19_with_only_a_first_case_is_regenerated(tmp_path, monkeypatch):
    import common

    base = tmp_path / "synthetic_kits19"
    hu, seg = make_volume()
    # what an interrupted generate_kits19 leaves
    write_case(str(base / "data" / "case_00000"), hu, seg)
    monkeypatch.setattr(
        synthetic_first_use,
        "FIRST_USE_OPTIONS",
        {"seed": 0, "num_cases": 2, "image_size": 64, "num_slices": (16, 18)},
    )
    src = common.prepare_data("kits19", str(tmp_path), quick=True)
    assert sorted(os.listdir(base / "data")) == ["case_00000", "case_00001"]
    assert read_marker(str(base))["result"]["num_cases"] == 2
    with open(os.path.join(src.path, "records.json"), encoding="utf-8") as f:
        assert json.load(f)["cases"] == ["case_00000", "case_00001"]


# ----------------------------------------------------------------------------- first use
def test_synthetic_dataset_is_generated_on_first_load(tmp_path, monkeypatch):
    for name in [n for n in DatasetCatalog.list() if n.startswith("synthetic_")]:
        monkeypatch.delitem(DatasetCatalog.data, name)  # both restored after the test
        monkeypatch.delitem(MetadataCatalog.data, name, raising=False)
    monkeypatch.setattr(synthetic_first_use, "FIRST_USE_OPTIONS", dict(seed=0, **TINY))
    register_all(str(tmp_path))
    assert not (tmp_path / "synthetic").exists()  # registering reads nothing
    recs = DatasetCatalog.get("synthetic_train")
    summary = read_marker(str(tmp_path / "synthetic"))["result"]
    assert len(recs) == summary["splits"]["train"]["key_slices"] > 0
    assert len(DatasetCatalog.get("synthetic_test")) == summary["splits"]["test"]["key_slices"]
    assert read_marker(str(tmp_path / "synthetic"))["options"]["seed"] == 0


_RACER = """
import os, sys, time
from elixir_d2.data.synthetic_first_use import ensure_synthetic
go = sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
s = ensure_synthetic(sys.argv[1], seed=0, num_patients=4, slices_per_series=(6, 8),
                     keys_per_series=(1, 2), image_size=64)
print("GENERATED" if s else "REUSED", flush=True)
"""


def test_two_processes_starting_together_generate_once(tmp_path):
    out, go = str(tmp_path / "synthetic"), str(tmp_path / "go")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, out, go], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:  # both imported and waiting: released together
        assert p.stdout.readline().strip() == "ready"
    open(go, "w", encoding="utf-8").close()
    t0 = time.time()
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs) and time.time() - t0 < 120
    assert results == ["GENERATED", "REUSED"]
    ref = str(tmp_path / "ref")
    generate_deeplesion(ref, seed=0, **TINY)
    assert filecmp.cmp(
        os.path.join(ref, "DL_info.csv"), os.path.join(out, "DL_info.csv"), shallow=False
    )
    assert filecmp.cmp(os.path.join(ref, MARKER), os.path.join(out, MARKER), shallow=False)
    assert sorted(os.listdir(tmp_path)) == [".synthetic.lock", "go", "ref", "synthetic"]
