#!/usr/bin/env python
"""Cache KiTS19 for training: every slice as a 16-bit PNG (HU + 32768) plus records.json.

    python datasets/prepare_kits19.py [--root $DETECTRON2_DATASETS/kits19] [--cache <root>/cache]
                                      [--margin-mm M] [--slice-axis auto|0|1|2]

Same as ``python -m elixir_d2.data.kits19``; see datasets/README.md.
"""

import argparse
import os

from elixir_d2.cli import MissingFileError, run_cli
from elixir_d2.data import datasets_root
from elixir_d2.data.kits19 import KiTS19Error, main


def checked_main(argv=None):
    """main, after checking that the KiTS19 root holds data/ (one-line error otherwise)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--root", default=os.path.join(datasets_root(), "kits19"))
    root = pre.parse_known_args(argv)[0].root
    if not os.path.isdir(os.path.join(root, "data")):
        raise MissingFileError(
            f"--root {root}: no data/ folder of case_XXXXX cases there; "
            "download KiTS19 as datasets/README.md says, or pass --root"
        )
    return main(argv)


if __name__ == "__main__":
    run_cli(checked_main, expected=(KiTS19Error,))
