#!/usr/bin/env python
"""Training step time in float32 against bfloat16 autocast (SOLVER.AMP.PRECISION bfloat16).

    python projects/benchmarks/amp_speed.py [--config fpn.yaml --config elixirnet.yaml] [--rounds 8]
                                            [KEY VALUE ...]

Per quickstart config, two copies of one initialised model train side by side in this process,
one through the float32 loop and one through the bfloat16 one (elixir_d2.amp.build_step_trainer,
what train_net.py runs), on the same training batches (the CT mapper's crops), rounds
interleaved with the order reversed every other round. Prints the median seconds an iteration
and the ratio bfloat16 / float32, and whether this CPU has native bfloat16 (without it oneDNN
emulates bfloat16 and the ratio is above 1).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from detectron2.utils.events import EventStorage

import elixir_d2
from elixir_d2.amp import amp_opts, build_step_trainer, native_cpu_bfloat16
from elixir_d2.modeling.genotype_source import resolve_genotype_config
from elixir_d2.trainer import ElixirTrainer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PRECISIONS = ("float32", "bfloat16")


def time_config(
    config: str, rounds: int, warmup: int, batches: int, opts: Sequence[str] = ()
) -> Dict[str, List[float]]:
    """Seconds of each timed iteration, per precision, for one quickstart config."""
    path = os.path.join(ROOT, "configs", "quickstart", config)
    cfgs = {}
    for p in PRECISIONS:
        cfgs[p] = elixir_d2.load_config(path, list(opts) + amp_opts(p))
        resolve_genotype_config(cfgs[p])
    torch.manual_seed(cfgs["float32"].SEED)
    model = ElixirTrainer.build_model(cfgs["float32"])
    data = list(itertools.islice(ElixirTrainer.build_train_loader(cfgs["float32"]), batches))
    loops = {}
    for p in PRECISIONS:
        m = copy.deepcopy(model)
        loops[p] = build_step_trainer(
            cfgs[p], m, itertools.cycle(data), ElixirTrainer.build_optimizer(cfgs[p], m)
        )
    times: Dict[str, List[float]] = {p: [] for p in PRECISIONS}
    with EventStorage():
        for r in range(warmup + rounds):
            for p in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                t0 = time.perf_counter()
                loops[p].run_step()
                if r >= warmup:
                    times[p].append(time.perf_counter() - t0)
    return times


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, List[float]]]:
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
    ap.add_argument("--rounds", type=int, default=8, help="timed iterations per precision")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4, help="distinct training batches, cycled")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = ap.parse_args(argv)
    args.configs = args.configs or ["fpn.yaml", "elixirnet.yaml"]
    for config in args.configs:  # checked before any timing
        if not os.path.isfile(os.path.join(ROOT, "configs", "quickstart", config)):
            ap.error(
                f"configs/quickstart/{config} not found (--config takes a file name under "
                "configs/quickstart)"
            )
    torch.set_num_threads(args.threads)
    print(
        f"CPU with native bfloat16: {native_cpu_bfloat16()}; {args.threads} threads, "
        f"{args.rounds} timed iterations per precision after {args.warmup} warm-up"
    )
    print("| config | float32 s/it | bfloat16 s/it | bfloat16 / float32 |")
    print("|:--|--:|--:|--:|")
    out = {}
    for config in args.configs:
        t = time_config(config, args.rounds, args.warmup, args.batches, args.opts)
        f32, b16 = statistics.median(t["float32"]), statistics.median(t["bfloat16"])
        print(f"| {config} | {f32:.3f} | {b16:.3f} | {b16 / f32:.2f} |", flush=True)
        out[config] = t
    return out


if __name__ == "__main__":
    main()
