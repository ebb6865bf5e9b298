"""Auto-lesion Block, in the DARTS roles: search spaces (spaces.py, op names only), operations
(ops.py, with the BatchNorm-folding fast paths in fused.py), searchable / fixed blocks (cells.py)
and genotypes (genotype.py); registry.py adds ops and spaces (docs/extending.md)."""

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
from .ops import ALBOp, RegionNonLocal, build_op, make_norm
from .registry import (
    alb_op_names,
    check_alb_op,
    register_alb_op,
    register_search_space,
    unregister_alb_op,
    unregister_search_space,
)
from .spaces import DARTS_OPS, ELIXIR_OPS, SEARCH_SPACES, get_search_space, search_space_names

__all__ = [
    "ALBOp",
    "DARTS_OPS",
    "ELIXIR_OPS",
    "SEARCH_SPACES",
    "Genotype",
    "GenotypeBlock",
    "GenotypeError",
    "MixedOp",
    "RegionNonLocal",
    "SearchBlock",
    "alb_op_names",
    "build_op",
    "check_alb_op",
    "count_structures",
    "derive_genotype",
    "describe_provenance",
    "edge_inputs",
    "genotype_from_dict",
    "genotype_from_yaml",
    "genotype_to_yaml",
    "get_search_space",
    "load_genotype",
    "make_norm",
    "num_edges",
    "read_genotype_file",
    "register_alb_op",
    "register_search_space",
    "save_genotype",
    "search_space_names",
    "unregister_alb_op",
    "unregister_search_space",
]
