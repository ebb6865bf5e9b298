"""quality.py's tables: per-model mean +- sample std over seeds, and each part against its
baseline with a t-interval over seeds and a patient-bootstrap interval for one run."""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

from elixir_d2.evaluation.froc_inputs import read_froc_inputs
from elixir_d2.evaluation.report import fp_key
from elixir_d2.evaluation.stats import (
    bootstrap_mean_sensitivity,
    paired_interval,
    percentile_interval,
)

FPS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
# (part, its baseline): what each comparison asks
COMPARISONS = [
    ("FPN conv head", "FPN"),
    ("FPN+TRPN", "FPN"),
    ("FPN+ALB", "FPN"),
    ("FPN+ALB", "FPN conv head"),
    ("ElixirNet", "FPN"),
    ("ElixirNet", "FPN conv head"),
    ("ElixirNet", "ElixirNet random ALB"),
    ("FPN+ALB", "FPN+ALB figure3"),
    ("FPN+TRPN", "FPN+TRPN gate p"),
    ("FPN+TRPN", "FPN+TRPN gate none"),
    ("FPN+TRPN", "FPN+TRPN no conf loss"),
]
METRIC = "mean_sens_iou"
# The target: ElixirNet against the better of the two baselines, seed by seed.
BASELINES = ("FPN", "FPN conv head")
BEST_BASELINE = "best baseline (per seed)"


def summary_table(by_seed: Mapping[int, Mapping[str, Mapping]], models: Sequence[str]) -> str:
    """Markdown table, one row per model, mean +- sample std (ddof 1) over the seeds."""
    keys = (
        [("IoU", f"@{f:g}", f"sens@{fp_key(f)}_iou") for f in FPS]
        + [("IoU", "mean", METRIC)]
        + [("IoBB", f"@{f:g}", f"sens@{fp_key(f)}_iobb") for f in FPS]
        + [("", "AP50", "AP50")]
        + [("", f"recall@{k}", f"recall@{k}") for k in (50, 100, 300)]
    )
    header = "| model | " + " | ".join(f"{c} {h}".strip() for c, h, _ in keys) + " |"
    lines = [header, "|:--|" + "--:|" * len(keys)]
    for name in models:
        cells = []
        for _, _, key in keys:
            vals = np.array(
                [
                    r[name][key]
                    for r in by_seed.values()
                    if name in r and r[name].get(key) is not None
                ],
                dtype=float,
            )
            if len(vals) > 1:
                cells.append(f"{vals.mean():.1f} ± {vals.std(ddof=1):.1f}")
            else:
                cells.append(f"{vals.mean():.1f}" if len(vals) else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bootstrap_difference(
    part_file: str, base_file: str, num_samples: int, seed: int = 0
) -> Dict[str, float]:
    """Patient-bootstrap 95% interval of (part - baseline) mean IoU sensitivity, in points, from
    two runs' froc_inputs.json on the same images (the patients of the evaluated split)."""
    part, base = read_froc_inputs(part_file), read_froc_inputs(base_file)
    if part.image_ids != base.image_ids:
        raise ValueError(f"{part_file} and {base_file} hold different images")
    if part.convention != base.convention:
        raise ValueError(
            f"{part_file} ({part.convention}) and {base_file} ({base.convention}) "
            "read the FROC by different conventions"
        )
    samples = bootstrap_mean_sensitivity(
        part.gt_boxes,
        part.patients,
        {"part": (part.pred_boxes, part.pred_scores), "base": (base.pred_boxes, base.pred_scores)},
        num_samples=num_samples,
        seed=seed,
        convention=part.convention,
    )
    low, high = percentile_interval(100.0 * (samples["part"] - samples["base"]))
    return {"low": low, "high": high}


def comparisons(
    by_seed: Mapping[int, Mapping[str, Mapping]], models: Sequence[str], num_samples: int = 1000
) -> Dict[str, object]:
    """Every :data:`COMPARISONS` pair whose two models ran: rows (dicts) and a markdown table."""
    seeds = sorted(by_seed)
    rows: List[Dict[str, object]] = []
    pairs = [(p, b) for p, b in COMPARISONS if p in models and b in models]
    if "ElixirNet" in models and all(b in models for b in BASELINES):
        pairs.append(("ElixirNet", BEST_BASELINE))
    for part, base in pairs:
        a = [by_seed[s][part][METRIC] for s in seeds]
        if base == BEST_BASELINE:  # the better of the baselines on each seed
            bases = [max(BASELINES, key=lambda m: by_seed[s][m][METRIC]) for s in seeds]
        else:
            bases = [base] * len(seeds)
        b = [by_seed[s][m][METRIC] for s, m in zip(seeds, bases)]
        t = paired_interval(a, b)
        row: Dict[str, object] = {
            "part": part,
            "baseline": base,
            "seeds": seeds,
            "differences": [x - y for x, y in zip(a, b)],
            "mean": t.mean,
            "std": t.std,
            "t_low": t.low,
            "t_high": t.high,
            "t_excludes_zero": t.excludes_zero,
        }
        if base == BEST_BASELINE:
            row["baselines"] = bases
        if num_samples > 0:
            first = by_seed[seeds[0]]
            boot = bootstrap_difference(
                first[part]["froc_inputs"], first[bases[0]]["froc_inputs"], num_samples
            )
            row.update(boot_seed=seeds[0], boot_low=boot["low"], boot_high=boot["high"])
        rows.append(row)
    head = (
        "| part | baseline | per-seed difference | mean ± std | 95% t-interval | excludes 0 |"
        " first-seed patient bootstrap 95% |"
    )
    lines = [
        "Mean IoU sensitivity over 0.5/1/2/4 FPs, part minus baseline (points):",
        "",
        head,
        "|:--|:--|:--|--:|--:|:--|--:|",
    ]
    for r in rows:
        diffs = ", ".join(f"{d:+.1f}" for d in r["differences"])
        boot = f"[{r['boot_low']:+.1f}, {r['boot_high']:+.1f}]" if "boot_low" in r else "-"
        lines.append(
            f"| {r['part']} | {r['baseline']} | {diffs} | {r['mean']:+.1f} ± "
            f"{r['std']:.1f} | [{r['t_low']:+.1f}, {r['t_high']:+.1f}] | "
            f"{'yes' if r['t_excludes_zero'] else 'no'} | {boot} |"
        )
    return {"rows": rows, "table": "\n".join(lines)}


def across_sets_table(rows_by_set: Mapping[str, Sequence[Mapping]]) -> str:
    """Markdown table: each comparison (rows) on each data set (columns), its mean paired
    difference with the 95% t-interval and the interval's width, marked where it excludes 0."""
    sets = list(rows_by_set)
    order: List[tuple] = []
    for rows in rows_by_set.values():
        for r in rows:
            if (r["part"], r["baseline"]) not in order:
                order.append((r["part"], r["baseline"]))
    lines = [
        "| part | baseline | " + " | ".join(sets) + " | intervals excluding 0 |",
        "|:--|:--|" + "--:|" * len(sets) + "--:|",
    ]
    for part, base in order:
        cells, count = [], 0
        for s in sets:
            r = next(
                (r for r in rows_by_set[s] if (r["part"], r["baseline"]) == (part, base)), None
            )
            if r is None:
                cells.append("-")
                continue
            count += bool(r["t_excludes_zero"])
            mark = " **excl. 0**" if r["t_excludes_zero"] else ""
            cells.append(
                f"{r['mean']:+.1f} [{r['t_low']:+.1f}, {r['t_high']:+.1f}] "
                f"(w {r['t_high'] - r['t_low']:.1f}){mark}"
            )
        lines.append(f"| {part} | {base} | " + " | ".join(cells) + f" | {count} of {len(sets)} |")
    return "\n".join(lines)
