"""predict_net.py over several processes (--num-gpus 2: CPU processes over gloo here): the same
bytes as one process, a rank killed with SIGKILL then --resume, refusals said once, and the
round-robin split of the cases."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from elixir_d2.inference.runner import CASE_MARKER
from elixir_d2.inference.sharding import shard_indices

import predict_net
from reliability_helpers import REPO
from test_predict_io import phantom, write_nifti
from test_predict_net import FAST, fpn_weights  # noqa: F401  (fixture)

QS = "configs/quickstart/fpn.yaml"


def _cli(scans, out, weights, *extra, fast=True):
    return [
        "--config-file",
        QS,
        "--weights",
        weights,
        "--input",
        str(scans),
        "--output",
        str(out),
        "--score-thresh",
        "0.0",
        "--no-progress",
        *extra,
    ] + (FAST if fast else [])


def _scans(folder, n, slices=6, size=48):
    folder.mkdir()
    for i in range(n):
        # a different lesion in each case, so that a case written under another case's name shows
        vol = phantom(slices=slices, size=size, lesion=(1, slices - 1, 8 + i, 20 + i, 10, 24 + i))
        write_nifti(folder / f"case{i}.nii.gz", vol, spacing=(0.8, 0.8, 2.5))
    return folder


def _tree(folder):
    """Every file under ``folder`` with its bytes; summary.json without its timing."""
    files = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            rel = os.path.relpath(path, folder)
            if rel == "summary.json":
                doc = json.load(open(path, encoding="utf-8"))
                doc.pop("timing_s")
                files[rel] = json.dumps(doc, sort_keys=True).encode()
            else:
                files[rel] = open(path, "rb").read()
    return files


def _finished(out):
    # A case folder gets its marker before the rename from its temporary (dot) name: not done yet.
    return sorted(
        e
        for e in os.listdir(out)
        if not e.startswith(".") and os.path.isfile(os.path.join(out, e, CASE_MARKER))
    )


@pytest.mark.parametrize(
    "num_cases,world,expected",
    [
        (5, 2, [[0, 2, 4], [1, 3]]),
        (3, 4, [[0], [1], [2], []]),
        (6, 3, [[0, 3], [1, 4], [2, 5]]),
    ],
)
def test_round_robin_split_covers_every_case_once(num_cases, world, expected):
    assert [shard_indices(num_cases, world, r) for r in range(world)] == expected


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not one of the 2"):
        shard_indices(4, 2, 2)


def test_two_processes_write_the_bytes_of_one(tmp_path, fpn_weights, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks sum floats as this process does
    scans = _scans(tmp_path / "scans", 5)  # odd: the ranks get 3 and 2 cases
    gt = tmp_path / "gt.json"  # the FROC is merged too
    gt.write_text(
        json.dumps({f"case{i}": {"3": [[10, 8 + i, 24 + i, 20 + i]]} for i in range(5)}),
        encoding="utf-8",
    )
    ref, two = tmp_path / "one", tmp_path / "two"
    assert predict_net.main(_cli(scans, ref, fpn_weights, "--gt", str(gt))) == 0
    assert predict_net.main(_cli(scans, two, fpn_weights, "--gt", str(gt), "--num-gpus", "2")) == 0
    one_files, two_files = _tree(ref), _tree(two)
    assert sorted(two_files) == sorted(one_files)
    for rel, data in one_files.items():
        assert two_files[rel] == data, rel
    summary = json.load(open(two / "summary.json", encoding="utf-8"))
    assert [c["case"] for c in summary["cases"]] == [f"case{i}" for i in range(5)]
    assert summary["timing_s"]["processes"] == 2
    assert summary["froc"]["num_gt"] == 5


def test_a_refusal_is_said_once_with_exit_code_2(tmp_path, fpn_weights, capfd):  # noqa: F811
    scans = _scans(tmp_path / "scans", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file", encoding="utf-8")
    assert predict_net.main(_cli(scans, out, fpn_weights, "--num-gpus", "2")) == 2
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "is not empty" in errors[0] and "--resume" in errors[0], err
    assert (out / "mine.txt").read_text(encoding="utf-8") == "a user's file"


def test_bad_process_counts_are_refused(tmp_path, fpn_weights, capsys):  # noqa: F811
    with pytest.raises(predict_net.UserInputError, match="--machine-rank 2"):
        predict_net.main(
            _cli(
                tmp_path, tmp_path / "o", fpn_weights, "--num-machines", "2", "--machine-rank", "2"
            )
        )


def _rank_pids(parent: int):
    """The spawned rank processes of ``parent`` (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            pids.append(pid)
    return pids


def test_a_rank_killed_then_resume_ends_like_an_uninterrupted_run(tmp_path, fpn_weights):  # noqa: F811
    # Cases big enough (and every slice drawn) that each rank has cases left when the first one
    # is complete, however fast the machine.
    scans = _scans(tmp_path / "scans", 10, slices=8, size=96)
    slow = ["--overlays", "all"]
    out, ref = tmp_path / "out", tmp_path / "ref"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "predict_net.py"] + _cli(
        scans, out, fpn_weights, *slow, "--num-gpus", "2", fast=False
    )
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not (out.is_dir() and _finished(out)) and proc.poll() is None:
        assert time.monotonic() < deadline, "no case finished"
        time.sleep(0.005)
    ranks = _rank_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, err[-2000:]
    done = _finished(out)
    assert 1 <= len(done) < 10, err[-2000:]
    assert not (out / "summary.json").exists()

    assert (
        subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True).returncode == 0
    )
    assert _finished(out) == [f"case{i}" for i in range(10)]
    assert (
        subprocess.run(
            [sys.executable, "predict_net.py"] + _cli(scans, ref, fpn_weights, *slow, fast=False),
            cwd=REPO,
            env=env,
            capture_output=True,
        ).returncode
        == 0
    )
    got, want = _tree(out), _tree(ref)
    assert sorted(got) == sorted(want)
    for rel, data in want.items():
        assert got[rel] == data, rel


# ----------------------------------------------------------------- throughput benchmark script
def _throughput():
    sys.path.insert(0, os.path.join(REPO, "projects", "benchmarks"))
    import predict_throughput

    return predict_throughput


def test_throughput_table_arithmetic():
    bench = _throughput()
    steps = {"read_inputs": 2.0, "prepare_inputs": 1.0, "model_forward": 6.0, "write_outputs": 1.0}
    runs = [
        {"processes": 1, "wall_s": 60.0, "cases": 10, "timing_s": {**steps, "total": 50.0}},
        {"processes": 2, "wall_s": 32.0, "cases": 10, "timing_s": {**steps, "total": 25.0}},
    ]
    rows = bench.report(runs, "cpu").splitlines()[3:]
    # 10 cases in 60 s = 10/min, 12/min after loading; 10 in 32 s = 18.75/min, 1.875x
    assert rows[0] == "| 1 | 60.0 | 10.0 | 12.0 | 1.00x | 20% | 10% | 60% | 10% |"
    assert rows[1] == "| 2 | 32.0 | 18.8 | 24.0 | 1.88x | 20% | 10% | 60% | 10% |"


def test_throughput_script_runs_one_and_two_processes(tmp_path):
    runs = _throughput().main(
        [
            "--cases",
            "3",
            "--slices",
            "4",
            "--size",
            "64",
            "--device",
            "cpu",
            "--output",
            str(tmp_path),
        ]
    )
    assert [r["processes"] for r in runs] == [1, 2] and [r["cases"] for r in runs] == [3, 3]
    for r in runs:
        assert r["timing_s"]["processes"] == r["processes"]
        assert all(r["timing_s"][k] > 0 for k in ("read_inputs", "model_forward", "write_outputs"))
    # the two runs predicted the same detections
    assert (tmp_path / "out_1" / "detections.csv").read_bytes() == (
        tmp_path / "out_2" / "detections.csv"
    ).read_bytes()
