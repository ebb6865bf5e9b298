"""Time compute_froc on 5,000 images x 100 detections on one core (target: at most 2 s).

    python projects/benchmarks/froc_speed.py [--images 5000] [--dets 100] [--runs 5] [--strict]

Prints the median wall time of ``--runs`` calls per criterion (input arrays built beforehand,
1-3 lesions per image, random boxes and scores, fixed seed); ``--strict`` exits 1 when a
median is above ``--limit`` seconds.
"""

if __name__ == "__main__":
    from pin_threads import pin_threads  # the script's folder is on sys.path

    pin_threads(1)  # one core

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import List, Optional  # noqa: E402

import numpy as np  # noqa: E402


def make_inputs(n_images: int, n_dets: int, seed: int = 0):
    """Random XYXY detections / lesions on 512 x 512 images (1-3 lesions each)."""
    rng = np.random.default_rng(seed)

    def boxes(n):
        xy = rng.uniform(0, 450, (n, 2))
        return np.hstack([xy, xy + rng.uniform(4, 60, (n, 2))])

    gts = [boxes(int(rng.integers(1, 4))) for _ in range(n_images)]
    # One detection near each lesion (jittered) so hits and duplicates occur.
    dets = []
    for g in gts:
        d = boxes(n_dets)
        d[: len(g)] = g + rng.normal(0, 2, g.shape)
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2])
        dets.append(d)
    scores = [rng.random(n_dets) for _ in range(n_images)]
    return dets, scores, gts


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--limit", type=float, default=2.0)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    from elixir_d2.evaluation.froc import compute_froc

    dets, scores, gts = make_inputs(args.images, args.dets)
    medians = {}
    for criterion in ("iou", "iobb"):
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            res = compute_froc(dets, scores, gts, criterion=criterion)
            times.append(time.perf_counter() - t0)
        medians[criterion] = statistics.median(times)
        print(
            f"froc_speed: {args.images} images x {args.dets} detections, criterion={criterion}: "
            f"median {medians[criterion]:.3f} s over {args.runs} runs (limit {args.limit:g} s; "
            f"sens@3 = {res['sensitivity'][3.0]:.4f})"
        )
    if args.strict and max(medians.values()) > args.limit:
        sys.exit(1)
    return medians


if __name__ == "__main__":
    import torch  # imported anyway by elixir_d2; keep its intra-op pool at one thread too

    torch.set_num_threads(1)
    main()
