#!/usr/bin/env python
"""Training step of the searchable ALB head: its mixed ops summed in channels_last or not.

    python projects/benchmarks/search_head.py [--rounds 9] [--threads 2] [--rois 128]

Builds the ALBSearchHead of configs/quickstart/search_alb.yaml (random weights) and times forward +
backward on ``--rois`` random pooled RoI features of 4 images (the quickstart search samples 32
RoIs from each of 4 images), as ALBSearcher's weight and alpha steps run it. Two variants of the
same head, in one process, rounds interleaved with the order swapped every other round: the
mixed-op sum as shipped (each op output brought to channels_last, cells.MixedOp) and the sum of
the ops' outputs in whatever layout they return (``none``'s zeros and region_nonlocal's broadcast
output are NCHW, so the sum and every conv after it turn NCHW). Prints the median ms of each and
the median of the per-round ratios.
"""

import os

if __name__ == "__main__":
    from pin_threads import pin_threads, threads_from_argv  # the script's folder is on sys.path

    pin_threads(threads_from_argv(default=2))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

from elixir_d2 import load_config  # noqa: E402
from elixir_d2.modeling.alb import cells  # noqa: E402

from models_speed import median_ratio  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SEARCH_CFG = os.path.join(ROOT, "configs", "quickstart", "search_alb.yaml")


def time_layouts(rounds: int, rois: int, repeats: int = 3) -> Dict[str, List[float]]:
    """Seconds per forward + backward of the searchable head, per round and variant."""
    cfg = load_config(SEARCH_CFG, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    head = build_model(cfg).roi_heads.box_head.train()
    channels = (
        cfg.MODEL.ALB.STEM_CHANNELS
        if head.pointwise_before_pooling
        else (cfg.MODEL.FPN.OUT_CHANNELS)
    )
    x = torch.randn(rois, channels, 7, 7, requires_grad=True)
    counts = [rois // 4] * 3 + [rois - 3 * (rois // 4)]
    shipped = cells.channels_last
    variants = {"channels_last sum (shipped)": shipped, "ops' own layouts": lambda t: t}

    def step() -> None:
        features, _ = head(x, counts)
        features.square().mean().backward()

    times: Dict[str, List[float]] = {k: [] for k in variants}
    try:
        for layout in variants.values():  # warm-up
            cells.channels_last = layout
            step()
        for r in range(rounds):
            order = list(variants.items())
            for name, layout in order if r % 2 == 0 else order[::-1]:
                cells.channels_last = layout
                t = time.perf_counter()
                for _ in range(repeats):
                    step()
                times[name].append((time.perf_counter() - t) / repeats)
    finally:
        cells.channels_last = shipped
    return times


def main(argv: Optional[Sequence[str]] = None) -> float:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rois", type=int, default=128)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    times = time_layouts(args.rounds, args.rois)
    ratio = median_ratio(*times.values())
    print(
        f"ALBSearchHead ({os.path.relpath(SEARCH_CFG, ROOT)}), forward + backward on {args.rois} "
        f"RoIs, {args.threads} thread(s), {args.rounds} interleaved rounds:"
    )
    for name, ts in times.items():
        print(f"  {name:28s} {statistics.median(ts) * 1e3:8.1f} ms")
    print(f"  ratio shipped / ops' own layouts = {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
