#!/usr/bin/env python
"""Run a trained lesion detector on new CT and write what it found.

    python predict_net.py --config-file configs/quickstart/fpn.yaml --weights model_final.pth \\
        --input PATH --output DIR [--gt DL_info.csv | gt.json] [--score-thresh 0.5] [--device cpu]

PATH: a DeepLesion slice folder (NNN.png) or one key slice in it, a NIfTI volume (.nii/.nii.gz),
a DICOM series folder, or a folder of such cases. Outputs (see elixir_d2/inference/runner.py):
per-case detections.json / detections.csv / findings.csv, overlay PNGs, coco_results.json,
summary.json; froc.png with --gt; relation graphs with --draw-relations (ALB head); TRPN
confidence maps with --draw-confidence; report.html per case and index.html (--report none: not).
Trailing KEY VALUE pairs override config keys.
Case ids (output folder names) come from file and folder names, made safe and unique; inputs are
named relative to PATH; --anonymize-ids replaces the ids by case_0001, ... A non-empty DIR is
refused unless --overwrite or --resume (an interrupted run: the case folders it finished, verified
against their manifests, are kept, the rest done); cases larger than --max-voxels are refused from
their headers. Ctrl-C ends with one line saying how many cases are done (exit code 130).

Several processes, as train_net.py: --num-gpus N (per machine; CPU processes over gloo without
CUDA) --num-machines M --machine-rank R --dist-url tcp://HOST:PORT. The cases are split across
the processes round robin; rank 0 writes the run files at the end, the same bytes one process
writes. DIR must be one folder all machines see.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta

import torch.multiprocessing as mp

from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from elixir_d2 import load_config
from elixir_d2.cli import (
    EXIT_USER_ERROR,
    MissingFileError,
    UserInputError,
    check_froc_convention,
    escape_name,
    one_line,
    require_file,
    run_cli,
)
from elixir_d2.inference import PredictOptions, run_prediction
from elixir_d2.inference.orientation import DEFAULT_MAX_VOXELS
from elixir_d2.inference.runner import INPUT_ERRORS, RunInterrupted
from elixir_d2.launch import launch
from elixir_d2.modeling.genotype_source import resolve_genotype_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config-file", required=True, metavar="FILE")
    ap.add_argument(
        "--weights", default=None, help="checkpoint (default: MODEL.WEIGHTS of the config)"
    )
    ap.add_argument("--input", required=True, metavar="PATH")
    ap.add_argument("--output", required=True, metavar="DIR")
    ap.add_argument(
        "--gt",
        default=None,
        help="ground truth: DeepLesion DL_info.csv or {case: {slice: [boxes]}} JSON",
    )
    ap.add_argument(
        "--score-thresh", type=float, default=0.5, help="keep detections scoring at least this"
    )
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: MODEL.DEVICE)")
    ap.add_argument("--batch-size", type=int, default=4, help="slices per forward pass")
    ap.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="DeepLesion folders: pixel spacing in mm (else DL_info.csv)",
    )
    ap.add_argument(
        "--slice-intv",
        type=float,
        default=None,
        help="DeepLesion folders: slice interval in mm (else DL_info.csv)",
    )
    ap.add_argument(
        "--view-window",
        type=float,
        nargs=2,
        default=(-175.0, 275.0),
        metavar=("LO", "HI"),
        help="HU window of the overlay pictures",
    )
    ap.add_argument(
        "--overlays",
        choices=("detections", "all", "none"),
        default="detections",
        help="overlay PNGs for slices with a detection or ground truth (default), "
        "every slice, or none",
    )
    ap.add_argument(
        "--report",
        choices=("html", "none"),
        default="html",
        help="report.html per case (slice scroller, boxes, findings; with --gt hits, "
        "misses, FROC) and index.html for the run (default), or none",
    )
    ap.add_argument(
        "--draw-relations",
        action="store_true",
        help="relation graph of the ALB head (paper Fig. 5)",
    )
    ap.add_argument(
        "--draw-confidence", action="store_true", help="TRPN location confidence heat maps"
    )
    ap.add_argument(
        "--group-iou", type=float, default=0.3, help="IoU linking detections on nearby slices"
    )
    ap.add_argument("--group-gap", type=int, default=1, help="largest slice gap linking detections")
    reuse = ap.add_mutually_exclusive_group()
    reuse.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse a non-empty --output: replace what an earlier run wrote there (else refused)",
    )
    reuse.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run in --output: keep the case folders it "
        "completed (checked against their manifests), do the others",
    )
    ap.add_argument(
        "--max-voxels",
        type=int,
        default=DEFAULT_MAX_VOXELS,
        metavar="N",
        help="refuse a case of more voxels, from its header (default "
        f"{DEFAULT_MAX_VOXELS:,}: 512 x 512 x 2048); 0: no limit",
    )
    ap.add_argument(
        "--anonymize-ids",
        default=None,
        metavar="MAPPING.csv",
        help="name cases case_0001, ... in every output (case ids otherwise come from "
        "file and folder names) and write which input each id is to MAPPING.csv, "
        "outside --output",
    )
    ap.add_argument(
        "--dicom-sr",
        action="store_true",
        help="DICOM series: also write <case>/dicom_sr/sr.dcm, a TID 1500 DICOM SR of "
        "the findings; it carries the patient's identifiers (needs highdicom)",
    )
    ap.add_argument("--no-progress", action="store_true")
    dist = ap.add_argument_group("several processes (detectron2's launcher, as train_net.py)")
    dist.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        metavar="N",
        help="processes per machine: one per GPU, or CPU processes over gloo "
        "without CUDA (default 1)",
    )
    dist.add_argument("--num-machines", type=int, default=1, metavar="M")
    dist.add_argument(
        "--machine-rank", type=int, default=0, metavar="R", help="this machine's rank, 0 .. M-1"
    )
    dist.add_argument(
        "--dist-url",
        default="auto",
        metavar="URL",
        help="tcp://HOST:PORT of machine 0 (several machines); auto: a free local port",
    )
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return ap


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    if args.weights is not None:
        cfg.MODEL.WEIGHTS = args.weights
    if args.device is not None:
        cfg.MODEL.DEVICE = args.device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.score_thresh
    check_froc_convention(cfg)  # read with --gt, at the end of the run: refused before it starts
    if not cfg.MODEL.WEIGHTS:
        raise MissingFileError(
            "no weights given: pass --weights with a checkpoint written by train_net.py"
        )
    require_file(
        cfg.MODEL.WEIGHTS,
        "weights file",
        "pass --weights with a checkpoint written by train_net.py",
    )
    # the checkpoint's genotype when the config names none
    resolve_genotype_config(cfg, checkpoint=cfg.MODEL.WEIGHTS)
    cfg.freeze()
    return cfg


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# The ranks meet once at the end, where the fastest waits for the slowest to finish its share of
# an archive: far longer than a training step's collective.
DIST_TIMEOUT = timedelta(hours=24)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logger(name="elixir_d2")
    if args.num_gpus < 1 or args.num_machines < 1 or not 0 <= args.machine_rank < args.num_machines:
        raise UserInputError(
            f"--num-gpus {args.num_gpus} --num-machines {args.num_machines} "
            f"--machine-rank {args.machine_rank}: need N >= 1, M >= 1 and "
            "0 <= R < M"
        )
    if args.num_gpus * args.num_machines == 1:
        return _run_guarded(args)
    return _launch_ranks(args)


def _run_guarded(args: argparse.Namespace) -> int:
    """The run in this process; Ctrl-C ends it with one line and exit code 130."""
    try:
        return _predict(args)
    except RunInterrupted as e:
        _say(f"predict_net.py: {e}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say("predict_net.py: interrupted before any case was started")
        return EXIT_INTERRUPTED


def _say(line: str) -> None:
    """A message of the run on stderr, once: from rank 0 when there are several processes."""
    if comm.is_main_process():
        print(line, file=sys.stderr)


def _launch_ranks(args: argparse.Namespace) -> int:
    """The run over --num-gpus x --num-machines processes; the config, the weights and the input
    are checked here first, so that a mistake is one line, not one per process."""
    setup_cfg(args)
    _require_input(args.input)
    try:
        launch(
            _rank_main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=DIST_TIMEOUT,
        )
    except mp.ProcessExitedException as e:  # the rank said why before it exited
        return e.exit_code if e.exit_code > 0 else 128 - e.exit_code  # -N: killed by signal N
    except KeyboardInterrupt:
        print(
            "predict_net.py: interrupted; rerun with --resume to keep the finished cases",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


def _rank_main(args: argparse.Namespace) -> None:
    """One rank of a run over several processes: exits with the run's exit code."""
    setup_logger(name="elixir_d2", distributed_rank=comm.get_rank())
    try:
        rc = _run_guarded(args)
    except UserInputError as e:  # the same error on every rank: rank 0 prints it
        _say(f"predict_net.py: error: {escape_name(one_line(e))}")
        rc = EXIT_USER_ERROR
    if rc:
        sys.exit(rc)


def _require_input(path: str) -> None:
    if not os.path.exists(path):
        raise MissingFileError(
            f"--input {escape_name(path)} not found; give a slice folder, a "
            "NIfTI file, a DICOM series folder or a folder of such cases"
        )


def _predict(args: argparse.Namespace) -> int:
    cfg = setup_cfg(args)
    _require_input(args.input)
    opts = PredictOptions(
        batch_size=args.batch_size,
        spacing=args.spacing,
        slice_interval=args.slice_intv,
        view_window=tuple(args.view_window),
        overlays=args.overlays,
        draw_relations=args.draw_relations,
        draw_confidence=args.draw_confidence,
        group_iou=args.group_iou,
        group_gap=args.group_gap,
        report=args.report,
        gt=args.gt,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        resume=args.resume,
        max_voxels=args.max_voxels or None,
        anonymize_ids=args.anonymize_ids,
        dicom_sr=args.dicom_sr,
    )
    try:
        summary = run_prediction(cfg, args.input, args.output, opts)
    # unusable input; a model that cannot draw what was asked; a bad ground truth file
    except INPUT_ERRORS + (ValueError,) as e:
        _say(f"predict_net.py: error: {escape_name(e)}")
        return EXIT_USER_ERROR
    if summary is None:  # not rank 0: rank 0 reports the run
        return 0
    t = summary["timing_s"]
    print(
        f"{len(summary['cases'])} case(s) -> {escape_name(args.output)}: "
        f"{sum(c['detections'] for c in summary['cases'])} detections, "
        f"{sum(c['findings'] for c in summary['cases'])} findings; {t['total']:.1f} s "
        f"(model forward {t['model_forward']:.1f} s)"
    )
    if summary["failed"]:
        print(f"{len(summary['failed'])} case(s) failed:", file=sys.stderr)
        for f in summary["failed"]:
            print(f"  {f['case']}: {f['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_cli(main)
