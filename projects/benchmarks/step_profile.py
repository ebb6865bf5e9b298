#!/usr/bin/env python
"""Where a quickstart training step spends its time: torch.profiler over a few steps, per config.

    python projects/benchmarks/step_profile.py [--config fpn.yaml --config elixirnet.yaml]
        [--precision float32] [--steps 5] [--threads 2] [KEY VALUE ...]

The step is what train_net.py runs (elixir_d2.amp.build_step_trainer on the quickstart's training
batches). Each op's self CPU time is put in one group (convolutions forward and backward,
BatchNorm, RoIAlign, matrix products, NMS, the rest); the optimizer step (SGD with per-parameter
clipping) is shown beside them as its total, which overlaps the groups. Shares are of the
profiled time; ``s/it`` is timed without the profiler. To see what a CPU without AVX-512 runs,
cap the kernels: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from detectron2.utils.events import EventStorage

import elixir_d2
from elixir_d2.amp import amp_opts, build_step_trainer
from elixir_d2.modeling.genotype_source import resolve_genotype_config
from elixir_d2.trainer import ElixirTrainer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# (group, substrings of an op's profiler name), first match wins.
GROUPS = (
    ("convolution", ("convolution", "conv2d", "conv_depthwise")),
    ("BatchNorm", ("batch_norm",)),
    ("RoIAlign", ("roi_align",)),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("NMS", ("nms",)),
)


def op_group(name: str) -> str:
    """The group of a profiler op name; "other" for element-wise ops, copies, losses and the
    rest."""
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def group_times(events) -> Dict[str, float]:
    """Self CPU seconds per group over the profiler's ``key_averages()``, plus the optimizer
    step's total under "optimizer step (total)"."""
    out = {g: 0.0 for g, _ in GROUPS}
    out["other"] = 0.0
    opt = 0.0
    for e in events:
        if e.key.startswith("Optimizer.step"):
            opt += e.cpu_time_total / 1e6
            continue
        if e.key.startswith(("ProfilerStep", "Optimizer.zero_grad")):
            continue
        out[op_group(e.key)] += e.self_cpu_time_total / 1e6
    out["optimizer step (total)"] = opt
    return out


def profile_config(
    config: str, precision: str, steps: int, warmup: int, opts: Sequence[str] = ()
) -> Dict[str, float]:
    """{"s/it": timed seconds an iteration, group: profiled seconds an iteration, ...}."""
    cfg = elixir_d2.load_config(
        os.path.join(ROOT, "configs", "quickstart", config), list(opts) + amp_opts(precision)
    )
    resolve_genotype_config(cfg)
    torch.manual_seed(cfg.SEED)
    model = ElixirTrainer.build_model(cfg)
    data = list(itertools.islice(ElixirTrainer.build_train_loader(cfg), 4))
    loop = build_step_trainer(
        cfg, model, itertools.cycle(data), ElixirTrainer.build_optimizer(cfg, model)
    )
    with EventStorage():
        for _ in range(warmup):
            loop.run_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            loop.run_step()
        per_it = (time.perf_counter() - t0) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                loop.run_step()
    groups = {k: v / steps for k, v in group_times(prof.key_averages()).items()}
    return {"s/it": per_it, **groups}


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    """Markdown: per config, s/it and each group's ms an iteration and share of profiled time."""
    names = [g for g, _ in GROUPS] + ["other", "optimizer step (total)"]
    lines = ["| config | s/it | " + " | ".join(names) + " |", "|:--|--:|" + "--:|" * len(names)]
    for config, r in rows.items():
        profiled = sum(r[g] for g in names[:-1])
        cells = [f"{r[g] * 1e3:.0f} ms ({100 * r[g] / profiled:.0f}%)" for g in names]
        lines.append(f"| {config} | {r['s/it']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--config",
        action="append",
        dest="configs",
        metavar="NAME",
        help="a file under configs/quickstart, once per config (default: fpn.yaml "
        "and elixirnet.yaml)",
    )
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--steps", type=int, default=5, help="timed, then profiled, iterations")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = ap.parse_args(argv)
    configs: List[str] = args.configs or ["fpn.yaml", "elixirnet.yaml"]
    for config in configs:
        if not os.path.isfile(os.path.join(ROOT, "configs", "quickstart", config)):
            ap.error(
                f"configs/quickstart/{config} not found (--config takes a file name under "
                "configs/quickstart)"
            )
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    print(
        f"{args.precision}, {args.threads} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {args.steps} steps after {args.warmup} "
        "warm-up"
    )
    rows = {
        c: profile_config(c, args.precision, args.steps, args.warmup, args.opts) for c in configs
    }
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
