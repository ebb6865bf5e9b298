"""Search spaces of the Auto-lesion Block: the op names of each space, as plain data.

Kept apart from the op definitions (``ops.py``, torch modules) so that genotypes, random sampling
and anything that only reads or writes op names need no torch (DARTS' ``genotypes`` role).
``elixir`` and ``darts`` are built in; ``registry.register_search_space`` adds a space to
:data:`SEARCH_SPACES` (docs/extending.md).
"""

from typing import Dict, List

__all__ = ["ELIXIR_OPS", "DARTS_OPS", "SEARCH_SPACES", "get_search_space", "search_space_names"]

# Order matters: alphas are indexed by it and genotypes are derived from it. "none" first, as in
# DARTS, so that derivation can skip it by name.
ELIXIR_OPS: List[str] = [
    "none",
    "skip_connect",
    "avg_pool_3x3",
    "conv_1x1",
    "asym_conv_3",
    "dil_conv_3x3_r2",
    "dil_conv_3x3_r3",
    "dw_conv_7x7",
    "region_nonlocal",
]
DARTS_OPS: List[str] = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]
SEARCH_SPACES: Dict[str, List[str]] = {"elixir": ELIXIR_OPS, "darts": DARTS_OPS}


def search_space_names() -> List[str]:
    """The registered search spaces, sorted: "darts", "elixir" and any registered since."""
    return sorted(SEARCH_SPACES)


def get_search_space(name: str) -> List[str]:
    """Return the ordered op names of the registered search space ``name``."""
    if name not in SEARCH_SPACES:
        raise ValueError(
            f"Unknown ALB search space {name!r} (MODEL.ALB.SEARCH_SPACE); "
            f"expected one of {search_space_names()} (add one with register_search_space)"
        )
    return list(SEARCH_SPACES[name])
