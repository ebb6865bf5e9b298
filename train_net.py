#!/usr/bin/env python
"""Train and evaluate ElixirNet and its baselines with detectron2.

    python train_net.py --config-file configs/elixirnet_R_50_FPN_deeplesion.yaml --num-gpus 4
    python train_net.py --config-file configs/quickstart/fpn.yaml            # CPU, synthetic data
    python train_net.py --config-file C --eval-only MODEL.WEIGHTS model_final.pth

Multi-machine: add --num-machines M --machine-rank R --dist-url tcp://<host0>:<port>.
"""
from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results

import elixir_d2  # noqa: F401  (registers models and datasets)
from elixir_d2 import load_config
from elixir_d2.engine import AtomicCheckpointer, ElixirTrainer, launch


# detectron2's DefaultTrainer with the CT mapper, the lesion evaluator, atomic checkpoints.
Trainer = ElixirTrainer


def setup(args) -> CfgNode:
    """Config from defaults + ElixirNet keys + the file + command-line opts."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
