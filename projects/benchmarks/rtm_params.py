#!/usr/bin/env python
"""RTM parameter target: parameters RTM adds to "ElixirNet w/o RTM".

    python projects/benchmarks/rtm_params.py [--strict] [--quickstart]

Builds the full models of configs/elixirnet_wo_rtm_finetune_deeplesion.yaml and
configs/elixirnet_rtm_finetune_deeplesion.yaml (R-50-FPN, MODEL.WEIGHTS "", DEVICE cpu; nothing
frozen, so every parameter is counted), prints each count, the RTM parts and the relative increase
(target <= +0.5%; the paper reports +0.2%). ``--quickstart`` uses the quickstart configs instead.
``--strict`` exits 1 when the target is missed.
"""

import argparse
import os
import sys

import torch

from detectron2.modeling import build_model

from elixir_d2 import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = 0.005  # +0.5%
CONFIGS = {
    False: (
        "configs/elixirnet_wo_rtm_finetune_deeplesion.yaml",
        "configs/elixirnet_rtm_finetune_deeplesion.yaml",
    ),
    True: (
        "configs/quickstart/elixirnet_wo_rtm_finetune.yaml",
        "configs/quickstart/elixirnet_rtm_finetune.yaml",
    ),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(path: str) -> torch.nn.Module:
    cfg = load_config(
        os.path.join(REPO, path),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.FREEZE_MODULES", "[]"],
    )
    return build_model(cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quickstart", action="store_true", help="quickstart (R-18) configs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    torch.manual_seed(0)
    wo_path, rtm_path = CONFIGS[args.quickstart]
    wo, rtm = build(wo_path), build(rtm_path)
    n_wo, n_rtm = count(wo), count(rtm)
    heads = rtm.roi_heads
    print(f"ElixirNet w/o RTM  {n_wo:>12,d}  ({wo_path})")
    print(f"ElixirNet (RTM)    {n_rtm:>12,d}  ({rtm_path})")
    own_phi = count(heads.rtm.phi) if heads.rtm.phi is not None else 0
    print(
        f"  W_E {tuple(heads.rtm.w_e.shape)}: {heads.rtm.w_e.numel():,d}; multi-type predictor "
        f"over [f, f_E]: {count(heads.rtm.predictor):,d}; own relation phi: {own_phi:,d}; "
        f"binary predictor kept: {count(heads.box_predictor):,d}"
    )
    print(f"  replaced in w/o RTM: 8-type predictor over f: {count(wo.roi_heads.box_predictor):,d}")
    ratio = n_rtm / n_wo - 1.0
    ok = ratio <= TARGET
    print(
        f"RTM adds {n_rtm - n_wo:,d} parameters = +{100 * ratio:.3f}% "
        f"(target <= +{100 * TARGET:.1f}%, paper +0.2%): {'OK' if ok else 'MISSED'}"
    )
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
