#!/usr/bin/env python
"""Proposal generation time of TRPN against detectron2's RPN on the same features.

Both modules are built from one config (only PROPOSAL_GENERATOR.NAME differs), TRPN's RPN head
gets the RPN's weights, and both run in inference mode on the same random FPN features. The
runs are interleaved (the order alternates), and the script prints the median of each and the
ratio TRPN / RPN (the issue's target: <= 1.1).

    python projects/benchmarks/trpn_speed.py                      # R-50 FPN, 512 px, CPU
    python projects/benchmarks/trpn_speed.py --device cuda --runs 50
"""
import argparse
import statistics
import time
from typing import Callable, Dict

import torch

from detectron2.modeling.backbone import build_backbone
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import ImageList

from elixir_d2 import load_config


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/trpn_fpn_R_50_deeplesion.yaml")
    ap.add_argument("--size", type=int, default=512, help="square image side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20, help="timed runs of each (>= 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    args = _parse()
    if args.runs < 10:
        raise ValueError(f"--runs={args.runs}: use at least 10 timed runs")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    cfg = load_config(args.config)  # safe YAML: a config file cannot run code
    cfg.MODEL.DEVICE = args.device
    shapes = build_backbone(cfg).output_shape()  # shapes only; features below are random

    modules: Dict[str, torch.nn.Module] = {}
    for name in ("RPN", "TRPN"):
        cfg.defrost()
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = name
        modules[name] = build_proposal_generator(cfg, shapes).to(device).eval()
    modules["TRPN"].rpn_head.load_state_dict(modules["RPN"].rpn_head.state_dict())

    n, s = args.batch, args.size
    feats = {
        f: torch.randn(n, shapes[f].channels, s // shapes[f].stride, s // shapes[f].stride,
                       device=device)
        for f in cfg.MODEL.RPN.IN_FEATURES
    }
    images = ImageList(torch.zeros(n, 3, s, s, device=device), [(s, s)] * n)

    times: Dict[str, list] = {"RPN": [], "TRPN": []}
    with torch.no_grad():
        for _ in range(args.warmup):
            for m in modules.values():
                m(images, feats)
        for i in range(args.runs):
            order = ("RPN", "TRPN") if i % 2 == 0 else ("TRPN", "RPN")
            for name in order:
                times[name].append(_timed(lambda: modules[name](images, feats), device))
        props = {k: sum(len(p) for p in m(images, feats)[0]) for k, m in modules.items()}
        trpn = modules["TRPN"]
        kept = sum(int(k.sum()) for k in trpn.last_keep_masks.values())
        total = sum(k.numel() for k in trpn.last_keep_masks.values())

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"config {args.config}  image {s}x{s}  batch {n}  device {args.device}  "
          f"threads {args.threads}  runs {args.runs} (interleaved)")
    print(f"levels {list(feats)}  anchors/location {modules['RPN'].anchor_generator.num_anchors}")
    print(f"RPN   median {med['RPN']:.2f} ms  proposals {props['RPN']}")
    print(f"TRPN  median {med['TRPN']:.2f} ms  proposals {props['TRPN']}  "
          f"locations kept {kept}/{total}")
    print(f"ratio TRPN / RPN = {med['TRPN'] / med['RPN']:.3f}")


if __name__ == "__main__":
    main()
