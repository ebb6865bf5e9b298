#!/usr/bin/env python
"""How far training moved the RPN head from its initialisation, from checkpoints alone.

    python projects/benchmarks/rpn_head_weights.py output/quality/seed0/fpn/model_final.pth ...

detectron2's StandardRPNHead (and the heads derived from it) starts every conv weight from
N(0, 0.01^2) and every bias at 0. For each checkpoint, prints each RPN-head tensor's mean and std
next to that starting point (a weight whose std is still about 0.01 has barely been trained), and
the share of objectness weights above zero. Works for RPN and TRPN models alike (the head is
``proposal_generator.rpn_head`` in both).
"""

import argparse
import sys
from typing import Dict, List

import torch

PREFIX = "proposal_generator.rpn_head."
INIT_STD = 0.01  # StandardRPNHead.__init__: nn.init.normal_(weight, std=0.01), bias 0


def head_tensors(path: str) -> Dict[str, torch.Tensor]:
    """The RPN head's float tensors of the checkpoint at ``path``, by name inside the head."""
    # Our own training outputs; the state dict holds tensors and numbers only.
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    out = {
        k[len(PREFIX) :]: v.float()
        for k, v in state.items()
        if k.startswith(PREFIX) and v.is_floating_point()
    }
    if not out:
        raise ValueError(f"{path}: no tensor under '{PREFIX}' (not a detectron2 RPN/TRPN model?)")
    return out


def report(path: str) -> List[str]:
    """Lines for one checkpoint: name, shape, mean, std, and the init's mean/std for comparison."""
    lines = [path]
    tensors = head_tensors(path)
    for name, t in tensors.items():
        init = f"N(0, {INIT_STD})" if name.endswith("weight") and t.dim() == 4 else "-"
        std = float(t.std()) if t.numel() > 1 else 0.0
        lines.append(
            f"  {name:34s} {str(tuple(t.shape)):16s} mean {float(t.mean()):+.4f}  "
            f"std {std:.4f}   init {init}"
        )
    w = tensors.get("objectness_logits.weight")
    if w is not None:
        lines.append(f"  objectness weights > 0: {100.0 * float((w > 0).float().mean()):.1f}%")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoints", nargs="+", help="model_final.pth files")
    args = ap.parse_args(argv)
    for path in args.checkpoints:
        print("\n".join(report(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
