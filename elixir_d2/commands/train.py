"""What train_net.py runs: the config set-up, the input checks, training or evaluation in one
process (``main``) and the command line under detectron2's launcher (``cli``)."""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results

from .. import load_config
from ..amp import autocast_dtype
from ..checkpoint import AtomicCheckpointer, last_checkpoint_target
from ..cli import UserInputError, check_datasets, check_froc_convention, require_file
from ..modeling.genotype_source import resolve_genotype_config
from ..trainer import ElixirTrainer
from . import run_command

__all__ = ["Trainer", "setup", "check_inputs", "main", "cli"]


# detectron2's DefaultTrainer with the CT mapper, the lesion evaluator, atomic checkpoints.
Trainer = ElixirTrainer


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from defaults + ElixirNet keys + the file + command-line opts, its inputs checked;
    the ALB genotype resolved into MODEL.ALB.GENOTYPE_YAML (from the checkpoint with --eval-only
    when the config names none) before config.yaml is written."""
    cfg = check_inputs(args)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def check_inputs(args: argparse.Namespace) -> CfgNode:
    """The unfrozen config, after checking what the run reads: weights, genotype, datasets.
    Expected problems raise elixir_d2.cli.UserInputError (one line, exit code 2)."""
    cfg = load_config(args.config_file, args.opts)
    check_froc_convention(cfg)
    resuming = args.resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if resuming:  # checked here, before workers start: the tag must name a file in OUTPUT_DIR
        last_checkpoint_target(cfg.OUTPUT_DIR)
    if not resuming:  # a resumed run reads OUTPUT_DIR's checkpoint, not MODEL.WEIGHTS
        require_file(
            cfg.MODEL.WEIGHTS,
            "weights file MODEL.WEIGHTS",
            "give a checkpoint written by train_net.py, or MODEL.WEIGHTS '' to start from scratch",
        )
    # One call owns the genotype: with --eval-only a config naming none takes MODEL.WEIGHTS'.
    resolve_genotype_config(cfg, checkpoint=cfg.MODEL.WEIGHTS if args.eval_only else None)
    if not args.eval_only:
        try:
            autocast_dtype(cfg)
        except ValueError as e:
            raise UserInputError(str(e)) from None
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
    return cfg


def main(args: argparse.Namespace) -> Any:
    """Train (resuming with --resume) or, with --eval-only, evaluate MODEL.WEIGHTS; one process."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry: inputs checked in this process (one-line errors, exit code 2), then
    detectron2's launcher."""
    run_command(default_argument_parser(), check_inputs, main, argv)
