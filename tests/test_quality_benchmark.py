"""quality.py's protocol (validation split by default, one folder per model) and its comparison
tables, on hand-made metrics and per-image FROC inputs."""

import os

import numpy as np
import pytest
import quality
from quality_report import comparisons, summary_table

from elixir_d2.evaluation.froc_inputs import write_froc_inputs


def test_evaluation_split_is_val_unless_test_is_asked_for(capsys):
    assert quality.dataset_opts("synthetic_v2", "val") == [
        "DATASETS.TRAIN",
        "('synthetic_v2_train',)",
        "DATASETS.TEST",
        "('synthetic_v2_val',)",
    ]
    assert quality.dataset_opts("synthetic", "test")[-1] == "('synthetic_test',)"
    with pytest.raises(ValueError, match="split"):
        quality.dataset_opts("synthetic", "train")
    with pytest.raises(SystemExit):
        quality.main(["--seeds", "0"])  # no interval over one seed
    assert "at least 2 seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--seeds", "0", "1", "--models", "FPN", "Faster FPN"])
    assert "invalid choice" in capsys.readouterr().err


def test_model_folders_are_distinct():
    slugs = [quality.slug(m) for m in quality.MODELS]
    assert len(set(slugs)) == len(slugs)
    assert quality.slug("FPN+TRPN gate p") == "fpn_trpn_gate_p"


def test_fpn_is_trained_first_only_where_a_model_needs_it():
    # the searched genotypes start from FPN's weights; a random genotype and TRPN do not
    assert quality.run_order(["FPN+TRPN", "FPN+TRPN gate none"]) == [
        "FPN+TRPN",
        "FPN+TRPN gate none",
    ]
    assert quality.run_order(["ElixirNet random ALB"]) == ["ElixirNet random ALB"]
    assert quality.run_order(["FPN+TRPN", "FPN+ALB"]) == ["FPN", "FPN+TRPN", "FPN+ALB"]
    assert quality.run_order(["ElixirNet", "FPN"]) == ["FPN", "ElixirNet"]


def _inputs(path, found):
    """3 patients, one key slice and one lesion each; ``found`` lists the patients whose lesion
    the run detects (no false positive anywhere)."""
    gt = [np.array([[10.0 * k, 0, 10.0 * k + 8, 8]]) for k in range(3)]
    boxes = [g if k in found else np.zeros((0, 4)) for k, g in enumerate(gt)]
    scores = [np.array([0.9]) if k in found else np.zeros(0) for k in range(3)]
    write_froc_inputs(str(path), "toy_val", "continuous", [1, 2, 3], [1, 2, 3], boxes, scores, gt)
    return str(path)


def test_comparisons_by_hand(tmp_path):
    every, none = _inputs(tmp_path / "a.json", {0, 1, 2}), _inputs(tmp_path / "b.json", set())
    by_seed = {
        s: {
            "FPN+TRPN": {"mean_sens_iou": a, "froc_inputs": every},
            "FPN": {"mean_sens_iou": b, "froc_inputs": none},
        }
        for s, a, b in ((0, 50.0, 45.0), (1, 52.0, 48.0), (2, 55.0, 49.0))
    }
    out = comparisons(by_seed, ["FPN", "FPN+TRPN"], num_samples=200)
    (row,) = out["rows"]
    # differences 5, 4, 6: mean 5, sample std 1, t(0.975, 2) = 4.303
    half = 4.303 / np.sqrt(3)
    assert (row["part"], row["baseline"], row["differences"]) == ("FPN+TRPN", "FPN", [5, 4, 6])
    assert row["mean"] == pytest.approx(5.0) and row["std"] == pytest.approx(1.0)
    assert row["t_low"] == pytest.approx(5 - half, abs=1e-3)
    assert row["t_high"] == pytest.approx(5 + half, abs=1e-3)
    assert row["t_excludes_zero"]
    # every lesion found against none, in every resample: 100 points
    assert (row["boot_low"], row["boot_high"]) == (100.0, 100.0)
    assert "| FPN+TRPN | FPN | +5.0, +4.0, +6.0 | +5.0 ± 1.0 |" in out["table"]


def test_comparisons_refuse_runs_on_different_images(tmp_path):
    a = _inputs(tmp_path / "a.json", {0})
    b = tmp_path / "b.json"
    write_froc_inputs(
        str(b),
        "toy_val",
        "continuous",
        [7],
        [7],
        [np.zeros((0, 4))],
        [np.zeros(0)],
        [np.zeros((0, 4))],
    )
    by_seed = {
        s: {
            "FPN+TRPN": {"mean_sens_iou": 1.0 + s, "froc_inputs": a},
            "FPN": {"mean_sens_iou": 0.0, "froc_inputs": str(b)},
        }
        for s in (0, 1)
    }
    with pytest.raises(ValueError, match="different images"):
        comparisons(by_seed, ["FPN", "FPN+TRPN"], num_samples=5)


def test_summary_table_uses_the_sample_std():
    by_seed = {0: {"FPN": {"mean_sens_iou": 40.0}}, 1: {"FPN": {"mean_sens_iou": 44.0}}}
    row = summary_table(by_seed, ["FPN"]).splitlines()[2]
    assert "42.0 ± 2.8" in row  # sqrt(8) = 2.83 (ddof 1); ddof 0 would give 2.0


def test_elixirnet_against_the_better_baseline_of_each_seed(tmp_path):
    every, none = _inputs(tmp_path / "a.json", {0, 1, 2}), _inputs(tmp_path / "b.json", set())
    means = {0: (50.0, 45.0, 48.0), 1: (52.0, 49.0, 44.0), 2: (51.0, 40.0, 47.0)}
    by_seed = {
        s: {
            "ElixirNet": {"mean_sens_iou": e, "froc_inputs": every},
            "FPN": {"mean_sens_iou": f, "froc_inputs": none},
            "FPN conv head": {"mean_sens_iou": c, "froc_inputs": every},
        }
        for s, (e, f, c) in means.items()
    }
    rows = comparisons(by_seed, ["FPN", "FPN conv head", "ElixirNet"], num_samples=50)["rows"]
    best = rows[-1]
    assert best["baseline"] == "best baseline (per seed)"
    # better baselines: conv head 48, FPN 49, conv head 47 -> differences 2, 3, 4
    assert best["baselines"] == ["FPN conv head", "FPN", "FPN conv head"]
    assert best["differences"] == [2.0, 3.0, 4.0]
    assert best["mean"] == pytest.approx(3.0) and best["std"] == pytest.approx(1.0)
    # seed 0: the better baseline (conv head) finds every lesion, as ElixirNet: 0 in each resample
    assert (best["boot_low"], best["boot_high"]) == (0.0, 0.0)


def test_across_sets_table_marks_intervals_excluding_zero():
    from quality_report import across_sets_table

    row = {"part": "ElixirNet", "baseline": "FPN"}
    table = across_sets_table(
        {
            "a": [{**row, "mean": 3.0, "t_low": 1.0, "t_high": 5.0, "t_excludes_zero": True}],
            "b": [{**row, "mean": 1.0, "t_low": -2.5, "t_high": 4.5, "t_excludes_zero": False}],
        }
    )
    assert table.splitlines()[0] == "| part | baseline | a | b | intervals excluding 0 |"
    assert table.splitlines()[2] == (
        "| ElixirNet | FPN | +3.0 [+1.0, +5.0] (w 4.0) **excl. 0** | "
        "+1.0 [-2.5, +4.5] (w 7.0) | 1 of 2 |"
    )


def test_written_summary_and_metrics_carry_their_provenance(tmp_path, monkeypatch):
    """quality_<split>.json holds the run's provenance and quality_<split>.md ends with its line;
    a model's metrics file holds its evaluation's, and one written before that is read alike."""
    import json

    import elixir_d2.provenance

    # The checkout as it is now; the runs below edit it, as a user may while a benchmark runs.
    checkout = {"commit": "at-start", "dirty": False}
    monkeypatch.setattr(elixir_d2.provenance, "code_state", lambda *a, **k: dict(checkout))
    means = {0: (40.0, 45.0), 1: (42.0, 46.0)}

    def seed_pipeline(data_set, seed, args):
        checkout.update(commit="later", dirty=True)
        return {
            "FPN": {"mean_sens_iou": means[seed][0]},
            "FPN+TRPN": {"mean_sens_iou": means[seed][1]},
        }

    monkeypatch.setattr(quality, "seed_pipeline", seed_pipeline)
    argv = [
        "--seeds",
        "0",
        "1",
        "--models",
        "FPN",
        "FPN+TRPN",
        "--bootstrap",
        "0",
        "--output",
        str(tmp_path / "q"),
    ]
    quality.main(argv)
    summary = json.loads((tmp_path / "q" / "quality_val.json").read_text(encoding="utf-8"))
    p = summary["provenance"]
    assert p["command"] == [quality.__file__, *argv] and p["seeds"] == [0, 1]
    assert {"commit", "dirty", "cpu", "threads", "torch", "started", "written"} <= set(p)
    assert p["commit"] == "at-start" and p["dirty"] is False
    assert summary["sets"]["synthetic"]["comparisons"][0]["differences"] == [5.0, 4.0]
    md = (tmp_path / "q" / "quality_val.md").read_text(encoding="utf-8").splitlines()
    assert md[-1].startswith("commit ") and md[-1].endswith(" --output " + str(tmp_path / "q"))

    run = tmp_path / "run"
    run.mkdir()
    quality.write_metrics(
        quality.metrics_file(str(run), "toy", "val"),
        {"mean_sens_iou": 50.0, "AP50": float("nan")},
        seed=3,
    )
    m = quality.train_and_evaluate("unused.yaml", str(run), 3, "toy", "val", [])
    assert m["AP50"] is None and m["provenance"]["seeds"] == [3]
    old = tmp_path / "old"
    old.mkdir()
    with open(quality.metrics_file(str(old), "toy", "val"), "w", encoding="utf-8") as f:
        json.dump({"mean_sens_iou": 50.0}, f)  # a finished run from before the provenance block
    m = quality.train_and_evaluate("unused.yaml", str(old), 3, "toy", "val", [])
    assert m["mean_sens_iou"] == 50.0 and "provenance" not in m


def test_tables_are_written_as_utf8_under_an_ascii_locale(tmp_path):
    """The tables hold '±'; under LANG=C (an ASCII locale, UTF-8 mode off) Python's default text
    encoding cannot write it, so every writer names its encoding."""
    import subprocess
    import sys

    code = (
        "import quality\n"
        "quality.seed_pipeline = lambda s, seed, a: {'FPN': {'mean_sens_iou': 40.0 + seed},"
        " 'FPN+TRPN': {'mean_sens_iou': 45.0 - seed}}\n"
        f"quality.main(['--seeds', '0', '1', '--models', 'FPN', 'FPN+TRPN', '--bootstrap', '0',"
        f" '--output', {str(tmp_path)!r}])\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=os.path.dirname(quality.__file__),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "quality_val.md").read_bytes().decode("utf-8")
    assert "40.5 ± 0.7" in md  # FPN over seeds 0 and 1: mean 40.5, sample std sqrt(0.5)
