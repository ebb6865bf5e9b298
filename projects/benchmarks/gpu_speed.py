#!/usr/bin/env python
"""Inference ms/image of FPN and ElixirNet w FPN at 512x512, and peak GPU memory (the GPU check).

    python projects/benchmarks/gpu_speed.py --device cuda --json output/gpu_speed.json
    python projects/benchmarks/gpu_speed.py --device cpu --quick --size 64 --rounds 2 --warmup 1

The paper's Table 1 comparison: FPN 68 ms and ElixirNet w FPN 90 ms per image (paper, 4 GTX1080).
Here: the R-50 DeepLesion configs (``--quick``: the quickstart ones), random weights, one CT-like
``--size`` x ``--size`` slice at batch 1, in eval mode under ``torch.no_grad``, with the protocol
of models_speed.py (FrozenBN calibrated on the input, TRPN keeping every location: its slowest
case; models interleaved round by round). ``--warmup`` untimed rounds, then ``--rounds`` timed
ones, each call bracketed by ``torch.cuda.synchronize``; median and 10th / 90th percentiles.
Per precision (``--precisions``: float32, and float16 / bfloat16 autocast) and model, the memory
one inference needs: the model's weights and buffers plus the peak of
``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) above what was allocated
before (CUDA only, null elsewhere). TF32 is left at torch's defaults and reported. The record
(``--json``) holds the run's ``provenance`` (docs/evaluation.md, "Provenance of results").
"""

import os
import sys

if __name__ == "__main__":
    from pin_threads import pin_threads, threads_from_argv  # the script's folder is on sys.path

    pin_threads(threads_from_argv(default=2))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

import elixir_d2  # noqa: E402,F401  (registers TRPN, ALBHead)
from elixir_d2.amp import PRECISIONS  # noqa: E402
from elixir_d2.provenance import provenance  # noqa: E402

import models_speed as ms  # noqa: E402

__all__ = ["MODEL_NAMES", "PAPER_MS", "measure", "format_table", "main"]

MODEL_NAMES = ("FPN", "ElixirNet w FPN")


def _paper_ms() -> Dict[str, float]:
    """Table 1's ms/image of the two models, from projects/paper/paper_numbers.py."""
    paper_dir = os.path.join(ms.ROOT, "projects", "paper")
    if paper_dir not in sys.path:
        sys.path.insert(0, paper_dir)
    from paper_numbers import TABLE1

    return {name: float(TABLE1[name]["ms"]) for name in MODEL_NAMES}


PAPER_MS = _paper_ms()


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _autocast(device: str, precision: str):
    """The autocast context of ``precision`` on ``device`` (none for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision])


def peak_memory_mib(
    model: torch.nn.Module, inputs: List[Dict], device: str, precision: str
) -> Optional[float]:
    """CUDA memory (MiB) one inference of ``model`` needs on its own: its weights and buffers
    plus the peak allocated beyond what was allocated before (the other model's weights stay
    out). None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    own = sum(
        t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
    )
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), _autocast(device, precision):
        model.inference(inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before + own) / 2**20


def _check_precisions(precisions: Sequence[str], device: str) -> None:
    for p in precisions:
        if p != "float32" and p not in PRECISIONS:
            raise ValueError(
                f"--precisions: unknown precision {p!r}; expected float32, "
                f"{', '.join(sorted(PRECISIONS))}"
            )
        if p == "float16" and torch.device(device).type != "cuda":
            raise ValueError(
                f"--precisions float16 needs --device cuda (got {device!r}); use "
                "float32 or bfloat16 on the CPU"
            )


def measure(
    device: str = "cuda",
    size: int = 512,
    rounds: int = 50,
    warmup: int = 10,
    quick: bool = False,
    precisions: Sequence[str] = ("float32", "float16"),
    log=print,
) -> Dict:
    """Build FPN and ElixirNet w FPN on ``device`` and time them; returns the JSON record."""
    if rounds < 1 or warmup < 0 or size < 32:
        raise ValueError(
            f"need rounds >= 1, warmup >= 0, size >= 32; got {rounds}, {warmup}, {size}"
        )
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    _check_precisions(precisions, device)
    torch.manual_seed(0)
    specs = [s for s in ms.MODELS if s.name in MODEL_NAMES]
    inputs = [ms.ct_input(size)]
    models, configs = {}, {}
    for spec in specs:
        configs[spec.name] = spec.quick_config if quick else spec.config
        model = build_model(ms.load_cfg(configs[spec.name], device))
        ms.calibrate_frozen_bn(model, inputs)
        models[spec.name] = model.eval()
        log(f"built {spec.name} from {configs[spec.name]} on {device}")
    res: Dict[str, Dict] = {
        n: {
            "config": configs[n],
            "params": sum(p.numel() for p in models[n].parameters()),
            "precisions": {},
        }
        for n in models
    }
    for precision in precisions:
        t0 = time.perf_counter()
        with _autocast(device, precision):
            times = ms.time_inference(models, inputs, rounds, warmup)
        log(
            f"timed {precision}: {warmup} warm-up + {rounds} rounds in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        for name, model in models.items():
            total = times[name]["total"]
            res[name]["precisions"][precision] = {
                "ms_per_image": 1e3 * statistics.median(total),
                "ms_p10": 1e3 * _percentile(total, 10),
                "ms_p90": 1e3 * _percentile(total, 90),
                "ratio_to_fpn": ms.median_ratio(total, times["FPN"]["total"]),
                "stages_ms": {s: 1e3 * statistics.median(times[name][s]) for s in ms.STAGES},
                "num_proposals": statistics.median(times[name]["num_proposals"]),
                "peak_memory_mib": peak_memory_mib(model, inputs, device, precision),
            }
    cuda = torch.device(device).type == "cuda"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
        "threads": torch.get_num_threads(),
        "size": size,
        "rounds": rounds,
        "warmup": warmup,
        "quick": quick,
        "weights": "random weights (models_speed.py: FrozenBN calibrated, TRPN keeps all)",
        "models": res,
        "paper_ms": {"values": PAPER_MS, "hardware": "4 GTX1080"},
    }


def format_table(rec: Dict) -> str:
    """Markdown: per model and precision, median ms/image, p10-p90, ratio to FPN, peak memory."""
    lines = [
        "| Model | precision | ms/image (median) | p10-p90 | x FPN | peak MiB | paper ms |",
        "|:--|:--|--:|--:|--:|--:|--:|",
    ]
    for name, r in rec["models"].items():
        for precision, p in r["precisions"].items():
            mem = "-" if p["peak_memory_mib"] is None else f"{p['peak_memory_mib']:.0f}"
            # the paper's figures are for its R-50 models, not the quickstart ones
            paper = "-" if rec["quick"] else f"{PAPER_MS[name]:.0f} (paper)"
            lines.append(
                f"| {name} | {precision} | {p['ms_per_image']:.1f} | "
                f"{p['ms_p10']:.1f}-{p['ms_p90']:.1f} | {p['ratio_to_fpn']:.2f} | {mem} "
                f"| {paper} |"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512, help="square image side in pixels")
    ap.add_argument("--rounds", type=int, default=50, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    ap.add_argument("--quick", action="store_true", help="quickstart configs instead of R-50")
    ap.add_argument(
        "--precisions",
        default=None,
        help="comma-separated: float32, float16 (CUDA), bfloat16 (default: float32 "
        "and, on CUDA, float16)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the record here")
    args = ap.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    if args.precisions:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    else:
        precisions = ["float32"] + (["float16"] if args.device.startswith("cuda") else [])
    try:
        rec = measure(args.device, args.size, args.rounds, args.warmup, args.quick, precisions)
    except ValueError as e:
        ap.exit(2, f"gpu_speed.py: error: {e}\n")
    rec["provenance"] = provenance(None if argv is None else [__file__, *argv], started=started)
    print(format_table(rec))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1)
    return rec


if __name__ == "__main__":
    main()
