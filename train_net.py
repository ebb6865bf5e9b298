#!/usr/bin/env python
"""Train and evaluate ElixirNet and its baselines with detectron2.

    python train_net.py --config-file configs/elixirnet_R_50_FPN_deeplesion.yaml --num-gpus 4
    python train_net.py --config-file configs/quickstart/fpn.yaml            # CPU, synthetic data
    python train_net.py --config-file C --eval-only MODEL.WEIGHTS model_final.pth

Multi-machine: add --num-machines M --machine-rank R --dist-url tcp://<host0>:<port>.
"""

from elixir_d2.cli import run_cli
from elixir_d2.commands.train import Trainer, check_inputs, cli, main, setup  # noqa: F401  (the script's API)

if __name__ == "__main__":
    run_cli(cli)
