"""Entry points fail with one line naming the file or key and what to do (exit code 2); unexpected
errors keep their traceback."""

import os
import subprocess
import sys

import pytest

from elixir_d2.cli import UserInputError, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "configs/quickstart/fpn.yaml"


def _run(*argv, timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    return proc.returncode, proc.stderr, lines


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            [
                "predict_net.py",
                "--config-file",
                QS,
                "--weights",
                "/nonexistent.pth",
                "--input",
                "x",
                "--output",
                "o",
            ],
            "predict_net.py: error: weights file /nonexistent.pth not found",
        ),
        (
            ["train_net.py", "--config-file", "configs/nope.yaml"],
            "train_net.py: error: config file configs/nope.yaml not found",
        ),
        (
            ["train_net.py", "--config-file", QS, "MODEL.ROI_HEADS.NMS_TRESH_TEST", "0.3"],
            "unknown config key; did you mean MODEL.ROI_HEADS.NMS_THRESH_TEST?",
        ),
        (
            [
                "train_net.py",
                "--config-file",
                "configs/quickstart/alb.yaml",
                "MODEL.ALB.GENOTYPE",
                "nope.yaml",
            ],
            "MODEL.ALB.GENOTYPE: genotype file nope.yaml not found",
        ),
        (
            [
                "train_net.py",
                "--config-file",
                "configs/fpn_R_50_deeplesion.yaml",
                "DATASETS.TRAIN",
                "('deeplesion_trian',)",
            ],
            "dataset 'deeplesion_trian' is not registered; did you mean deeplesion_train?",
        ),
        (
            [
                "search_net.py",
                "--config-file",
                "configs/quickstart/search_alb.yaml",
                "MODEL.WEIGHTS",
                "/no/fpn.pth",
            ],
            "search_net.py: error: weights file MODEL.WEIGHTS /no/fpn.pth not found",
        ),
        (
            ["datasets/prepare_deeplesion.py", "--root", "/no/DeepLesion"],
            "--root /no/DeepLesion: no DL_info.csv there",
        ),
        (
            ["datasets/prepare_kits19.py", "--root", "/no/kits19"],
            "--root /no/kits19: no data/ folder",
        ),
    ],
)
def test_expected_failures_are_one_line_exit_2(argv, expected):
    rc, err, lines = _run(*argv)
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and expected in lines[0], err


def test_run_cli_keeps_tracebacks_of_bugs_and_exit_codes(capsys):
    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_cli(bug, prog="x")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: (_ for _ in ()).throw(UserInputError("line one\nline two")), prog="x")
    assert e.value.code == 2 and capsys.readouterr().err == "x: error: line one; line two\n"
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: 3)
    assert e.value.code == 3
