"""regime_sweep.py's paired comparison of choices against a baseline, seed by seed, on hand-made
results (t quantile for 1 degree of freedom: 12.706)."""

import pytest
import regime_sweep


def _m(v):
    return {"mean_sens_iou": v}


RESULTS = {
    "base_s0": _m(40.0),
    "base_s1": _m(44.0),
    "gn_s0": _m(35.0),
    "gn_s1": _m(41.0),
    "lr02_s1": _m(46.0),
    "broken_s0": {"error": "exit 1"},
    "no_seed": _m(50.0),
}


def test_variants_group_into_choices_by_seed_and_failed_runs_are_left_out():
    assert regime_sweep.by_choice(RESULTS) == {
        "base": {0: 40.0, 1: 44.0},
        "gn": {0: 35.0, 1: 41.0},
        "lr02": {1: 46.0},
    }


def test_each_choice_is_compared_on_the_seeds_it_shares_with_the_baseline():
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in regime_sweep.paired_table(RESULTS, "base").split("\n")[4:]
    }
    assert set(rows) == {"gn", "lr02"}
    # gn: differences -5 and -3, mean -4, std sqrt(2), half width 12.706 * sqrt(2) / sqrt(2)
    assert rows["gn"] == "| gn | 0, 1 | -5.0 / -3.0 | -4.0 | [-16.7, +8.7] | 0 of 2 |"
    assert rows["lr02"] == "| lr02 | 1 | +2.0 | +2.0 | - | 1 of 1 |"


def test_a_missing_baseline_is_named():
    with pytest.raises(ValueError, match="no variant named fpn_s<seed>.*base, gn, lr02"):
        regime_sweep.paired_table(RESULTS, "fpn")


def test_a_baseline_without_variants_is_refused_before_anything_trains(tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        '{"variants": {"fpn_s0": ["configs/quickstart/fpn.yaml", []]}}', encoding="utf-8"
    )
    with pytest.raises(SystemExit):
        regime_sweep.main(["--output", str(tmp_path / "out"), "--baseline", "base", str(sweep)])
    assert "no variant named base_s<seed>" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
