#!/usr/bin/env python
"""Proposal generation time of TRPN against detectron2's RPN on the same features.

Both modules are built from one config (only PROPOSAL_GENERATOR.NAME differs), TRPN's RPN head
gets the RPN's weights, and both run in inference mode on the same random FPN features. The
runs are interleaved (the order alternates), and the script prints the median of each and the
ratio TRPN / RPN (the issue's target: <= 1.1).

Two timings:

* module: the whole forward (confidence branch + RPN head + proposals), TRPN against RPN;
* proposal stage: box decoding, top-k and NMS alone, on TRPN's own head outputs, once through
  TRPN's ``predict_proposals`` with its keep masks and once through detectron2's
  ``RPN.predict_proposals`` with none, so the difference is what truncation saves (or costs).

``--keep-frac F`` sets a fixed MODEL.TRPN.THRESHOLD at the quantile of p that keeps a fraction F
of the locations (with random weights p sits near PRIOR_PROB everywhere, so no round threshold
truncates part of it); without it the config's threshold is used (the DeepLesion config: the
per-image mean).

    python projects/benchmarks/trpn_speed.py                      # R-50 FPN, 512 px, CPU
    python projects/benchmarks/trpn_speed.py --keep-frac 0.2      # a threshold keeping 20%
    python projects/benchmarks/trpn_speed.py --device cuda --runs 50
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from detectron2.modeling.backbone import build_backbone
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import ImageList

from elixir_d2 import load_config
from elixir_d2.modeling.capture import capture


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
    ap.add_argument(
        "--keep-frac",
        type=float,
        default=None,
        help="fixed threshold keeping this fraction of locations, in (0, 1]",
    )
    return ap.parse_args()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _interleaved(
    fns: Dict[str, Callable[[], object]], runs: int, warmup: int, device: torch.device
) -> Dict[str, float]:
    """Median milliseconds of each function, run alternately so load changes hit both."""
    names = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in names}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(_timed(fns[name], device))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _proposal_stage_args(trpn: torch.nn.Module, images: ImageList, feats) -> tuple:
    """The arguments TRPN's forward passes to its predict_proposals (head outputs, sizes,
    keep masks), caught on one call so that the stage can be timed alone."""
    caught: Dict[str, tuple] = {}
    original = trpn.predict_proposals

    def catch(*args, **kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        return original(*args, **kwargs)

    trpn.predict_proposals = catch  # instance attribute, removed below
    try:
        trpn(images, feats)
    finally:
        del trpn.predict_proposals
    return caught["args"], caught["kwargs"]


def main() -> None:
    args = _parse()
    if args.runs < 10:
        raise ValueError(f"--runs={args.runs}: use at least 10 timed runs")
    if args.keep_frac is not None and not 0.0 < args.keep_frac <= 1.0:
        raise ValueError(f"--keep-frac={args.keep_frac}: must be in (0, 1]")
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
    trpn = modules["TRPN"]

    n, s = args.batch, args.size
    feats = {
        f: torch.randn(
            n, shapes[f].channels, s // shapes[f].stride, s // shapes[f].stride, device=device
        )
        for f in cfg.MODEL.RPN.IN_FEATURES
    }
    images = ImageList(torch.zeros(n, 3, s, s, device=device), [(s, s)] * n)

    threshold: Optional[float] = None
    with torch.no_grad():
        if args.keep_frac is not None:
            p = torch.cat([torch.sigmoid(trpn.conf_head(feats[f])).flatten() for f in feats])
            # Strictly above the threshold survives: the (1 - F) quantile keeps about F.
            threshold = float(torch.quantile(p.double().cpu(), 1.0 - args.keep_frac))
            trpn.threshold = min(max(threshold, 0.0), 1.0 - 1e-9)
        module_ms = _interleaved(
            {k: (lambda m=m: m(images, feats)) for k, m in modules.items()},
            args.runs,
            args.warmup,
            device,
        )
        stage_args, stage_kwargs = _proposal_stage_args(trpn, images, feats)
        head_outputs = stage_args[:4]  # anchors, logits, deltas, image sizes
        stage_ms = _interleaved(
            {
                "RPN": lambda: RPN.predict_proposals(trpn, *head_outputs),
                "TRPN": lambda: trpn.predict_proposals(*stage_args, **stage_kwargs),
            },
            args.runs,
            args.warmup,
            device,
        )
        with capture(trpn, "trpn_confidence") as confidence:
            props = {k: sum(len(p) for p in m(images, feats)[0]) for k, m in modules.items()}
        kept = sum(int(k.sum()) for k in confidence[0].keep_masks.values())
        total = sum(k.numel() for k in confidence[0].keep_masks.values())

    print(
        f"config {args.config}  image {s}x{s}  batch {n}  device {args.device}  "
        f"threads {args.threads}  runs {args.runs} (interleaved)"
    )
    thr = (
        f"config {cfg.MODEL.TRPN.THRESHOLD}"
        if threshold is None
        else f"{threshold:.6g} (--keep-frac {args.keep_frac})"
    )
    print(
        f"levels {list(feats)}  anchors/location {modules['RPN'].anchor_generator.num_anchors}  "
        f"threshold {thr}"
    )
    print(f"module          RPN  {module_ms['RPN']:8.2f} ms  proposals {props['RPN']}")
    print(
        f"module          TRPN {module_ms['TRPN']:8.2f} ms  proposals {props['TRPN']}  "
        f"locations kept {kept}/{total}"
    )
    print(f"module          ratio TRPN / RPN = {module_ms['TRPN'] / module_ms['RPN']:.3f}")
    print(f"proposal stage  RPN  {stage_ms['RPN']:8.2f} ms  (same head outputs, nothing truncated)")
    print(f"proposal stage  TRPN {stage_ms['TRPN']:8.2f} ms")
    print(f"proposal stage  ratio TRPN / RPN = {stage_ms['TRPN'] / stage_ms['RPN']:.3f}")


if __name__ == "__main__":
    main()
