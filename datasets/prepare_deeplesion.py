#!/usr/bin/env python
"""Check a DeepLesion download: parse DL_info.csv, count key and neighbour slices on disk.

    python datasets/prepare_deeplesion.py [--root $DETECTRON2_DATASETS/DeepLesion]

Every row is parsed (an error names the row and column at fault); then, per split, the key slices
whose PNG is missing (those records are skipped at training time) and the neighbour slices within
+-2 mm that are missing (those fall back toward the key slice) are counted.
"""

import argparse
import math
import os
from collections import Counter

from elixir_d2.cli import MissingFileError, run_cli
from elixir_d2.data import datasets_root
from elixir_d2.data.deeplesion import SPLITS, DeepLesionFormatError, read_dl_info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", default=os.path.join(datasets_root(), "DeepLesion"))
    ap.add_argument("--slice-intv-mm", type=float, default=2.0)
    args = ap.parse_args(argv)
    csv_path = os.path.join(args.root, "DL_info.csv")
    if not os.path.isfile(csv_path):
        raise MissingFileError(
            f"--root {args.root}: no DL_info.csv there; download DeepLesion as "
            "datasets/README.md says, or pass --root"
        )
    lesions = read_dl_info(csv_path)
    names = {v: k for k, v in SPLITS.items()}
    key_slices = {les["file_name"]: les for les in lesions}
    counts: Counter = Counter()
    for file_name, les in key_slices.items():
        split = names[les["split"]]
        series = os.path.join(args.root, "Images_png", les["series_dir"])
        counts[split, "key slices"] += 1
        if not os.path.exists(os.path.join(series, f"{les['name_slice']:03d}.png")):
            counts[split, "missing key slices"] += 1
            continue
        reach = math.ceil(args.slice_intv_mm / les["spacing"][2])
        for idx in range(les["name_slice"] - reach, les["name_slice"] + reach + 1):
            if idx != les["name_slice"] and not os.path.exists(
                os.path.join(series, f"{idx:03d}.png")
            ):
                counts[split, "missing neighbour slices"] += 1
    print(f"{args.root}: {len(lesions)} lesions on {len(key_slices)} key slices")
    for split in SPLITS:
        print(
            f"  {split:5s}: "
            + ", ".join(
                f"{counts[split, k]} {k}"
                for k in ("key slices", "missing key slices", "missing neighbour slices")
            )
        )
    return 0


if __name__ == "__main__":
    run_cli(main, expected=(DeepLesionFormatError,))
