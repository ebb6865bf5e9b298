#!/usr/bin/env python
"""Train and evaluate many variants of a config in parallel (one process each), one table.

    python projects/benchmarks/regime_sweep.py --iters 400 --jobs 14 --output output/sweep \
        projects/benchmarks/sweeps/2_anchors_norm_iterations.json [MODEL.DEVICE cuda]

Options go before the variants file: everything after it is taken as KEY VALUE overrides.

The JSON maps option-group names to KEY VALUE lists ("groups") and variant names to
[config, [group names or KEY, VALUE, ...], iterations (optional)] ("variants"). Each variant is
trained with train_net.py on ``<--set>_train`` (no evaluation) and evaluated with quality.py
--evaluate (FROC + proposal recall) on ``<--set>_<--split>``, the validation split unless
``--split test`` is given (choices are made on val); the table lists sensitivity (IoU) at
0.5/1/2/4/8 FPs, their mean over 0.5/1/2/4, IoBB at 4 FPs, AP50, recall of the top 50/100/300
proposals and the training time. ``<output>/sweep.json`` holds each variant's metrics and the
sweep's ``provenance`` (docs/evaluation.md, "Provenance of results"). With ``--baseline NAME``,
variants named ``<choice>_s<seed>`` are read as seeds of one choice, and each choice is compared
with the baseline seed by seed: the paired difference of the mean IoU sensitivity, its 95%
t-interval and on how many seeds it is ahead.
Made for a machine with many cores (and a GPU: pass MODEL.DEVICE cuda); one seed per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from quality import SPLITS, dataset_opts

from elixir_d2.evaluation.stats import paired_interval

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COLUMNS = [
    "sens@0.5_iou",
    "sens@1_iou",
    "sens@2_iou",
    "sens@4_iou",
    "sens@8_iou",
    "mean_sens_iou",
    "sens@4_iobb",
    "AP50",
    "recall@50",
    "recall@100",
    "recall@300",
    "train_s",
]


def expand(items: List, groups: Dict[str, List[str]]) -> List[str]:
    """``items`` with each group name replaced by its KEY VALUE list. A name is a group only where
    a key is expected: a value equal to a group's name (``MODEL.FPN.NORM BN`` beside a group
    ``BN``) stays a value."""
    out: List[str] = []
    i = 0
    while i < len(items):
        if items[i] in groups:
            out += groups[items[i]]
            i += 1
        elif i + 1 < len(items):
            out += [items[i], items[i + 1]]
            i += 2
        else:
            raise ValueError(
                f"option {items[i]!r} has no value and is not a group "
                f"(groups: {', '.join(groups) or 'none'})"
            )
    return out


def run_variant(name: str, spec: List, groups: Dict, args) -> Dict:
    config, items, *iters = spec
    n = iters[0] if iters else args.iters
    out = os.path.join(args.output, name)
    common = [
        "--config-file",
        config,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        str(n),
        "SOLVER.STEPS",
        f"({int(n * 0.75)},{int(n * 0.92)})",
        *dataset_opts(args.set, args.split),
        *args.opts,
        *expand(items, groups),
    ]
    metrics_json = os.path.join(out, f"quality_metrics_{args.set}_{args.split}.json")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    with open(out + ".log", "w", encoding="utf-8") as log:
        code = subprocess.call(
            [sys.executable, "train_net.py", *common, "DATASETS.TEST", "()"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        t1 = time.time()
        if code == 0:
            code = subprocess.call(
                [
                    sys.executable,
                    "projects/benchmarks/quality.py",
                    "--evaluate",
                    metrics_json,
                    *common,
                    "MODEL.WEIGHTS",
                    os.path.join(out, "model_final.pth"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
    if code != 0:
        return {"error": f"exit {code}, see {out}.log"}
    with open(metrics_json, encoding="utf-8") as f:
        metrics = json.load(f)
    metrics["train_s"] = t1 - t0
    return metrics


def by_choice(results: Dict[str, Dict]) -> Dict[str, Dict[int, float]]:
    """Mean IoU sensitivity per choice and seed, from variants named ``<choice>_s<seed>``."""
    out: Dict[str, Dict[int, float]] = {}
    for name, m in results.items():
        match = re.fullmatch(r"(.+)_s(\d+)", name)
        if match and "error" not in m:
            out.setdefault(match.group(1), {})[int(match.group(2))] = m["mean_sens_iou"]
    return out


def paired_table(results: Dict[str, Dict], baseline: str) -> str:
    """Each choice against ``baseline`` on the seeds both have: choice minus baseline (points)."""
    choices = by_choice(results)
    if baseline not in choices:
        raise ValueError(
            f"no variant named {baseline}_s<seed> finished; choices: {', '.join(choices) or 'none'}"
        )
    base = choices[baseline]
    lines = [
        f"Mean IoU sensitivity over 0.5/1/2/4 FPs, choice minus {baseline}, per seed:",
        "",
        "| choice | seeds | per seed | mean | 95% t-interval | ahead on |",
        "|:--|:--|:--|--:|:--|:--|",
    ]
    for name, vals in choices.items():
        seeds = sorted(set(vals) & set(base))
        if name == baseline or not seeds:
            continue
        diffs = [vals[s] - base[s] for s in seeds]
        ci = "-"
        if len(seeds) >= 2:
            iv = paired_interval([vals[s] for s in seeds], [base[s] for s in seeds])
            ci = f"[{iv.low:+.1f}, {iv.high:+.1f}]"
        per = " / ".join(f"{d:+.1f}" for d in diffs)
        ahead = sum(d > 0 for d in diffs)
        lines.append(
            f"| {name} | {', '.join(map(str, seeds))} | {per} | "
            f"{sum(diffs) / len(diffs):+.1f} | {ci} | {ahead} of {len(seeds)} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from elixir_d2.provenance import code_state, provenance

    started, code = time.time(), code_state()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("variants", help="JSON file with 'groups' and 'variants'")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(ROOT, "output", "sweep"))
    ap.add_argument("--set", default="synthetic", help="data set prefix (<set>_train, _val, _test)")
    ap.add_argument(
        "--split",
        choices=SPLITS,
        default="val",
        help="evaluation split (default val: where choices are made)",
    )
    ap.add_argument(
        "--baseline",
        metavar="CHOICE",
        help="compare every <choice>_s<seed> with <CHOICE>_s<seed>, seed by seed",
    )
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every variant")
    args = ap.parse_args(argv)
    args.output = os.path.abspath(args.output)
    with open(args.variants, encoding="utf-8") as f:
        spec = json.load(f)
    groups, variants = spec.get("groups", {}), spec["variants"]
    if "provenance" in variants:
        ap.error("a variant may not be named 'provenance' (sweep.json's key for the provenance)")
    if args.baseline and not any(
        re.fullmatch(rf"{re.escape(args.baseline)}_s\d+", v) for v in variants
    ):
        ap.error(
            f"--baseline {args.baseline}: no variant named {args.baseline}_s<seed> in "
            f"{args.variants}"
        )
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(
            zip(variants, pool.map(lambda v: run_variant(v, variants[v], groups, args), variants))
        )
    prov = provenance(None if argv is None else [__file__, *argv], started=started, code=code)
    with open(os.path.join(args.output, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({"provenance": prov, **results}, f, indent=1)
    print(f"{args.set}_{args.split}, {args.iters} iterations unless a variant says otherwise\n")
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|:--|" + "--:|" * len(COLUMNS))
    for name, m in results.items():
        cells = [m["error"]] if "error" in m else [f"{m.get(k, float('nan')):.1f}" for k in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.baseline:
        print("\n" + paired_table(results, args.baseline))


if __name__ == "__main__":
    main()
