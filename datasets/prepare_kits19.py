#!/usr/bin/env python
"""Cache KiTS19 for training: every slice as a 16-bit PNG (HU + 32768) plus records.json.

    python datasets/prepare_kits19.py [--root $DETECTRON2_DATASETS/kits19] [--cache <root>/cache]
                                      [--margin-mm M] [--slice-axis auto|0|1|2]

Same as ``python -m elixir_d2.data.kits19``; see datasets/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from elixir_d2.data.kits19 import main  # noqa: E402

if __name__ == "__main__":
    main()
