#!/usr/bin/env python
"""Paper Table 4: multi-type lesion detection, per-type sensitivity at 3 FPs per image (IoU).

    python projects/paper/table4.py --root datasets --num-gpus 4
    python projects/paper/table4.py --quick

Chain (the paper's protocol): train binary FPN -> search the ALB genotype -> train binary
ElixirNet w FPN -> fine-tune each on the typed validation split with backbone and proposal
generator frozen (6 epochs at lr 0.002): "FPN w finetune" and "ElixirNet w/o RTM" with a new
8-type predictor, "ElixirNet" with the Relation Transfer Module -> evaluate on the typed test split.
Writes <output>/table4.md with the paper's rows, labelled "(paper)", and table4.json.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import paper_numbers as P
from common import Recipe, fmt, markdown_table, recipe_main, sens
from steps import steps

ROWS = (
    ("FPN w finetune", "fpn_finetune_typed"),
    ("ElixirNet w/o RTM", "elixirnet_wo_rtm"),
    ("ElixirNet", "elixirnet_rtm"),
)
STEP_ORDER = (
    "fpn",
    "search",
    "elixirnet_fpn",
    "fpn_finetune_typed",
    "elixirnet_wo_rtm",
    "elixirnet_rtm",
)


def type_keys():
    from elixir_d2.data.deeplesion import LESION_TYPE_ABBREV, LESION_TYPES

    if tuple(LESION_TYPE_ABBREV) != P.TYPE_ABBREV:
        raise ValueError(
            f"lesion type order {LESION_TYPE_ABBREV} differs from the paper's {P.TYPE_ABBREV}"
        )
    return [f"sens@3_iou_{t.replace(' ', '_')}" for t in LESION_TYPES]


def render(recipe: Recipe) -> Dict[str, str]:
    keys = type_keys()
    res = {row: recipe.metrics(step, "test_typed") for row, step in ROWS}
    header = ["Method"] + list(P.TYPE_ABBREV) + ["all types (3 FPs)", "mAP (%)"]
    rows = []
    for name, _ in ROWS:
        m = res[name]
        rows.append(
            [f"{name} (this run)"]
            + [fmt(m.get(k)) for k in keys]
            + [fmt(sens(m, 3)), fmt(m.get("AP"), 1)]
        )
        rows.append(
            [f"{name} (paper)"] + [fmt(P.TABLE4[name][a]) for a in P.TYPE_ABBREV] + ["-", "-"]
        )
    text = recipe.table_text(
        "Table 4: sensitivity (%) at 3 FPs per image (IoU) per lesion type, typed test split",
        ["val_typed", "test_typed"],
        markdown_table(header, rows),
        STEP_ORDER,
        notes=[
            "Per-type cells are class-aware (a detection counts for its predicted type only); "
            '"-": the type\'s FROC curve never reaches 3 FPs per image (the paper\'s "too low '
            'recall") or no value. "all types" and mAP are class-agnostic (this run only; not '
            "in the paper's table)."
        ],
    )
    recipe.write_json("table4.json", res)
    return {"table4": recipe.write("table4.md", text)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the recipe; returns the path of table4.md."""
    return recipe_main(__doc__, "deeplesion", steps(*STEP_ORDER), render, argv)


if __name__ == "__main__":
    from elixir_d2.cli import run_cli

    run_cli(main)
