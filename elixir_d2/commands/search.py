"""What search_net.py runs: the config set-up, the input checks, the search (or a random genotype)
in one process (``main``) and the command line under detectron2's launcher (``cli``)."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from typing import Optional, Sequence

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from .. import load_config
from ..cli import UserInputError, check_datasets, require_file
from ..modeling.alb.genotype import Genotype, save_genotype
from ..search import GENOTYPE_YAML, ALBSearcher, format_genotype, sample_random_genotype
from ..search.step import check_search_amp
from . import run_command

logger = logging.getLogger("elixir_d2")

__all__ = [
    "build_parser",
    "check_inputs",
    "provenance",
    "setup",
    "command_line",
    "write_random_genotype",
    "main",
    "cli",
]


def build_parser() -> argparse.ArgumentParser:
    """detectron2's default parser plus --random."""
    parser = default_argument_parser()
    parser.add_argument(
        "--random",
        action="store_true",
        help="sample a genotype uniformly from the search space (seed: SEED, random if < 0) "
        "instead of searching",
    )
    return parser


def check_inputs(args: argparse.Namespace) -> CfgNode:
    """The unfrozen config, after checking the weights and training data a search reads.
    Expected problems raise elixir_d2.cli.UserInputError (one line, exit code 2)."""
    if args.eval_only:
        raise UserInputError(
            "search_net.py has no --eval-only; evaluate a genotype with train_net.py"
        )
    cfg = load_config(args.config_file, args.opts)
    if not args.random:
        try:
            check_search_amp(cfg)
        except ValueError as e:
            raise UserInputError(str(e)) from None
        require_file(
            cfg.MODEL.WEIGHTS,
            "weights file MODEL.WEIGHTS",
            "give the trained FPN baseline the search starts from (train_net.py's model_final.pth)",
        )
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    return cfg


def provenance(cfg: CfgNode, args: argparse.Namespace, searched: bool) -> dict:
    """What the genotype file records of its origin: config, data, epochs, date, command."""
    info = {
        "searched": searched,
        "method": "first-order differentiable search (search_net.py)"
        if searched
        else f"uniform random sample (search_net.py --random, seed {cfg.SEED})",
        "config": args.config_file,
    }
    if searched:
        info.update(
            {
                "data": list(cfg.DATASETS.TRAIN),
                "epochs": cfg.SEARCH.EPOCHS,
                "weights": cfg.MODEL.WEIGHTS,
            }
        )
    info.update(
        {
            "space": cfg.MODEL.ALB.SEARCH_SPACE,
            "date": datetime.date.today().isoformat(),
            "command": command_line(args)[len("Command: ") :],
        }
    )
    return info


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from defaults + ElixirNet keys + the file + command-line opts, inputs checked."""
    cfg = check_inputs(args)
    cfg.freeze()
    default_setup(cfg, args)
    # The search logs its per-epoch genotypes under "elixir_d2": to the console and log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="elixir_d2")
    return cfg


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, for the genotype file's header."""
    parts = ["python search_net.py", "--config-file", args.config_file]
    if args.random:
        parts.append("--random")
    if args.num_gpus > 1 or args.num_machines > 1:
        parts += ["--num-gpus", str(args.num_gpus), "--num-machines", str(args.num_machines)]
    return "Command: " + " ".join(parts + [str(o) for o in args.opts])


def write_random_genotype(
    cfg: CfgNode, provenance: str = "", record: Optional[dict] = None
) -> Genotype:
    """Sample a random genotype of cfg's space / branches (seed cfg.SEED, drawn if < 0) and
    write it to OUTPUT_DIR/genotype.yaml."""
    seed = cfg.SEED if cfg.SEED >= 0 else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    genotype = sample_random_genotype(cfg.MODEL.ALB.SEARCH_SPACE, cfg.MODEL.ALB.BRANCHES, seed)
    path = os.path.join(cfg.OUTPUT_DIR, GENOTYPE_YAML)
    if comm.is_main_process():
        PathManager.mkdirs(cfg.OUTPUT_DIR)
        comment = "\n".join(
            [
                "RANDOM ALB / ALB_r genotype (paper Table 6, 'random ALB'): NOT a search result.",
                f"Sampled uniformly by search_net.py --random with seed {seed}: per branch 2 "
                "distinct inputs and a non-none op each,",
                f"space {cfg.MODEL.ALB.SEARCH_SPACE}, B={cfg.MODEL.ALB.BRANCHES}.",
                *([provenance] if provenance else []),
            ]
        )
        save_genotype(genotype, path, comment=comment, provenance=record)
    logger.info(
        "Random genotype (seed %d) written to %s: %s", seed, path, format_genotype(genotype)
    )
    return genotype


def main(args: argparse.Namespace) -> Genotype | None:
    """Search (or sample with --random); returns the genotype written to OUTPUT_DIR."""
    cfg = setup(args)
    if args.random:
        return write_random_genotype(cfg, command_line(args), provenance(cfg, args, searched=False))
    searcher = ALBSearcher(
        cfg, provenance=command_line(args), record=provenance(cfg, args, searched=True)
    )
    searcher.resume_or_load(resume=args.resume)
    return searcher.train()


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry: inputs checked in this process (one-line errors, exit code 2), then
    detectron2's launcher."""
    run_command(build_parser(), check_inputs, main, argv)
