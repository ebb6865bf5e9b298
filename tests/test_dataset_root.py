"""A DeepLesion-format set under ``$DETECTRON2_DATASETS/DeepLesion`` is what ``deeplesion_*`` load.

That is the route of real DeepLesion (datasets/README.md) and of the second synthetic set of
docs/results/evidence.md (generator seed 1, "A second synthetic set"); the child process sees
the folder only through the environment variable, as a user's ``train_net.py`` does.
"""

import csv
import json
import os
import subprocess
import sys
from collections import Counter

from elixir_d2.data.synthetic import generate_deeplesion

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

_CHILD = """
import json, os
import elixir_d2  # registers the datasets under $DETECTRON2_DATASETS
from detectron2.data import DatasetCatalog
out = {}
for name in ("deeplesion_train", "deeplesion_test"):
    out[name] = {os.path.basename(r["slice_dir"]) + "_" + os.path.basename(r["file_name"]):
                 len(r["annotations"]) for r in DatasetCatalog.get(name)}
print(json.dumps(out))
"""


def test_deeplesion_names_load_the_set_under_detectron2_datasets(tmp_path):
    datasets = tmp_path / "datasets"
    generate_deeplesion(
        str(datasets / "DeepLesion"),
        num_patients=12,
        image_size=64,
        seed=1,
        slices_per_series=(6, 8),
    )
    # Expected from the CSV itself: lesions per key slice of the train (1) and test (3) splits.
    with open(datasets / "DeepLesion" / "DL_info.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {
        "deeplesion_train": Counter(r["File_name"] for r in rows if r["Train_Val_Test"] == "1"),
        "deeplesion_test": Counter(r["File_name"] for r in rows if r["Train_Val_Test"] == "3"),
    }
    assert expected["deeplesion_train"] and expected["deeplesion_test"]

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
    for name, counts in expected.items():
        assert loaded[name] == dict(counts), name
    # Registration is lazy and names its own folder: the synthetic_* set was not written there.
    assert not (datasets / "synthetic").exists()


_ROOT_CHILD = "from elixir_d2.data import datasets_root; print(datasets_root())"


def _root_seen_from(cwd, env_value=None):
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    env["PYTHONPATH"] = ROOT  # this checkout's package, wherever the child starts
    if env_value is not None:
        env["DETECTRON2_DATASETS"] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", _ROOT_CHILD],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_a_checkout_keeps_its_datasets_whatever_the_working_directory(tmp_path):
    # Without $DETECTRON2_DATASETS, a run started elsewhere reads and writes the checkout's
    # datasets/, not a new ./datasets under its working directory.
    assert _root_seen_from(tmp_path) == os.path.join(ROOT, "datasets")
    assert _root_seen_from(ROOT) == os.path.join(ROOT, "datasets")
    # The variable wins, as in detectron2.
    assert _root_seen_from(tmp_path, str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")


def test_an_installed_package_falls_back_to_detectron2s_default(tmp_path):
    from elixir_d2.data import default_datasets_root

    # No datasets/prepare_deeplesion.py beside the package: not a checkout (e.g. site-packages).
    (tmp_path / "datasets").mkdir()
    assert default_datasets_root(str(tmp_path)) == "datasets"
    assert default_datasets_root(ROOT) == os.path.join(ROOT, "datasets")
