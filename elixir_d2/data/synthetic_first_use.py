"""The synthetic sets on first use: a config naming ``synthetic_*`` (or ``synthetic_v2_*``,
``synthetic_seed7_*``) works from a fresh clone.

A set is generated (deterministically, by the generator its ``kind`` names, seed 0 unless the
caller gives another, the generator's defaults otherwise) the first time one of its datasets is
loaded; a lock beside the folder lets one of several processes starting together
generate it while the others wait and then use it.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Dict, Optional, Tuple

from ..atomic_io import file_lock, read_marker, remove_stale_tmp

logger = logging.getLogger(__name__)

__all__ = ["ensure_synthetic", "FIRST_USE_OPTIONS", "GENERATORS"]

# the generator's defaults otherwise: the set `make demo` writes
FIRST_USE_OPTIONS: Dict = {"seed": 0}


# kind -> (module, whole-or-nothing writer, format written); imported only when a set is written
GENERATORS: Dict[str, Tuple[str, str, str]] = {
    "deeplesion": ("elixir_d2.data.synthetic", "generate_deeplesion", "deeplesion"),
    "kits19": ("elixir_d2.data.synthetic", "generate_kits19", "kits19"),
    "deeplesion_v2": ("elixir_d2.data.synthetic_v2", "generate_deeplesion_v2", "deeplesion"),
}


def ensure_synthetic(out_dir: str, kind: str = "deeplesion", **options) -> Optional[Dict]:
    """Generate the synthetic set at ``out_dir`` unless a complete one is there; returns the
    summary when this call generated it, else None. ``kind`` names the generator (a key of
    :data:`GENERATORS`): ``deeplesion`` and ``kits19`` (:mod:`.synthetic`), ``deeplesion_v2``
    (:mod:`.synthetic_v2`); ``options`` override :data:`FIRST_USE_OPTIONS` (e.g. ``seed=7``).

    A folder with the completion marker is used whatever its options (the user may have written a
    larger set on purpose). A DeepLesion-format folder without marker but with a DL_info.csv is a
    set written before markers existed (or by hand): used, with a warning.
    """
    if kind not in GENERATORS:
        raise ValueError(
            f"unknown synthetic generator {kind!r}: expected one of {sorted(GENERATORS)}"
        )
    out_dir = os.path.abspath(out_dir)
    if read_marker(out_dir) is not None:
        return None
    parent, name = os.path.split(out_dir)
    with file_lock(os.path.join(parent, f".{name}.lock")):
        if read_marker(out_dir) is not None:  # another process finished it while we waited
            return None
        csv_path = os.path.join(out_dir, "DL_info.csv")
        if GENERATORS[kind][2] == "deeplesion" and os.path.isfile(csv_path):
            logger.warning(
                f"{out_dir}: a synthetic set without completion marker; using it as it "
                "is (delete the folder to have it generated again)"
            )
            return None
        remove_stale_tmp(parent, name)
        opts = dict(FIRST_USE_OPTIONS, **options)
        logger.info(f"generating the synthetic {kind}-format set at {out_dir} ({opts}) ...")
        t0 = time.perf_counter()
        module, writer, _ = GENERATORS[kind]
        summary = getattr(importlib.import_module(module), writer)(out_dir, **opts)
        logger.info(f"synthetic set written in {time.perf_counter() - t0:.1f} s")
        return summary
