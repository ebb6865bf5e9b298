#!/usr/bin/env python
"""Paper Table 6: search space and search strategy of the ALB, FPN + ALB, DeepLesion test split.

    python projects/paper/table6.py --root datasets --num-gpus 4
    python projects/paper/table6.py --quick

Chain: train FPN -> three genotypes: differentiable search in the medical space (search_net.py),
the same search in the DARTS space, and a random genotype of the medical space
(search_net.py --random, SEED 0) -> train FPN + ALB with each (configs/ablation/alb.yaml,
alb_darts_space.yaml, alb_random.yaml) -> evaluate on the test split: sensitivity at 3 FPs per
image (IoU) and mAP. Writes <output>/table6.md with the paper's rows, labelled "(paper)", and
table6.json.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import paper_numbers as P
from common import Recipe, fmt, markdown_table, recipe_main, sens
from steps import steps

ROWS = (
    ("ElixirNet (ALB, our space, differentiable search)", "ablation_alb"),
    ("ALB w/o our search space (DARTS space)", "ablation_alb_darts"),
    ("random ALB", "ablation_alb_random"),
)
STEP_ORDER = (
    "fpn",
    "search",
    "search_darts",
    "random_alb",
    "ablation_alb",
    "ablation_alb_darts",
    "ablation_alb_random",
)


def render(recipe: Recipe) -> Dict[str, str]:
    res = {row: recipe.metrics(step, "test") for row, step in ROWS}
    header = ["Method", "3 FPs (IoU) sensitivity", "mAP (%)"]
    rows = []
    for name, _ in ROWS:
        m, p = res[name], P.TABLE6[name]
        rows.append([f"{name} (this run)", fmt(sens(m, 3)), fmt(m.get("AP"), 1)])
        rows.append([f"{name} (paper)", fmt(p["sens3"]), fmt(p["mAP"], 1)])
    text = recipe.table_text(
        "Table 6: search space and strategy, sensitivity (%) at 3 FPs per image (IoU) and mAP",
        ["train", "test"],
        markdown_table(header, rows),
        STEP_ORDER,
    )
    recipe.write_json("table6.json", res)
    return {"table6": recipe.write("table6.md", text)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the recipe; returns the path of table6.md."""
    return recipe_main(__doc__, "deeplesion", steps(*STEP_ORDER), render, argv)


if __name__ == "__main__":
    from elixir_d2.cli import run_cli

    run_cli(main)
