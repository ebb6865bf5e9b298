#!/usr/bin/env python
"""`make bench`: one table comparing ElixirNet with the detectors it improves on, plus the data
loader and the evaluator.

    python projects/benchmarks/run_all.py [--quick] [--threads 2] [--rounds 10]
        [--output output/bench]

Per model (FPN, ElixirNet w FPN, Deformv2, ElixirNet w Deformv2, FRCNN (C4), ElixirNet (C4); R-50
DeepLesion configs, --quick: the CPU quickstart ones): parameters (M) and their ratio to FPN; CPU
inference ms/image on one 512x512 CT slice at a fixed thread count, all models interleaved in this
process (warm-up, then >= 10 rounds; median, and the median of the per-round ratios to FPN);
training s/iteration and its ratio to FPN; on a CUDA device, when there is one, the same on the GPU.
Details (random weights, FrozenBN calibration, TRPN keeping every location, FRCNN (C4)'s fewer CPU
rounds): models_speed.py. Then the per-stage breakdown, the targets (ElixirNet w FPN: <= 0.70x FPN's
parameters and <= 1.0x its inference time; Deformv2: about FPN's parameters, the paper +0.8M), the
CT data loader's records/s (data_loader.py) and the FROC evaluation time (froc_speed.py). Results
also go to <output>/bench.md and bench.json, with the run's provenance (docs/evaluation.md,
"Provenance of results").
"""

import os

if __name__ == "__main__":
    from pin_threads import pin_threads, threads_from_argv  # the script's folder is on sys.path

    pin_threads(threads_from_argv(default=2))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from elixir_d2.provenance import code_state, provenance, provenance_line  # noqa: E402

import data_loader  # noqa: E402
import froc_speed  # noqa: E402
import models_speed as ms  # noqa: E402

PARAM_TARGET = 0.70  # ElixirNet w FPN parameters / FPN's
TIME_TARGET = 1.0  # ElixirNet w FPN inference time / FPN's
PAPER_DEFORM_EXTRA_M = 42.2 - 41.4  # paper Table 1: Deformv2 42.2M, FPN 41.4M


def targets(cpu: Dict[str, Dict], gpu: Optional[Dict[str, Dict]]) -> List[str]:
    """The targets, each with PASS / MISS and the measured value."""
    fpn, eli, dfm = cpu["FPN"], cpu.get("ElixirNet w FPN"), cpu.get("Deformv2")
    if eli is None:
        return ["ElixirNet w FPN not measured (--models)"]
    p = eli["params"] / fpn["params"]
    lines = [
        f"ElixirNet w FPN parameters / FPN = {p:.3f} (target <= {PARAM_TARGET}; paper "
        f"28.4/41.4 = {28.4 / 41.4:.3f}): {'PASS' if p <= PARAM_TARGET else 'MISS'}",
        f"ElixirNet w FPN CPU inference / FPN = {eli['infer_ratio']:.2f} (target <= "
        f"{TIME_TARGET}; paper 90/68 = 1.32 on GPU): "
        f"{'PASS' if eli['infer_ratio'] <= TIME_TARGET else 'MISS'}",
    ]
    if gpu and "ElixirNet w FPN" in gpu:
        g = gpu["ElixirNet w FPN"]["infer_ratio"]
        lines.append(
            f"ElixirNet w FPN GPU inference / FPN = {g:.2f} (target <= {TIME_TARGET}): "
            f"{'PASS' if g <= TIME_TARGET else 'MISS'}"
        )
    if dfm is not None:
        extra = (dfm["params"] - fpn["params"]) / 1e6
        lines.append(
            f"Deformv2 parameters - FPN = {extra:+.2f}M = "
            f"{dfm['params'] / fpn['params']:.3f}x FPN (paper "
            f"+{PAPER_DEFORM_EXTRA_M:.1f}M)"
        )
    if eli["infer_ratio"] > TIME_TARGET:
        sf, se = fpn["stages_ms"], eli["stages_ms"]
        lines[1] += "; where the time goes (CPU median ms, FPN -> ElixirNet w FPN): " + ", ".join(
            f"{k} {sf[k]:.0f} -> {se[k]:.0f}" for k in ms.STAGES
        )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="quickstart models, fewer rounds, smaller data"
    )
    ap.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (fixed for every timing)"
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed inference rounds (default 10; --quick 3)"
    )
    ap.add_argument(
        "--warmup", type=int, default=None, help="warm-up rounds (default 2; --quick 1)"
    )
    ap.add_argument(
        "--train-rounds",
        type=int,
        default=None,
        help="timed training rounds (default 2; --quick 1)",
    )
    ap.add_argument(
        "--slow-rounds", type=int, default=3, help="CPU inference rounds of FRCNN (C4) (R-50)"
    )
    ap.add_argument("--size", type=int, default=512, help="square image side in pixels")
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of the models (FPN always in), "
        "e.g. 'ElixirNet w FPN,Deformv2'",
    )
    ap.add_argument(
        "--no-gpu", action="store_true", help="skip the CUDA timings even when a GPU is present"
    )
    ap.add_argument("--output", default="output/bench", help="folder for bench.md and bench.json")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    train_rounds = args.train_rounds if args.train_rounds is not None else (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    t_start, started, code = time.perf_counter(), time.time(), code_state()

    specs = ms.select(args.models)
    cpu = ms.measure(
        args.quick,
        "cpu",
        args.size,
        rounds,
        warmup,
        train_rounds,
        specs=specs,
        slow_rounds=args.slow_rounds,
    )
    gpu = None
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = ms.measure(
            args.quick,
            "cuda",
            args.size,
            max(rounds, 10),
            max(warmup, 2),
            max(train_rounds, 3),
            specs=specs,
        )

    # data_loader / froc_speed pin their own thread counts (1): after the model timings.
    loader_rps = data_loader.main(["--records", "50" if args.quick else "200"])
    froc = froc_speed.main(["--images", "1000" if args.quick else "5000", "--runs", "3"])
    torch.set_num_threads(args.threads)

    cpu_name = platform.processor() or platform.machine()
    lines = [
        "## make bench "
        f"({'--quick: quickstart configs' if args.quick else 'R-50 DeepLesion configs'}, "
        f"{args.size}x{args.size} CT slice, batch 1, random weights)",
        "",
        f"CPU: {os.cpu_count()} cores ({cpu_name}), torch {torch.__version__}, {args.threads} "
        f'threads; inference {warmup} warm-up + up to {rounds} interleaved rounds ("rounds" '
        f"column), training 1 warm-up + up to {train_rounds}."
        + (
            f" GPU: {torch.cuda.get_device_name(0)}."
            if gpu
            else " No CUDA device: GPU columns absent."
        ),
        "",
        ms.format_table(cpu, gpu),
        "",
        ms.format_stages(cpu, "cpu"),
    ]
    if gpu:
        lines += ["", ms.format_stages(gpu, "cuda")]
    if args.quick:
        lines += [
            "",
            "Targets: not checked with --quick (they are about the R-50 configs; the "
            "quickstart models are not the paper's: R-18 with a 256-d 2-fc head, BatchNorm "
            "ALB, half-width R-50 for Deformv2).",
        ]
    else:
        lines += ["", "Targets:"] + [f"- {t}" for t in targets(cpu, gpu)]
    lines += [
        "",
        f"Data loader (CTDatasetMapper, 512x512 3-slice records, 1 thread): {loader_rps:.1f} "
        "records/s",
        f"FROC evaluation (compute_froc, {'1000' if args.quick else '5000'} images x 100 "
        f"detections, 1 thread): IoU {froc['iou']:.3f} s, IoBB {froc['iobb']:.3f} s (median of 3)",
        "",
        f"Total benchmark time: {time.perf_counter() - t_start:.0f} s",
    ]
    prov = provenance(None if argv is None else [__file__, *argv], started=started, code=code)
    lines += ["", provenance_line(prov)]
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "bench.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    out = {
        "cpu": cpu,
        "gpu": gpu,
        "loader_records_per_s": loader_rps,
        "froc_s": froc,
        "threads": args.threads,
        "rounds": rounds,
        "quick": args.quick,
        "provenance": prov,
    }
    with open(os.path.join(args.output, "bench.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
