"""``python -m elixir_d2.data.synthetic_v2 --out DIR [--seed N] [--patients N] [--size PX]``."""

from __future__ import annotations

import argparse
import json
from typing import Dict, Optional, Sequence

from .writer import DEFAULT_IMAGE_SIZE, DEFAULT_PATIENTS, generate_deeplesion_v2


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Write a set with the second generator and print its summary."""
    parser = argparse.ArgumentParser(
        description="Write a DeepLesion-format synthetic set with "
        "the second (independent) generator"
    )
    parser.add_argument("--out", required=True, help="output folder (e.g. datasets/synthetic_v2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=DEFAULT_PATIENTS)
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help="image side in pixels (default: 0.6-1.0 mm pixels)",
    )
    parser.add_argument("--slices", type=int, nargs=2, default=(12, 20), metavar=("LO", "HI"))
    args = parser.parse_args(argv)
    summary = generate_deeplesion_v2(
        args.out,
        num_patients=args.patients,
        image_size=args.size,
        seed=args.seed,
        slices_per_series=tuple(args.slices),
    )
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
