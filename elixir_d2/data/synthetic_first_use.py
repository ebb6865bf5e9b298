"""The synthetic set on first use: a config naming ``synthetic_*`` works from a fresh clone.

The set is generated (deterministically, seed 0, the generator's defaults) the first time one of
its datasets is loaded; a lock beside the folder lets one of several processes starting together
generate it while the others wait and then use it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional

from ..atomic_io import file_lock, read_marker, remove_stale_tmp

logger = logging.getLogger(__name__)

__all__ = ["ensure_synthetic", "FIRST_USE_OPTIONS"]

# the generator's defaults otherwise: the set `make demo` writes
FIRST_USE_OPTIONS: Dict = {"seed": 0}


def ensure_synthetic(out_dir: str, kind: str = "deeplesion", **options) -> Optional[Dict]:
    """Generate the synthetic set at ``out_dir`` unless a complete one is there; returns the
    summary when this call generated it, else None.

    A folder with the completion marker is used whatever its options (the user may have written a
    larger set on purpose). A DeepLesion-format folder without marker but with a DL_info.csv is a
    set written before markers existed (or by hand): used, with a warning.
    """
    from .synthetic import generate_deeplesion, generate_kits19

    out_dir = os.path.abspath(out_dir)
    if read_marker(out_dir) is not None:
        return None
    parent, name = os.path.split(out_dir)
    with file_lock(os.path.join(parent, f".{name}.lock")):
        if read_marker(out_dir) is not None:  # another process finished it while we waited
            return None
        if kind == "deeplesion" and os.path.isfile(os.path.join(out_dir, "DL_info.csv")):
            logger.warning(f"{out_dir}: a synthetic set without completion marker; using it as it "
                           "is (delete the folder to have it generated again)")
            return None
        remove_stale_tmp(parent, name)
        opts = dict(FIRST_USE_OPTIONS, **options)
        logger.info(f"generating the synthetic {kind}-format set at {out_dir} ({opts}) ...")
        t0 = time.perf_counter()
        generate = generate_deeplesion if kind == "deeplesion" else generate_kits19
        summary = generate(out_dir, **opts)
        logger.info(f"synthetic set written in {time.perf_counter() - t0:.1f} s")
        return summary
