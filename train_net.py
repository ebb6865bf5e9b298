#!/usr/bin/env python
"""Train and evaluate ElixirNet and its baselines with detectron2.

    python train_net.py --config-file configs/elixirnet_R_50_FPN_deeplesion.yaml --num-gpus 4
    python train_net.py --config-file configs/quickstart/fpn.yaml            # CPU, synthetic data
    python train_net.py --config-file C --eval-only MODEL.WEIGHTS model_final.pth

Multi-machine: add --num-machines M --machine-rank R --dist-url tcp://<host0>:<port>.
"""
from __future__ import annotations

import os

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results

import elixir_d2  # noqa: F401  (registers models and datasets)
from elixir_d2 import load_config
from elixir_d2.checkpoint import AtomicCheckpointer, fill_genotype_from_checkpoint
from elixir_d2.cli import check_datasets, require_file, run_cli
from elixir_d2.launch import launch
from elixir_d2.modeling.genotype_source import resolve_genotype_config
from elixir_d2.trainer import ElixirTrainer


# detectron2's DefaultTrainer with the CT mapper, the lesion evaluator, atomic checkpoints.
Trainer = ElixirTrainer


def setup(args) -> CfgNode:
    """Config from defaults + ElixirNet keys + the file + command-line opts, its inputs checked;
    the ALB genotype resolved into MODEL.ALB.GENOTYPE_YAML (from the checkpoint with --eval-only
    when the config names none) before config.yaml is written."""
    cfg = check_inputs(args)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def check_inputs(args) -> CfgNode:
    """The unfrozen config, after checking what the run reads: weights, genotype, datasets.
    Expected problems raise elixir_d2.cli.UserInputError (one line, exit code 2)."""
    cfg = load_config(args.config_file, args.opts)
    resuming = args.resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not resuming:  # a resumed run reads OUTPUT_DIR's checkpoint, not MODEL.WEIGHTS
        require_file(cfg.MODEL.WEIGHTS, "weights file MODEL.WEIGHTS",
                     "give a checkpoint written by train_net.py, or MODEL.WEIGHTS '' to start from scratch")
    if args.eval_only:
        fill_genotype_from_checkpoint(cfg, cfg.MODEL.WEIGHTS)
    resolve_genotype_config(cfg)
    if not args.eval_only:
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
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


def cli(argv=None) -> None:
    """Command-line entry: inputs checked in this process (one-line errors, exit code 2), then
    detectron2's launcher."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    check_inputs(args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    run_cli(cli)
