#!/usr/bin/env python
"""Paper Table 3: FPN, Deformv2 and ElixirNet on each, KiTS19 (3 slices), test split.

    python projects/paper/table3.py --root datasets --num-gpus 4     # kits19/ under the root
    python projects/paper/table3.py --quick                          # CPU, synthetic KiTS19 format

Chain: (KiTS19 slice cache written first if absent) train FPN on kits19_train -> search the ALB
genotype from it on the same split (the paper does not say which data its KiTS19 genotype came
from; pass --genotype to reuse e.g. the DeepLesion search's) -> train Deformv2 and ElixirNet on
FPN / Deformv2 -> each evaluated on kits19_test (sensitivity with IoU at 0.5, 1, 2 FPs per image,
mAP). Writes <output>/table3.md with the paper's rows, labelled "(paper)", and table3.json.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import paper_numbers as P
from common import Recipe, fmt, markdown_table, recipe_main, sens
from steps import steps

ROWS = (
    ("FPN", "kits19_fpn"),
    ("Deformv2", "kits19_deformv2"),
    ("ElixirNet w FPN", "kits19_elixirnet_fpn"),
    ("ElixirNet w Deformv2", "kits19_elixirnet_deformv2"),
)
STEP_ORDER = (
    "kits19_fpn",
    "kits19_search",
    "kits19_deformv2",
    "kits19_elixirnet_fpn",
    "kits19_elixirnet_deformv2",
)


def render(recipe: Recipe) -> Dict[str, str]:
    res = {row: recipe.metrics(step, "test") for row, step in ROWS}
    header = ["Method"] + [f"{f:g}" for f in P.KITS_FPS] + ["mAP (%)"]
    rows = []
    for name, _ in ROWS:
        m, p = res[name], P.TABLE3[name]
        rows.append(
            [f"{name} (this run)"] + [fmt(sens(m, f)) for f in P.KITS_FPS] + [fmt(m.get("AP"), 1)]
        )
        rows.append(
            [f"{name} (paper)"] + [fmt(p["sens"][f]) for f in P.KITS_FPS] + [fmt(p["mAP"], 1)]
        )
    text = recipe.table_text(
        "Table 3: sensitivity (%) with IoU at FPs per image and mAP, KiTS19 test split",
        ["train", "test"],
        markdown_table(header, rows),
        STEP_ORDER,
        notes=[
            "Paper row ElixirNet w FPN: only its 2-FP cell survived in our copy of the paper "
            '("-" = lost).'
        ],
    )
    recipe.write_json("table3.json", res)
    return {"table3": recipe.write("table3.md", text)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the recipe; returns the path of table3.md."""
    return recipe_main(__doc__, "kits19", steps(*STEP_ORDER), render, argv)


if __name__ == "__main__":
    from elixir_d2.cli import run_cli

    run_cli(main)
