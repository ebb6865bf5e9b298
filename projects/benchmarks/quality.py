#!/usr/bin/env python
"""Detection quality of FPN, fair baselines and ElixirNet's parts, over seeds and data sets, with
intervals (docs/results/parts.md for the protocol, docs/results/evidence.md for three sets).

    python projects/benchmarks/quality.py --seeds 0 1 2 3 4 --sets synthetic synthetic_v2 \
        --jobs 2 --output output/quality                       # validation split
    python projects/benchmarks/quality.py ... --split test      # the test split, once per table

Choices are made on the validation split (the default); ``--split test`` reads the test split and
says so in every table. Per data set and seed, each model is trained once (reused by both splits)
by train_net.py on ``<set>_train`` and evaluated on ``<set>_<split>``; the search runs first from
that seed's FPN, trained first when a model needs it. Models (``--models``, default: the first
five):
  FPN                    configs/quickstart/fpn.yaml (2-fc head)
  FPN conv head          configs/quickstart/fpn_conv_head.yaml (4 conv + 1 fc, BatchNorm, within
                         15% of the ALB head's parameters)
  FPN+TRPN               configs/quickstart/trpn.yaml (gate max_norm, location-confidence loss)
  FPN+ALB                configs/quickstart/alb.yaml, the searched genotype
  ElixirNet              configs/quickstart/elixirnet.yaml (TRPN + ALB), the searched genotype
  ElixirNet random ALB   ElixirNet on a random genotype (search_net.py --random)
  FPN+ALB figure3        the ALB head on the fixed hand-made genotype configs/genotypes/figure3.yaml
  FPN+TRPN gate p / gate none / no conf loss   TRPN ablations
Prints, per set: sensitivity (%) at 0.5..8 FPs (IoU, IoBB), their mean over 0.5/1/2/4, AP50 and
the proposals' recall, mean +- sample std over seeds; then each comparison of a part with its
baseline: the paired per-seed difference of the mean IoU sensitivity with a 95% t-interval, and
the first seed's difference with a 95% bootstrap interval over the evaluated split's patients.
Writes
quality_<split>.json and quality_<split>.md, with the provenance of the run (docs/evaluation.md,
"Provenance of results"). Finished runs are reused (delete a run's folder to redo it).
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
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SPLITS = ("val", "test")
FIGURE3 = "configs/genotypes/figure3.yaml"
TRPN = "configs/quickstart/trpn.yaml"
# name -> (config, overrides, genotype: None, "searched", "random" or a genotype file)
MODELS: Dict[str, Tuple[str, List[str], Optional[str]]] = {
    "FPN": ("configs/quickstart/fpn.yaml", [], None),
    "FPN conv head": ("configs/quickstart/fpn_conv_head.yaml", [], None),
    "FPN+TRPN": (TRPN, [], None),
    "FPN+ALB": ("configs/quickstart/alb.yaml", [], "searched"),
    "ElixirNet": ("configs/quickstart/elixirnet.yaml", [], "searched"),
    "ElixirNet random ALB": ("configs/quickstart/elixirnet.yaml", [], "random"),
    "FPN+ALB figure3": ("configs/quickstart/alb.yaml", [], FIGURE3),
    "FPN+TRPN gate p": (TRPN, ["MODEL.TRPN.GATE", "p"], None),
    "FPN+TRPN gate none": (TRPN, ["MODEL.TRPN.GATE", "none"], None),
    "FPN+TRPN no conf loss": (TRPN, ["MODEL.TRPN.LOC_LOSS_WEIGHT", "0.0"], None),
}
DEFAULT_MODELS = ["FPN", "FPN conv head", "FPN+TRPN", "FPN+ALB", "ElixirNet"]
SEARCH_CONFIG = "configs/quickstart/search_alb.yaml"


def _run(cmd: List[str], log: str) -> None:
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); see {log}")


def slug(name: str) -> str:
    """A model's folder name: 'FPN+TRPN gate p' -> 'fpn_trpn_gate_p'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def dataset_opts(data_set: str, split: str) -> List[str]:
    """Overrides that train on ``<data_set>_train`` and evaluate on ``<data_set>_<split>``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return ["DATASETS.TRAIN", f"('{data_set}_train',)", "DATASETS.TEST", f"('{data_set}_{split}',)"]


def metrics_file(run_dir: str, data_set: str, split: str) -> str:
    return os.path.join(run_dir, f"quality_metrics_{data_set}_{split}.json")


def train_and_evaluate(
    config: str, run_dir: str, seed: int, data_set: str, split: str, opts: Sequence[str]
) -> Dict:
    """Train one model (unless model_final.pth exists) and evaluate it on one split; returns the
    metrics, with ``froc_inputs`` naming the per-image file the intervals read."""
    out = metrics_file(run_dir, data_set, split)
    if not os.path.exists(out):
        common = ["OUTPUT_DIR", run_dir, "SEED", str(seed), *opts, *dataset_opts(data_set, split)]
        if not os.path.exists(os.path.join(run_dir, "model_final.pth")):
            # No evaluation at the end of training: evaluate_model below measures proposals too.
            _run(
                [
                    sys.executable,
                    "train_net.py",
                    "--config-file",
                    config,
                    *common,
                    "DATASETS.TEST",
                    "()",
                ],
                os.path.join(run_dir, "train.log"),
            )
        _run(
            [
                sys.executable,
                __file__,
                "--evaluate",
                out,
                "--config-file",
                config,
                *common,
                "MODEL.WEIGHTS",
                os.path.join(run_dir, "model_final.pth"),
            ],
            os.path.join(run_dir, f"eval_{split}.log"),
        )
    with open(out, encoding="utf-8") as f:
        metrics = json.load(f)
    metrics["froc_inputs"] = os.path.join(
        run_dir, "inference", f"{data_set}_{split}", "froc_inputs.json"
    )
    return metrics


def evaluate_model(out_file: str, config_file: str, opts: Sequence[str]) -> None:
    """--evaluate: FROC metrics and proposal recall of MODEL.WEIGHTS on DATASETS.TEST[0], one
    pass, written to ``out_file``."""
    import torch

    from detectron2.checkpoint import DetectionCheckpointer

    import elixir_d2
    from elixir_d2.trainer import ElixirTrainer, evaluate_with_proposal_recall

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = elixir_d2.load_config(config_file, opts)
    cfg.freeze()
    model = ElixirTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    write_metrics(out_file, evaluate_with_proposal_recall(cfg, model), cfg.SEED)


def write_metrics(out_file: str, metrics: Dict[str, float], seed: int) -> None:
    """One model's metrics as JSON (NaN as null) with this evaluation's ``provenance``; files
    written before it was added have none and are read the same."""
    from elixir_d2.provenance import provenance

    doc = {k: (v if v == v else None) for k, v in metrics.items()}
    doc["provenance"] = provenance(seeds=[seed])
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)


def _genotype(
    kind: Optional[str],
    seed: int,
    base: str,
    fpn_weights: str,
    train_opts: List[str],
    opts: Sequence[str],
) -> List[str]:
    """MODEL.ALB.GENOTYPE overrides for a model's genotype kind, searching it first if needed."""
    if kind is None:
        return []
    if kind not in ("searched", "random"):
        return ["MODEL.ALB.GENOTYPE", kind]
    folder = os.path.join(base, "search" if kind == "searched" else "random_genotype")
    genotype = os.path.join(folder, "genotype.yaml")
    if not os.path.exists(genotype):
        cmd = [
            sys.executable,
            "search_net.py",
            "--config-file",
            SEARCH_CONFIG,
            "OUTPUT_DIR",
            folder,
            "SEED",
            str(seed),
            *train_opts,
            *opts,
        ]
        if kind == "searched":
            cmd += ["MODEL.WEIGHTS", fpn_weights]
        else:
            cmd.insert(2, "--random")
        _run(cmd, os.path.join(folder, "search.log"))
    return ["MODEL.ALB.GENOTYPE", genotype]


def run_order(models: Sequence[str]) -> List[str]:
    """The models one (set, seed) pipeline trains, in order: FPN first when it is asked for or a
    model's genotype is searched (the search starts from FPN's weights), then the others."""
    needs_fpn = "FPN" in models or any(MODELS[m][2] == "searched" for m in models)
    return ["FPN"] * needs_fpn + [m for m in models if m != "FPN"]


def seed_pipeline(data_set: str, seed: int, args) -> Dict[str, Dict]:
    """Every model of one data set and seed; the search starts from this seed's trained FPN."""
    base = os.path.join(args.output, data_set, f"seed{seed}")
    train_opts = dataset_opts(data_set, "val")[:2]
    res: Dict[str, Dict] = {}
    for name in run_order(args.models):
        config, model_opts, kind = MODELS[name]
        run_dir = os.path.join(base, slug(name))
        geno = _genotype(
            kind, seed, base, os.path.join(base, "fpn", "model_final.pth"), train_opts, args.opts
        )
        res[name] = train_and_evaluate(
            config, run_dir, seed, data_set, args.split, [*model_opts, *geno, *args.opts]
        )
    return {n: res[n] for n in args.models}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    from quality_report import across_sets_table, comparisons, summary_table

    from elixir_d2.provenance import code_state, provenance, provenance_line

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--sets",
        nargs="+",
        default=["synthetic"],
        help="data set prefixes: each has <set>_train and <set>_val / _test",
    )
    ap.add_argument(
        "--split",
        choices=SPLITS,
        default="val",
        help="evaluation split (default val: where choices are made)",
    )
    ap.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_MODELS,
        choices=list(MODELS),
        metavar="MODEL",
        help=f"from: {', '.join(MODELS)}",
    )
    ap.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="patient resamples for the single-run intervals (0: none)",
    )
    ap.add_argument("--output", default=os.path.join(ROOT, "output", "quality"))
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="(set, seed) pipelines run in parallel (each one process at a time)",
    )
    ap.add_argument("--evaluate", metavar="OUT_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--config-file", help=argparse.SUPPRESS)
    ap.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides for every run, KEY VALUE ..."
    )
    args = ap.parse_args(argv)
    if args.evaluate:
        evaluate_model(args.evaluate, args.config_file, args.opts)
        return {}
    if len(args.seeds) < 2:
        ap.error("--seeds: the intervals over seeds need at least 2 seeds")
    args.output = os.path.abspath(args.output)
    t0, code = time.time(), code_state()
    # Seed-major order: an interrupted run still covers every set with its first seeds.
    jobs = [(s, seed) for seed in args.seeds for s in args.sets]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda j: seed_pipeline(j[0], j[1], args), jobs))
    results = {s: {seed: r for (s2, seed), r in zip(jobs, runs) if s2 == s} for s in args.sets}
    lines = [f"split: {args.split}; seeds {args.seeds}; opts {args.opts or 'none'}", ""]
    summary = {"split": args.split, "seeds": args.seeds, "opts": args.opts, "sets": {}}
    for data_set, by_seed in results.items():
        comp = comparisons(by_seed, args.models, num_samples=args.bootstrap)
        summary["sets"][data_set] = {"results": by_seed, "comparisons": comp["rows"]}
        lines += [
            f"### {data_set}_{args.split}",
            "",
            summary_table(by_seed, args.models),
            "",
            comp["table"],
            "",
        ]
    if len(results) > 1:
        lines += [
            f"### Across sets ({args.split})",
            "",
            "Mean IoU sensitivity over 0.5/1/2/4 FPs, part minus baseline (points): mean "
            f"paired difference over seeds {args.seeds}, [95% t-interval] (w: its width).",
            "",
            across_sets_table({s: v["comparisons"] for s, v in summary["sets"].items()}),
            "",
        ]
    lines.append(f"elapsed {time.time() - t0:.0f} s")
    summary["provenance"] = provenance(
        None if argv is None else [__file__, *argv], seeds=args.seeds, started=t0, code=code
    )
    lines.append(provenance_line(summary["provenance"]))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"quality_{args.split}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    text = "\n".join(lines)
    with open(os.path.join(args.output, f"quality_{args.split}.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
