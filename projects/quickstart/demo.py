#!/usr/bin/env python
"""`make demo`: synthetic DeepLesion-format data -> train the quickstart FPN -> FROC table.

    python projects/quickstart/demo.py --output output/demo [--config configs/quickstart/fpn.yaml]

Generates ``$DETECTRON2_DATASETS/synthetic`` (default ./datasets/synthetic) when absent, evaluates
the untrained model, trains it, evaluates again and prints both side by side in the paper's layout
(sensitivity at 0.5..8 FPs per image, mAP) for IoU and IoBB. Runs on a 2-core CPU in minutes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

from detectron2.engine import default_setup  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402

import elixir_d2  # noqa: E402
from elixir_d2.data import datasets_root  # noqa: E402
from elixir_d2.data.synthetic import generate_deeplesion  # noqa: E402
from elixir_d2.evaluation import format_froc_table  # noqa: E402
from train_net import Trainer  # noqa: E402

logger = logging.getLogger("elixir_d2.demo")


def ensure_synthetic(root: str, seed: int = 0) -> None:
    """Write the synthetic DeepLesion-format set under ``root`` unless it is already there."""
    if PathManager.exists(os.path.join(root, "DL_info.csv")):
        print(f"[demo] using the synthetic data at {root}")
        return
    print(f"[demo] generating synthetic DeepLesion-format data at {root} ...")
    t0 = time.time()
    summary = generate_deeplesion(root, seed=seed)
    print(f"[demo] generated in {time.time() - t0:.0f} s: {summary}")


def build_cfg(config_file: str, output_dir: str, opts: list[str]):
    cfg = elixir_d2.load_config(config_file, opts)
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


def evaluate(cfg, model) -> dict:
    """Lesion metrics on cfg.DATASETS.TEST[0] (flat dict)."""
    res = Trainer.test(cfg, model)
    return res.get("lesion", next(iter(res.values()))) if res else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/quickstart/fpn.yaml"))
    ap.add_argument("--output", default=os.path.join(ROOT, "output/demo"))
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    root = os.path.join(datasets_root(), "synthetic")
    ensure_synthetic(root)

    cfg = build_cfg(args.config, os.path.join(args.output, "fpn"), args.opts)
    default_setup(cfg, argparse.Namespace(config_file=args.config, eval_only=False, opts=[]))
    t0 = time.time()

    model = Trainer.build_model(cfg)  # seeded by default_setup (cfg.SEED): the untrained baseline
    untrained_cfg = cfg.clone()
    untrained_cfg.defrost()
    untrained_cfg.OUTPUT_DIR = os.path.join(args.output, "untrained")
    before = evaluate(untrained_cfg, model)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_s = time.time() - t0
    # DefaultTrainer evaluates once more after its last iteration: reuse those numbers.
    final = getattr(trainer, "_last_eval_results", None)
    after = final.get("lesion", {}) if final else evaluate(cfg, trainer.model)

    rows = {
        "FPN quickstart, untrained": before,
        f"FPN quickstart, trained {cfg.SOLVER.MAX_ITER} it": after,
    }
    with PathManager.open(os.path.join(args.output, "demo_results.json"), "w") as f:
        # NaN (e.g. a size bucket without lesions) as null: strict JSON readers reject NaN.
        clean = {k: {m: (v if v == v else None) for m, v in r.items()} for k, r in rows.items()}
        json.dump({"rows": clean, "train_and_eval_seconds": train_s}, f, indent=2)
    print(f"\n[demo] synthetic test split ({cfg.DATASETS.TEST[0]}), {time.time() - t0:.0f} s train + eval on CPU")
    for criterion in ("iou", "iobb"):
        print()
        print(format_froc_table(rows, criterion))
    print(f"\n[demo] outputs under {args.output}")


if __name__ == "__main__":
    main()
