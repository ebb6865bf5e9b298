"""Auto-lesion Block: search spaces and ops, searchable / fixed blocks, genotypes."""
from .cells import GenotypeBlock, MixedOp, SearchBlock
from .genotype import (
    Genotype,
    GenotypeError,
    count_structures,
    derive_genotype,
    edge_inputs,
    genotype_from_dict,
    load_genotype,
    num_edges,
    save_genotype,
)
from .ops import DARTS_OPS, ELIXIR_OPS, SEARCH_SPACES, RegionNonLocal, build_op, get_search_space

__all__ = [
    "DARTS_OPS",
    "ELIXIR_OPS",
    "SEARCH_SPACES",
    "Genotype",
    "GenotypeBlock",
    "GenotypeError",
    "MixedOp",
    "RegionNonLocal",
    "SearchBlock",
    "build_op",
    "count_structures",
    "derive_genotype",
    "edge_inputs",
    "genotype_from_dict",
    "get_search_space",
    "load_genotype",
    "num_edges",
    "save_genotype",
]
