#!/usr/bin/env python
"""predict_net.py's throughput over a folder of cases, with 1 and with several processes.

    python projects/benchmarks/predict_throughput.py [--cases 20] [--slices 24] [--size 256]
        [--processes 1 2] [--config-file configs/quickstart/fpn.yaml] [--weights W]
        [--device cpu|cuda|auto] [--output DIR]

Writes ``--cases`` CT-like NIfTI phantoms (predict_speed.py's volume; 0.7 mm pixels, 2.5 mm
slices) into a folder, then runs ``predict_net.py --num-gpus N`` on it once for each N of
``--processes``, as a user would (one thread per process on the CPU; on CUDA one GPU per process),
into a fresh output folder each. Prints, for each N: cases per minute over the whole command
(start-up, model loading and the merge included) and over the run after model loading, the
speed-up against the first N, and the share of the case time spent reading the input,
building the model inputs, in the model and writing the outputs (summed over the processes).
``--device auto`` runs on CUDA when there is a GPU. Without --weights the model is randomly
initialised (saved to a temporary checkpoint): its many meaningless detections make the writing
share pessimistic; its model time is the trained model's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

from elixir_d2.provenance import cpu_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from predict_speed import phantom_volume, write_volume  # noqa: E402

STEPS = ("read_inputs", "prepare_inputs", "model_forward", "write_outputs")


def write_cases(folder: str, cases: int, slices: int, size: int) -> None:
    """``cases`` NIfTI phantoms case_NN.nii.gz, each drawn with its own noise."""
    os.makedirs(folder, exist_ok=True)
    for i in range(cases):
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            path = write_volume(
                tmp, phantom_volume(slices, size, np.random.default_rng(i)), "nifti", 0.7, 2.5
            )
            os.replace(path, os.path.join(folder, f"case_{i:02d}.nii.gz"))


def random_weights(config_file: str, path: str) -> str:
    """A randomly initialised model of ``config_file``, saved where predict_net.py can load it."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from elixir_d2 import load_config

    torch.manual_seed(0)
    cfg = load_config(config_file)
    cfg.MODEL.DEVICE = "cpu"
    DetectionCheckpointer(build_model(cfg), save_dir=os.path.dirname(path)).save(
        os.path.splitext(os.path.basename(path))[0]
    )
    return path


def run_once(
    args: argparse.Namespace, processes: int, cases_dir: str, out_dir: str, device: str
) -> Dict:
    """One predict_net.py run over the folder; its wall time and summary.json."""
    cmd = [
        sys.executable,
        os.path.join(REPO, "predict_net.py"),
        "--config-file",
        args.config_file,
        "--weights",
        args.weights,
        "--input",
        cases_dir,
        "--output",
        out_dir,
        "--device",
        device,
        "--num-gpus",
        str(processes),
        "--no-progress",
        "--score-thresh",
        str(args.score_thresh),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"predict_net.py with {processes} process(es) failed "
            f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    if summary["failed"]:
        raise SystemExit(f"{len(summary['failed'])} case(s) failed: {summary['failed']}")
    return {
        "processes": processes,
        "wall_s": wall,
        "timing_s": summary["timing_s"],
        "cases": len(summary["cases"]),
    }


def cpu_name() -> str:
    """The CPU's model name and core count, as Linux reports them."""
    return f"{cpu_model() or 'unknown CPU'}, {os.cpu_count()} cores"


def report(runs: List[Dict], device: str) -> str:
    """The table the script prints (module docstring)."""
    lines = [
        f"device {device}; {runs[0]['cases']} cases",
        "| processes | wall s | cases/min (command) | cases/min (after model load) | "
        "speed-up | read | prepare | model | write |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = runs[0]["cases"] / runs[0]["wall_s"]
    for r in runs:
        t = r["timing_s"]
        case_s = sum(t[k] for k in STEPS)
        shares = " | ".join(f"{100 * t[k] / case_s:.0f}%" for k in STEPS)
        per_min = 60 * r["cases"] / r["wall_s"]
        steady = 60 * r["cases"] / t["total"]
        lines.append(
            f"| {r['processes']} | {r['wall_s']:.1f} | {per_min:.1f} | {steady:.1f} | "
            f"{r['cases'] / r['wall_s'] / base:.2f}x | {shares} |"
        )
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="threads per process (CPU)")
    ap.add_argument("--config-file", default="configs/quickstart/fpn.yaml")
    ap.add_argument("--weights", default="")
    ap.add_argument("--score-thresh", type=float, default=0.5)
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument(
        "--output", default=None, help="keep the cases and outputs here (else a temporary folder)"
    )
    args = ap.parse_args(argv)
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device == "cuda" and max(args.processes) > torch.cuda.device_count():
        ap.error(f"--processes {max(args.processes)}: only {torch.cuda.device_count()} GPU(s)")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.output or tmp
        cases_dir = os.path.join(root, "cases")
        t0 = time.perf_counter()
        write_cases(cases_dir, args.cases, args.slices, args.size)
        print(
            f"wrote {args.cases} NIfTI cases of {args.slices} x {args.size} x {args.size} in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        random_init = not args.weights
        if random_init:
            args.weights = random_weights(args.config_file, os.path.join(root, "random.pth"))
        runs = []
        for n in args.processes:
            runs.append(run_once(args, n, cases_dir, os.path.join(root, f"out_{n}"), device))
            print(f"{n} process(es): {runs[-1]['wall_s']:.1f} s", flush=True)
    model = "random init" if random_init else f"weights {args.weights}"
    print(f"config {args.config_file} ({model}), {args.threads} thread(s) per process")
    print(report(runs, cpu_name() if device == "cpu" else torch.cuda.get_device_name(0)))
    return runs


if __name__ == "__main__":
    main()
