"""Random ALB / ALB_r genotypes from the search space (paper Table 6, "random ALB").

Sampled uniformly over the structures the search could derive: for each block type and each
branch b, 2 distinct inputs among the b + 2 earlier nodes, and for each a real (non-``none``) op.
"""

from typing import List, Optional, Tuple

import numpy as np

from ..modeling.alb.genotype import Genotype
from ..modeling.alb.spaces import get_search_space

__all__ = ["sample_random_genotype"]


def _sample_pairs(
    rng: np.random.RandomState, ops: List[str], branches: int
) -> List[Tuple[str, int]]:
    pairs = []
    for b in range(branches):
        inputs = sorted(rng.choice(b + 2, size=2, replace=False).tolist())
        for j in inputs:
            pairs.append((ops[rng.randint(len(ops))], int(j)))
    return pairs


def sample_random_genotype(
    space: str = "elixir", branches: int = 4, seed: Optional[int] = None
) -> Genotype:
    """A uniformly random valid genotype of ``space`` with ``branches`` branches per block;
    the same ``seed`` gives the same genotype."""
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"branches (MODEL.ALB.BRANCHES) must be a positive int, got {branches!r}")
    real_ops = [o for o in get_search_space(space) if o != "none"]
    rng = np.random.RandomState(seed)
    normal = _sample_pairs(rng, real_ops, branches)
    reduce = _sample_pairs(rng, real_ops, branches)
    genotype = Genotype(normal=tuple(normal), reduce=tuple(reduce), space=space, branches=branches)
    return genotype.validate(f"random genotype (space {space!r}, seed {seed})")
