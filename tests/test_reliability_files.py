"""Files, entry points and resume (issue 33 points 1, 7, 8, 9, 10, 11, 13): file names of any bytes,
configs that are not mappings, weights that are not checkpoints, --overwrite and user files,
symbolic links, forged log lines, and an interrupted predict_net.py run finished with --resume."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_untrusted_scans import run

from detectron2.modeling import build_model

from elixir_d2.atomic_io import tmp_name
from elixir_d2.checkpoint import AtomicCheckpointer
from elixir_d2.cli import run_cli
from elixir_d2.commands import train as train_cmd
from elixir_d2.inference.runner import CASE_MARKER

import predict_net
from test_predict_io import phantom, write_dicom_series, write_nifti
from test_predict_net import FAST, fpn_weights, quickstart_cfg  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "configs/quickstart/fpn.yaml"


def _one_line_exit_2(capsys, main, *args, prog):
    """Run ``main`` under run_cli: exit code 2 and exactly one stderr line, returned."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, *args, prog=prog)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err.strip()


# ----------------------------------------------------------------------------- 1: non-UTF-8 names
def test_file_names_that_are_not_utf8_fail_their_case_only(tmp_path):
    """ITK aborts the process (SIGABRT) on such a name: the run must refuse that case itself.
    Run in a subprocess so the unfixed code's abort cannot take pytest down."""
    scans = tmp_path / "scans"
    scans.mkdir()
    good = write_nifti(scans / "good.nii.gz", phantom(slices=3))
    shutil.copy(good, os.fsencode(scans) + b"/bad\xff.nii.gz")
    series = write_dicom_series(scans / "series", phantom(slices=3)) or str(scans / "series")
    first = sorted(os.listdir(series))[0]
    os.rename(os.path.join(series, first), os.fsencode(series) + b"/slice\xfe.dcm")
    out = tmp_path / "out"
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_untrusted_scans import run; "
        f"run({str(scans)!r}, {str(out)!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.load(open(out / "summary.json", encoding="utf-8"))
    assert [c["case"] for c in summary["cases"]] == ["good"]
    failed = {f["path"]: f["error"] for f in summary["failed"]}
    assert set(failed) == {"bad\\xff.nii.gz", "series"}
    assert "bad\\xff.nii.gz: file name is not valid UTF-8" in failed["bad\\xff.nii.gz"]
    assert "slice\\xfe.dcm in the series is not valid UTF-8" in failed["series"]


# ----------------------------------------------------------------------------- 7: configs
@pytest.mark.parametrize(
    "text,expected",
    [
        ("- MODEL\n- SOLVER\n", "expected a mapping of config keys, got a list"),
        ("5\n", "expected a mapping of config keys, got a number (5)"),
        ("", "empty config file"),
        ("MODEL: 5\n", "MODEL must be a mapping of config keys, got 5"),
        ("_BASE_: /etc/passwd\n", "_BASE_ /etc/passwd: expected a mapping of config keys"),
        ("_BASE_: 5\n", "_BASE_ must be a file name"),
    ],
)
def test_configs_that_are_not_mappings_are_one_line(tmp_path, capsys, text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text, encoding="utf-8")
    err = _one_line_exit_2(capsys, train_cmd.cli, ["--config-file", str(cfg)], prog="train_net.py")
    assert err.startswith(f"train_net.py: error: {cfg}") and expected in err, err
    err = _one_line_exit_2(
        capsys,
        predict_net.main,
        ["--config-file", str(cfg), "--input", "x", "--output", "o"],
        prog="predict_net.py",
    )
    assert err.startswith(f"predict_net.py: error: {cfg}") and expected in err, err


def test_a_base_loop_is_one_line(tmp_path):
    from elixir_d2 import load_config
    from elixir_d2.cli import UserInputError

    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"a\.yaml: _BASE_ loop"):
        load_config(str(tmp_path / "a.yaml"))


# ----------------------------------------------------------------------------- 8: weights
def test_text_file_as_weights_is_one_line(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "v.nii.gz", phantom(slices=3))
    weights = tmp_path / "notes.pth"
    weights.write_text("these are not weights\n", encoding="utf-8")
    err = _one_line_exit_2(
        capsys,
        predict_net.main,
        [
            "--config-file",
            QS,
            "--weights",
            str(weights),
            "--input",
            str(scans),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
        + FAST,
        prog="predict_net.py",
    )
    assert f"{weights}" in err and "not a torch.save file" in err, err


def test_last_checkpoint_must_name_a_file_in_the_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last_checkpoint").write_text("../../../../../../etc/passwd", encoding="utf-8")
    model = build_model(quickstart_cfg())
    from elixir_d2.cli import UserInputError

    with pytest.raises(UserInputError, match=r"last_checkpoint names .*passwd.*outside"):
        AtomicCheckpointer(model, save_dir=str(out)).resume_or_load("", resume=True)
    err = _one_line_exit_2(
        capsys,
        train_cmd.cli,
        ["--config-file", QS, "--resume", "OUTPUT_DIR", str(out)],
        prog="train_net.py",
    )
    assert f"{out}/last_checkpoint names" in err and "outside" in err, err


# ----------------------------------------------------------------------------- 9: --overwrite
def test_overwrite_removes_only_this_tools_temporary_entries(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "c1.nii.gz", phantom(slices=3))
    out = tmp_path / "out"
    run(scans, out)
    users = [".notes.tmp-old", ".draft.tmp-2024", ".backup.tmp-host-1-2"]  # file, file, file
    for name in users:
        (out / name).write_text("mine", encoding="utf-8")
    (out / ".photos.tmp-keep").mkdir()
    ours_dir = tmp_name(str(out / "c1"))  # a killed run's case folder
    os.makedirs(ours_dir)
    ours_file = tmp_name(str(out / "summary.json"))
    open(ours_file, "w", encoding="utf-8").write("{")
    run(scans, out, overwrite=True)
    left = set(os.listdir(out))
    assert set(users) | {".photos.tmp-keep"} <= left
    assert os.path.basename(ours_dir) not in left and os.path.basename(ours_file) not in left


# ----------------------------------------------------------------------------- 10: symbolic links
def test_symlinked_folders_are_not_followed_and_nothing_outside_is_listed(tmp_path):
    scans = tmp_path / "data" / "scans"
    (scans / "sub").mkdir(parents=True)
    write_nifti(scans / "good.nii.gz", phantom(slices=3))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_nifti(elsewhere / "secret.nii.gz", phantom(slices=3))
    write_dicom_series(scans / "series", phantom(slices=3))
    os.symlink("/etc", scans / "etc")
    os.symlink("../..", scans / "sub" / "loop")  # back to the input's parent
    os.symlink(elsewhere / "secret.nii.gz", scans / "outside.nii.gz")
    os.symlink("good.nii.gz", scans / "again.nii.gz")  # a link inside the input: followed
    os.symlink(elsewhere / "secret.nii.gz", scans / "series" / "zz.dcm")
    out = tmp_path / "out"
    s = run(scans, out)
    assert sorted(c["case"] for c in s["cases"]) == ["again", "good"]
    assert [(f["case"], "outside the input folder" in f["error"]) for f in s["failed"]] == [
        ("series", True)
    ]
    assert sorted(s["ignored"]) == ["etc", "outside.nii.gz", os.path.join("sub", "loop")]
    text = (out / "summary.json").read_text(encoding="utf-8")
    assert "passwd" not in text and "secret" not in text and ".." not in text


# ----------------------------------------------------------------------------- 11: forged lines
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_newlines_in_file_names_are_escaped_everywhere(tmp_path, capsys, fpn_weights):  # noqa: F811
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "good.nii.gz", phantom(slices=3))
    forged = "x.nii.gz\nWARNING forged line\n.nii.gz"
    (scans / forged).write_bytes(b"not a volume")
    (scans / "notes\nINFO forged.txt").write_text("not CT", encoding="utf-8")
    runner_log = logging.getLogger("elixir_d2.inference")  # runner, case_step and run_files
    handler, level = _Records(), runner_log.level
    runner_log.addHandler(handler)
    runner_log.setLevel(logging.INFO)
    try:
        s = run(scans, tmp_path / "out")
    finally:
        runner_log.removeHandler(handler)
        runner_log.setLevel(level)
    shown = "x.nii.gz\\nWARNING forged line\\n.nii.gz"
    assert s["failed"][0]["path"] == shown
    assert "\n" not in s["failed"][0]["error"] and shown in s["failed"][0]["error"]
    assert s["ignored"] == ["notes\\nINFO forged.txt"]
    assert len(handler.messages) >= 2 and all("\n" not in m for m in handler.messages)
    # predict_net.py prints a missing input named with a newline on one line
    capsys.readouterr()  # what the run above logged
    err = _one_line_exit_2(
        capsys,
        predict_net.main,
        [
            "--config-file",
            QS,
            "--weights",
            fpn_weights,
            "--input",
            str(tmp_path / "no\nerror: forged"),
            "--output",
            str(tmp_path / "o2"),
        ],
        prog="predict_net.py",
    )
    assert "no\\nerror: forged not found" in err


# ----------------------------------------------------------------------------- 13: SIGINT, resume
def _cli(scans, out, weights, *extra):
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
    ] + FAST


def _finished(out):
    # A case folder gets its marker before the rename from its temporary (dot) name: not done yet.
    return sorted(
        e
        for e in os.listdir(out)
        if not e.startswith(".") and os.path.isfile(os.path.join(out, e, CASE_MARKER))
    )


def _mtimes(folder):
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(folder)
        for f in fs
    }


def _without_timing(path):
    doc = json.load(open(path, encoding="utf-8"))
    doc.pop("timing_s")
    return doc


def test_sigint_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, fpn_weights):  # noqa: F811
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(8):
        write_nifti(scans / f"case{i}.nii.gz", phantom(slices=6, size=48), spacing=(0.8, 0.8, 2.5))
    out = tmp_path / "out"
    # predict_net.py as its __main__ runs it, each case held 0.5 s longer: the SIGINT sent after the
    # first case lands while others remain however busy the machine is.
    # Ctrl-C's default handler, as at a terminal: a shell's background job (CI started with &)
    # passes SIGINT on ignored, and Python then installs none.
    slow = (
        "import logging, signal, sys, time; sys.path.insert(0, '.'); import predict_net; "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from elixir_d2.inference.predictor import CTPredictor as P; "
        "from elixir_d2.cli import run_cli; f = P.predict_volume; "
        "P.predict_volume = lambda *a, **k: (f(*a, **k), time.sleep(0.5))[0]; "
        "logging.basicConfig(level=logging.WARNING); run_cli(predict_net.main, "
        "prog='predict_net.py')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", slow] + _cli(scans, out, fpn_weights),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # one thread, as conftest sets for this process: the same float sums
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while not (out.is_dir() and _finished(out)) and proc.poll() is None:
        assert time.monotonic() < deadline, "no case finished"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    done = _finished(out)
    assert 1 <= len(done) < 8, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"predict_net.py: interrupted: {len(done)} of 8 cases done; rerun with --resume"
    )
    assert not (out / "summary.json").exists()

    # Without --resume (or --overwrite) the folder is refused, naming --resume.
    assert predict_net.main(_cli(scans, out, fpn_weights)) == 2
    assert "--resume" in capsys.readouterr().err

    before = {case: _mtimes(out / case) for case in done}
    assert predict_net.main(_cli(scans, out, fpn_weights, "--resume")) == 0
    for case in done:  # the finished cases were verified and kept, not written again
        assert _mtimes(out / case) == before[case], case
    assert len(_finished(out)) == 8

    ref = tmp_path / "ref"
    assert predict_net.main(_cli(scans, ref, fpn_weights)) == 0
    assert _without_timing(out / "summary.json") == _without_timing(ref / "summary.json")
    for name in ("detections.csv", "findings.csv", "coco_results.json", "coco_images.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name

    # A finished case corrupted afterwards (same size) is done again; the others are kept.
    victim = out / done[0] / "detections.csv"
    data = bytearray(victim.read_bytes())
    data[-2] = ord("9") if data[-2] != ord("9") else ord("8")
    victim.write_bytes(bytes(data))
    others = {case: _mtimes(out / case) for case in _finished(out) if case != done[0]}
    assert predict_net.main(_cli(scans, out, fpn_weights, "--resume")) == 0
    assert victim.read_bytes() == (ref / done[0] / "detections.csv").read_bytes()
    assert {case: _mtimes(out / case) for case in others} == others
    assert _without_timing(out / "summary.json") == _without_timing(ref / "summary.json")


def test_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        predict_net.build_parser().parse_args(
            ["--config-file", QS, "--input", "x", "--output", "o", "--resume", "--overwrite"]
        )
    assert "not allowed with argument" in capsys.readouterr().err


def test_model_is_unused_by_resume_of_a_finished_run(tmp_path):
    """--resume over a complete run predicts nothing: every case folder is read back."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        write_nifti(scans / f"{name}.nii.gz", phantom(slices=3))
    out = tmp_path / "out"
    first = run(scans, out)

    class NoModel(torch.nn.Module):
        def forward(self, inputs):
            raise AssertionError("predicted again")

    again = run(scans, out, model=NoModel(), resume=True)
    first.pop("timing_s")
    again.pop("timing_s")
    assert again == first
