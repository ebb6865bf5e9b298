#!/usr/bin/env python
"""Detection quality of FPN and ElixirNet's parts on the synthetic set, mean +- std over seeds.

    python projects/benchmarks/quality.py --seeds 0 1 2 --output output/quality

Per seed, in this order (each step a fresh process, on the quickstart regime):
  FPN                    configs/quickstart/fpn.yaml
  FPN+TRPN               configs/quickstart/trpn.yaml
  FPN+ALB                configs/quickstart/alb.yaml (genotype: the searched one below)
  search                 search_net.py on configs/quickstart/search_alb.yaml, from this seed's FPN
  ElixirNet              configs/quickstart/elixirnet.yaml (TRPN + ALB), the searched genotype
  ElixirNet random ALB   with --random-genotypes: a search_net.py --random genotype instead
Prints sensitivity (%) at 0.5..8 FPs per image (IoU and IoBB), their mean over 0.5/1/2/4, AP50
and the proposals' recall at 50/100/300 (IoU 0.5), and writes quality.json / quality.md.
Finished runs are reused (delete a run's folder to redo it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FPS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
MODELS = {
    "FPN": "configs/quickstart/fpn.yaml",
    "FPN+TRPN": "configs/quickstart/trpn.yaml",
    "FPN+ALB": "configs/quickstart/alb.yaml",
    "ElixirNet": "configs/quickstart/elixirnet.yaml",
    "ElixirNet random ALB": "configs/quickstart/elixirnet.yaml",
}
SEARCH_CONFIG = "configs/quickstart/search_alb.yaml"


def _run(cmd: List[str], log: str) -> None:
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); see {log}")


def train_and_evaluate(name: str, seed: int, out: str, opts: Sequence[str]) -> Dict:
    """Train one model (unless model_final.pth exists) and evaluate it; returns the metrics."""
    metrics_file = os.path.join(out, "quality_metrics.json")
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            return json.load(f)
    common = ["--config-file", MODELS[name], "OUTPUT_DIR", out, "SEED", str(seed), *opts]
    if not os.path.exists(os.path.join(out, "model_final.pth")):
        # No evaluation at the end of training: evaluate_model below measures proposals too.
        _run([sys.executable, "train_net.py", *common, "DATASETS.TEST", "()"],
             os.path.join(out, "train.log"))
    _run([sys.executable, __file__, "--evaluate", *common, "MODEL.WEIGHTS",
          os.path.join(out, "model_final.pth")],
         os.path.join(out, "eval.log"))
    with open(metrics_file) as f:
        return json.load(f)


def evaluate_model(config_file: str, opts: Sequence[str]) -> None:
    """--evaluate: FROC metrics and proposal recall of MODEL.WEIGHTS on the test split, one pass."""
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
    metrics = evaluate_with_proposal_recall(cfg, model)
    with open(os.path.join(cfg.OUTPUT_DIR, "quality_metrics.json"), "w") as f:
        json.dump({k: (v if v == v else None) for k, v in metrics.items()}, f, indent=1)


def seed_pipeline(seed: int, args) -> Dict[str, Dict]:
    """Every model of one seed; the search starts from this seed's trained FPN."""
    base = os.path.join(args.output, f"seed{seed}")
    opts = list(args.opts)
    res = {"FPN": train_and_evaluate("FPN", seed, os.path.join(base, "fpn"), opts)}
    search_dir = os.path.join(base, "search")
    genotype = os.path.join(search_dir, "genotype.yaml")
    if not os.path.exists(genotype):
        _run([sys.executable, "search_net.py", "--config-file", SEARCH_CONFIG, "OUTPUT_DIR",
              search_dir,
              "SEED", str(seed), "MODEL.WEIGHTS", os.path.join(base, "fpn", "model_final.pth"),
              *opts],
             os.path.join(search_dir, "search.log"))
    res["FPN+TRPN"] = train_and_evaluate("FPN+TRPN", seed, os.path.join(base, "trpn"), opts)
    res["FPN+ALB"] = train_and_evaluate("FPN+ALB", seed, os.path.join(base, "alb"),
                                        opts + ["MODEL.ALB.GENOTYPE", genotype])
    res["ElixirNet"] = train_and_evaluate("ElixirNet", seed, os.path.join(base, "elixirnet"),
                                          opts + ["MODEL.ALB.GENOTYPE", genotype])
    if args.random_genotypes:
        rnd_dir = os.path.join(base, "random_genotype")
        rnd = os.path.join(rnd_dir, "genotype.yaml")
        if not os.path.exists(rnd):
            _run([sys.executable, "search_net.py", "--random", "--config-file", SEARCH_CONFIG,
                  "OUTPUT_DIR", rnd_dir, "SEED", str(seed)], os.path.join(rnd_dir, "search.log"))
        res["ElixirNet random ALB"] = train_and_evaluate(
            "ElixirNet random ALB", seed, os.path.join(base, "elixirnet_random"),
            opts + ["MODEL.ALB.GENOTYPE", rnd])
    return res


def summary_table(results: Dict[int, Dict[str, Dict]]) -> str:
    """Markdown table, one row per model, mean +- std over the seeds of each cell."""
    from elixir_d2.evaluation.report import fp_key

    keys = ([("IoU", f"@{f:g}", f"sens@{fp_key(f)}_iou") for f in FPS]
            + [("IoU", "mean", "mean_sens_iou")]
            + [("IoBB", f"@{f:g}", f"sens@{fp_key(f)}_iobb") for f in FPS] + [("", "AP50", "AP50")]
            + [("", f"recall@{k}", f"recall@{k}") for k in (50, 100, 300)])
    header = "| model | " + " | ".join(f"{c} {h}".strip() for c, h, _ in keys) + " |"
    lines = [header, "|:--|" + "--:|" * len(keys)]
    names = [n for n in MODELS if all(n in r for r in results.values())]
    for name in names:
        cells = []
        for _, _, key in keys:
            vals = [r[name].get(key) for r in results.values()]
            vals = np.array([v for v in vals if v is not None], dtype=float)
            cells.append(f"{vals.mean():.1f} ± {vals.std():.1f}" if len(vals) else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output", default=os.path.join(ROOT, "output", "quality"))
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run in parallel (each is one process at a time)")
    ap.add_argument("--random-genotypes", action="store_true",
                    help="also train ElixirNet on a random genotype")
    ap.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config-file", help=argparse.SUPPRESS)
    ap.add_argument("opts", nargs=argparse.REMAINDER,
                    help="config overrides for every run, KEY VALUE ...")
    args = ap.parse_args()
    if args.evaluate:
        return evaluate_model(args.config_file, args.opts)
    args.output = os.path.abspath(args.output)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(args.seeds, pool.map(lambda s: seed_pipeline(s, args), args.seeds)))
    table = summary_table(results)
    with open(os.path.join(args.output, "quality.json"), "w") as f:
        json.dump({"seeds": args.seeds, "opts": args.opts, "results": results}, f, indent=1)
    with open(os.path.join(args.output, "quality.md"), "w") as f:
        f.write(table + "\n")
    print(f"seeds {args.seeds}, synthetic test split, opts {args.opts or 'none'}\n")
    print(table)


if __name__ == "__main__":
    main()
