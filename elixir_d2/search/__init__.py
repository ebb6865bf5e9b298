"""Differentiable search of the Auto-lesion Blocks (search_net.py) and random genotypes."""

from .architect import Architect
from .checkpoint import SearchCheckpointer
from .data import build_search_loaders, halve_dataset, iters_per_epoch, load_search_halves
from .outputs import (
    ALPHAS_JSON,
    ALPHAS_PNG,
    GENOTYPE_YAML,
    AlphaRecorder,
    edge_labels,
    format_genotype,
    softmax_alphas,
    write_search_outputs,
)
from .random import sample_random_genotype
from .searcher import (
    ALBSearcher,
    build_search_optimizers,
    cosine_lr,
    freeze_for_search,
    frozen_modules,
    search_head,
)
from .step import optimizer_step, search_loss

__all__ = [
    "ALBSearcher",
    "ALPHAS_JSON",
    "Architect",
    "ALPHAS_PNG",
    "AlphaRecorder",
    "GENOTYPE_YAML",
    "SearchCheckpointer",
    "build_search_loaders",
    "build_search_optimizers",
    "cosine_lr",
    "edge_labels",
    "format_genotype",
    "freeze_for_search",
    "frozen_modules",
    "halve_dataset",
    "iters_per_epoch",
    "load_search_halves",
    "optimizer_step",
    "sample_random_genotype",
    "search_head",
    "search_loss",
    "softmax_alphas",
    "write_search_outputs",
]
