#!/usr/bin/env python
"""Paper Table 5: ablation of TRPN, ALB, RTM and 9-slice input on FPN, DeepLesion test split.

    python projects/paper/table5.py --root datasets --num-gpus 4
    python projects/paper/table5.py --quick

Chain: train FPN -> search the ALB genotype -> train FPN + TRPN, + ALB, + ALB with 9 slices,
+ TRPN + ALB (configs/ablation/*.yaml; TRPN + ALB is ElixirNet w FPN, shared with Table 1) ->
RTM rows: fine-tune the TRPN and TRPN + ALB models with RTM on the typed validation split
(backbone and proposal generator frozen, the paper's Table 4 protocol) -> every row evaluated on
the (binary) test split: sensitivity at 3 FPs per image (IoU) and mAP.
Writes <output>/table5.md with the paper's rows, labelled "(paper)", and table5.json.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import paper_numbers as P
from common import Recipe, fmt, markdown_table, recipe_main, sens
from steps import steps

# Row, step, (TRPN, ALB, RTM, 9 slices).
ROWS = (
    ("FPN", "fpn", (0, 0, 0, 0)),
    ("TRPN", "ablation_trpn", (1, 0, 0, 0)),
    ("ALB", "ablation_alb", (0, 1, 0, 0)),
    ("ALB, 9 slices", "ablation_alb_9slices", (0, 1, 0, 1)),
    ("TRPN + ALB", "elixirnet_fpn", (1, 1, 0, 0)),
    ("TRPN + RTM", "ablation_trpn_rtm", (1, 0, 1, 0)),
    ("ElixirNet (TRPN + ALB + RTM)", "elixirnet_rtm", (1, 1, 1, 0)),
)
STEP_ORDER = (
    "fpn",
    "search",
    "ablation_trpn",
    "ablation_alb",
    "ablation_alb_9slices",
    "elixirnet_fpn",
    "ablation_trpn_rtm",
    "elixirnet_rtm",
)


def render(recipe: Recipe) -> Dict[str, str]:
    res = {row: recipe.metrics(step, "test") for row, step, _ in ROWS}
    header = ["Method", "TRPN", "ALB", "RTM", "9 slices", "3 FPs (IoU) sensitivity", "mAP (%)"]
    rows = []
    for name, _, flags in ROWS:
        marks = ["✓" if f else "" for f in flags]
        m, p = res[name], P.TABLE5[name]
        rows.append([f"{name} (this run)"] + marks + [fmt(sens(m, 3)), fmt(m.get("AP"), 1)])
        rows.append([f"{name} (paper)"] + marks + [fmt(p["sens3"]), fmt(p["mAP"], 1)])
    text = recipe.table_text(
        "Table 5: ablation, sensitivity (%) at 3 FPs per image (IoU) and mAP, test split",
        ["train", "val_typed", "test"],
        markdown_table(header, rows),
        STEP_ORDER,
        notes=[
            "RTM rows: binary model fine-tuned with RTM on the typed validation split, then "
            "evaluated class-agnostically on the test split like the other rows."
        ],
    )
    recipe.write_json("table5.json", res)
    return {"table5": recipe.write("table5.md", text)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the recipe; returns the path of table5.md."""
    return recipe_main(__doc__, "deeplesion", steps(*STEP_ORDER), render, argv)


if __name__ == "__main__":
    from elixir_d2.cli import run_cli

    run_cli(main)
