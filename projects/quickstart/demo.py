#!/usr/bin/env python
"""`make demo`: FPN and ElixirNet trained on the same budget on the synthetic set, side by side.

    python projects/quickstart/demo.py --output output/demo [--iters N] [--search-epochs E]
                                       [--precision auto|float32|bfloat16]

1. the synthetic DeepLesion-format set (written on first use under $DETECTRON2_DATASETS);
2. FPN: configs/quickstart/fpn.yaml, trained from scratch;
3. ALB search from the trained FPN (configs/quickstart/search_alb.yaml) -> search/genotype.yaml;
4. ElixirNet (TRPN + ALB of that genotype): configs/quickstart/elixirnet.yaml, same iterations;
5. the untrained FPN, FPN and ElixirNet evaluated on the test split: FROC sensitivity (IoU,
   IoBB), mAP, proposal recall and parameter counts printed side by side; demo.png shows both
   FROC curves and a few test slices with ground truth and both models' detections.

Training and search run under bfloat16 autocast (SOLVER.AMP.PRECISION bfloat16) when the CPU
computes bfloat16 natively (--precision auto), in float32 otherwise; evaluation in float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.engine import default_setup
from detectron2.utils.file_io import PathManager

import elixir_d2
from elixir_d2.amp import amp_opts, native_cpu_bfloat16
from elixir_d2.cli import run_cli
from elixir_d2.data.ct_mapper import CTDatasetMapper
from elixir_d2.evaluation import PAPER_FPS, format_froc_table
from elixir_d2.modeling.genotype_source import resolve_genotype_config
from elixir_d2.provenance import code_state, provenance
from elixir_d2.search import ALBSearcher
from elixir_d2.trainer import ElixirTrainer, evaluate_with_proposal_recall

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
logger = logging.getLogger("elixir_d2.demo")


def config(name: str, output_dir: str, opts: List[str]):
    """A quickstart config with the demo's output folder and overrides, frozen."""
    cfg = elixir_d2.load_config(os.path.join(ROOT, "configs", "quickstart", name), opts)
    cfg.OUTPUT_DIR = output_dir
    resolve_genotype_config(cfg)  # config.yaml then records the ALB structure
    cfg.freeze()
    PathManager.mkdirs(output_dir)
    with PathManager.open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(cfg.dump())
    return cfg


def train(cfg) -> torch.nn.Module:
    """Train from scratch; the evaluation is left to the caller (one pass, with proposal recall)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    cfg.freeze()
    trainer = ElixirTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer.model


def precision_opts(choice: str, native_bfloat16: bool) -> Tuple[str, List[str]]:
    """(precision, config overrides) for --precision ``choice``: "auto" is bfloat16 autocast on
    a CPU with native bfloat16, float32 elsewhere (emulated bfloat16 is slower than float32)."""
    if choice == "auto":
        choice = "bfloat16" if native_bfloat16 else "float32"
    if choice not in ("float32", "bfloat16"):
        raise ValueError(f"--precision must be auto, float32 or bfloat16, got {choice!r}")
    return choice, amp_opts(choice)


# Each stage's time relative to FPN training's, from demo_results.json of a full run (bfloat16,
# 600 iterations: FPN 198 s, search 74 s, ElixirNet 231 s, evaluation 73 s); the
# ratios hold within about 15% in float32, where every stage is slower alike.
STAGE_WEIGHTS = {
    "FPN training": 1.0,
    "ALB search": 0.37,
    "ElixirNet training": 1.17,
    "evaluation": 0.37,
}


def stage_line(times: Dict[str, float], elapsed: float) -> str:
    """One line for the stage just finished (the last of ``times``): its time, the time elapsed
    and, once FPN training has set the pace, an estimate of the time to go."""
    name = list(times)[-1]
    done = [k for k in times if k in STAGE_WEIGHTS]
    left = [k for k in STAGE_WEIGHTS if k not in times]
    line = (
        f"[demo] stage {len(times)}/{len(STAGE_WEIGHTS) + 1} {name}: {times[name]:.0f} s; "
        f"{elapsed:.0f} s elapsed"
    )
    if done and left:
        pace = sum(times[k] for k in done) / sum(STAGE_WEIGHTS[k] for k in done)
        line += (
            f"; about {pace * sum(STAGE_WEIGHTS[k] for k in left):.0f} s to go ({', '.join(left)})"
        )
    elif not left:
        line += "; done"
    return line


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def detections_on(model, cfg, records: List[Dict], min_score: float) -> List[np.ndarray]:
    """Boxes (XYXY, record pixels) scoring at least ``min_score`` on each record."""
    mapper = CTDatasetMapper(cfg, is_train=False)
    model.eval()
    out = []
    with torch.no_grad():
        for r in records:
            inp = mapper(r)
            inst = model([inp])[0]["instances"].to("cpu")
            keep = inst.scores >= min_score
            out.append(inst.pred_boxes.tensor[keep].numpy())
    return out


def draw_figure(
    path: str, rows: Dict[str, Dict], cfg, models: Dict[str, torch.nn.Module], num_slices: int = 3
):
    """FROC curves (IoU) of the trained models and ``num_slices`` test slices with ground truth
    (green) and each model's detections of score >= 0.5 (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elixir_d2.data.ct_mapper import SliceStack
    from elixir_d2.visualization import draw_detections, window_for_display

    records = [r for r in DatasetCatalog.get(cfg.DATASETS.TEST[0]) if r.get("annotations")]
    picks = [records[i] for i in np.linspace(0, len(records) - 1, num_slices).astype(int)]
    dets = {name: detections_on(m, cfg, picks, 0.5) for name, m in models.items()}
    fig = plt.figure(figsize=(4 + 3 * len(models), 3 * num_slices), dpi=90)
    grid = fig.add_gridspec(num_slices, 1 + len(models), width_ratios=[1.4] + [1] * len(models))
    ax = fig.add_subplot(grid[:, 0])
    for name in models:
        ax.plot(
            PAPER_FPS, [rows[name][f"sens@{f:g}_iou"] for f in PAPER_FPS], marker="o", label=name
        )
    ax.set(
        xscale="log",
        xlabel="false positives per image",
        ylabel="sensitivity (%), IoU >= 0.5",
        title="FROC, synthetic test split",
        ylim=(0, 100),
    )
    ax.minorticks_off()
    ax.set_xticks(PAPER_FPS, [f"{f:g}" for f in PAPER_FPS])
    ax.grid(alpha=0.3)
    ax.legend()
    for i, r in enumerate(picks):
        hu = SliceStack(r["slice_dir"], r["slice_idx"], r["slice_range"]).slice_at(r["slice_idx"])
        gt = np.array([a["bbox"] for a in r["annotations"]]).reshape(-1, 4)
        for j, name in enumerate(models):
            img = draw_detections(window_for_display(hu), dets[name][i], gt_boxes=gt)
            a = fig.add_subplot(grid[i, 1 + j])
            a.imshow(img)
            a.set_axis_off()
            if i == 0:
                a.set_title(f"{name}\ngreen: lesions, red: score >= 0.5", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(
    path: str,
    rows: Dict[str, Dict],
    params: Dict[str, int],
    times: Dict[str, float],
    genotype: str,
    precision: str,
    prov: Dict,
) -> None:
    """demo_results.json: each model's metrics (NaN as null), parameters, stage seconds, the
    searched genotype, the training precision and the run's provenance."""
    clean = {k: {m: (v if v == v else None) for m, v in r.items()} for k, r in rows.items()}
    with PathManager.open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "rows": clean,
                "params": params,
                "seconds": times,
                "genotype": genotype,
                "precision": precision,
                "provenance": prov,
            },
            f,
            indent=2,
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    # 100 more than the quickstart's 500, paid for by bfloat16: at 500 the seeds' FPN ends near
    # 50% sensitivity at 4 FPs, at 600 above 55% (docs/results/regime.md, "bfloat16
    # training"); a float32 training step takes 1.3-1.5x as long (amp_speed.py).
    ap.add_argument("--iters", type=int, default=600, help="training iterations of each model")
    ap.add_argument(
        "--search-epochs", type=int, default=2, help="ALB search epochs (the first trains w only)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="training and search precision; auto: bfloat16 autocast where the CPU "
        "has native bfloat16 (AVX512-BF16 / AMX), else float32",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = os.path.abspath(args.output)
    opts = [
        "SEED",
        str(args.seed),
        "SOLVER.MAX_ITER",
        str(args.iters),
        "SOLVER.WARMUP_ITERS",
        str(min(50, args.iters // 4)),
        "SOLVER.STEPS",
        f"({int(args.iters * 0.75)},{int(args.iters * 0.92)})",
    ]
    precision, overrides = precision_opts(args.precision, native_cpu_bfloat16())
    opts += overrides
    t0, code = time.time(), code_state()
    fpn_cfg = config("fpn.yaml", os.path.join(out, "fpn"), opts)
    default_setup(
        fpn_cfg,
        argparse.Namespace(config_file="configs/quickstart/fpn.yaml", eval_only=False, opts=opts),
    )
    DatasetCatalog.get(fpn_cfg.DATASETS.TRAIN[0])  # generates the synthetic set on first use
    times = {"data": time.time() - t0}
    print(stage_line(times, time.time() - t0), flush=True)

    untrained = ElixirTrainer.build_model(fpn_cfg)  # random initialisation: the "before" row
    t = time.time()
    fpn = train(fpn_cfg)
    times["FPN training"] = time.time() - t
    print(stage_line(times, time.time() - t0), flush=True)

    t = time.time()
    search_cfg = config(
        "search_alb.yaml",
        os.path.join(out, "search"),
        opts
        + [
            "MODEL.WEIGHTS",
            os.path.join(fpn_cfg.OUTPUT_DIR, "model_final.pth"),
            "SEARCH.EPOCHS",
            str(args.search_epochs),
            "SEARCH.WARMUP_EPOCHS",
            str(min(1, args.search_epochs - 1)),
        ],
    )
    searcher = ALBSearcher(
        search_cfg,
        provenance="Command: projects/quickstart/demo.py",
        record={
            "searched": True,
            "method": "first-order differentiable search (demo.py)",
            "config": "configs/quickstart/search_alb.yaml",
            "epochs": args.search_epochs,
            "data": list(search_cfg.DATASETS.TRAIN),
        },
    )
    searcher.resume_or_load(resume=False)
    searcher.train()
    genotype = os.path.join(search_cfg.OUTPUT_DIR, "genotype.yaml")
    times["ALB search"] = time.time() - t
    print(stage_line(times, time.time() - t0), flush=True)

    t = time.time()
    elixir_cfg = config(
        "elixirnet.yaml", os.path.join(out, "elixirnet"), opts + ["MODEL.ALB.GENOTYPE", genotype]
    )
    elixir = train(elixir_cfg)
    times["ElixirNet training"] = time.time() - t
    print(stage_line(times, time.time() - t0), flush=True)

    t = time.time()
    models = {"FPN": fpn, "ElixirNet": elixir}
    untrained_cfg = fpn_cfg.clone()
    untrained_cfg.defrost()
    untrained_cfg.OUTPUT_DIR = os.path.join(out, "untrained")
    rows = {"FPN, untrained": evaluate_with_proposal_recall(untrained_cfg, untrained.eval())}
    for name, model, cfg in (("FPN", fpn, fpn_cfg), ("ElixirNet", elixir, elixir_cfg)):
        rows[name] = evaluate_with_proposal_recall(cfg, model.eval())
    draw_figure(os.path.join(out, "demo.png"), rows, fpn_cfg, models)
    times["evaluation"] = time.time() - t
    print(stage_line(times, time.time() - t0), flush=True)

    params = {
        "FPN, untrained": num_params(untrained),
        "FPN": num_params(fpn),
        "ElixirNet": num_params(elixir),
    }
    write_results(
        os.path.join(out, "demo_results.json"),
        rows,
        params,
        times,
        genotype,
        precision,
        provenance(
            None if argv is None else [__file__, *argv], seeds=[args.seed], started=t0, code=code
        ),
    )
    iters = fpn_cfg.SOLVER.MAX_ITER
    print(
        f"\n[demo] synthetic test split ({fpn_cfg.DATASETS.TEST[0]}): FPN and ElixirNet, {iters} "
        f"iterations each from scratch, seed {args.seed}, trained in {precision}; "
        f"{time.time() - t0:.0f} s in all " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    named = {f"{k} ({params[k] / 1e6:.2f}M params)": v for k, v in rows.items()}
    for criterion in ("iou", "iobb"):
        print()
        print(format_froc_table(named, criterion))
    print(
        "\nProposal recall (%) at IoU 0.5: "
        + "; ".join(
            f"{k}: "
            + " / ".join(f"{r.get(f'recall@{n}', float('nan')):.1f}" for n in (50, 100, 300))
            + " at 50/100/300"
            for k, r in rows.items()
        )
    )
    print(f"\n[demo] picture: {os.path.join(out, 'demo.png')}; ElixirNet's genotype: {genotype}")


if __name__ == "__main__":
    run_cli(main)
