"""Table 1 compares like with like: each "this run" row is the model the paper's row describes, or
its label says what was run instead."""

import os

import pytest

from elixir_d2 import load_config

import paper_numbers as P  # projects/paper, on pytest's pythonpath
import table1
from steps import STEPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _components(step: str, quick: bool):
    cfg = load_config(os.path.join(REPO, STEPS[step].config_for(quick)), ["MODEL.ALB.GENOTYPE", ""])
    return {
        "TRPN": cfg.MODEL.PROPOSAL_GENERATOR.NAME == "TRPN",
        "ALB": cfg.MODEL.ROI_BOX_HEAD.NAME == "ALBHead",
        "RTM": bool(cfg.MODEL.RTM.ENABLED),
    }


def test_paper_elixirnet_w_fpn_figures_are_the_full_model():
    # The identity the mapping rests on: Table 1's row equals Table 5's TRPN + ALB + RTM row.
    assert (
        P.TABLE1["ElixirNet w FPN"]["sens"][3.0]
        == P.TABLE5["ElixirNet (TRPN + ALB + RTM)"]["sens3"]
    )
    assert P.TABLE1["ElixirNet w FPN"]["mAP"] == P.TABLE5["ElixirNet (TRPN + ALB + RTM)"]["mAP"]


@pytest.mark.parametrize("quick", [True, False])
def test_elixirnet_rows_run_the_full_model_or_say_what_ran(quick):
    rows = {name: (step, what) for name, step, _, what in table1.ROWS}
    step, what = rows["ElixirNet w FPN"]
    assert _components(step, quick) == {"TRPN": True, "ALB": True, "RTM": True} and what == ""
    for name in ("ElixirNet", "ElixirNet w Deformv2"):
        step, what = rows[name]
        parts = _components(step, quick)
        assert parts["TRPN"] and parts["ALB"]
        assert parts["RTM"] or "no RTM" in what
        assert table1._label(name, what) == f"{name} (this run: TRPN + ALB, no RTM)"
    for step in {s for _, s, t, _ in table1.ROWS} | {t for _, _, t, _ in table1.ROWS}:
        assert table1.STEP_ORDER.index(step) >= 0  # every step read is run by the recipe
