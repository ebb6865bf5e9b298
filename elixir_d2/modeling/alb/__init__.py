"""Auto-lesion Block, in the DARTS roles: search spaces (spaces.py, op names only), operations
(ops.py, with the BatchNorm-folding fast paths in fused.py), searchable / fixed blocks (cells.py)
and genotypes (genotype.py)."""
from .cells import GenotypeBlock, MixedOp, SearchBlock
from .genotype import (
    Genotype,
    GenotypeError,
    count_structures,
    derive_genotype,
    describe_provenance,
    edge_inputs,
    genotype_from_dict,
    genotype_from_yaml,
    genotype_to_yaml,
    load_genotype,
    num_edges,
    read_genotype_file,
    save_genotype,
)
from .ops import RegionNonLocal, build_op
from .spaces import DARTS_OPS, ELIXIR_OPS, SEARCH_SPACES, get_search_space

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
    "describe_provenance",
    "edge_inputs",
    "genotype_from_dict",
    "genotype_from_yaml",
    "genotype_to_yaml",
    "get_search_space",
    "load_genotype",
    "num_edges",
    "read_genotype_file",
    "save_genotype",
]
