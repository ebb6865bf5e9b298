"""The config files the repository ships, for tests that check every one of them."""

import glob
import os
from typing import List

CONFIGS = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
)


def shipped_configs(components: bool = False) -> List[str]:
    """Paths relative to configs/ of the configs one trains or evaluates with (``components``
    False) or of the component files they compose (True); genotype files are neither."""
    out = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)):
        rel = os.path.relpath(path, CONFIGS)
        if rel.startswith("genotypes" + os.sep):
            continue
        if ("components" in rel.split(os.sep)) == components:
            out.append(rel)
    return out
