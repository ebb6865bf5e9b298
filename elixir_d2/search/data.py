"""The two halves of the training split used by the ALB search and their loaders.

DARTS-style search optimises the network weights w on one half of the training data and the
architecture parameters alpha on the other, so that alpha is judged on images w was not fitted to.
The halving is a fixed-seed permutation of the training records (SEARCH.SEED): the same seed and
the same dataset give the same halves on every run and every process.
"""

import logging
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts

from ..data import CTDatasetMapper

__all__ = ["halve_dataset", "load_search_halves", "build_search_loaders", "iters_per_epoch"]

logger = logging.getLogger(__name__)


def halve_dataset(dataset_dicts: Sequence[Dict], seed: int) -> Tuple[List[Dict], List[Dict]]:
    """Split records into (weight half, architecture half) by a permutation seeded with ``seed``.

    The weight half gets the extra record when the count is odd. Each record lands in exactly
    one half; the order inside a half follows the permutation.
    """
    n = len(dataset_dicts)
    if n < 2:
        raise ValueError(
            f"The ALB search needs at least 2 training records to halve (one per half), got {n}"
        )
    # A private generator: the halves must not depend on (or disturb) the global RNG state.
    order = np.random.RandomState(seed).permutation(n)
    n_w = (n + 1) // 2
    w_half = [dataset_dicts[i] for i in order[:n_w]]
    alpha_half = [dataset_dicts[i] for i in order[n_w:]]
    return w_half, alpha_half


def load_search_halves(cfg: CfgNode) -> Tuple[List[Dict], List[Dict]]:
    """Records of cfg.DATASETS.TRAIN (filtered as detectron2's train loader does), halved by
    cfg.SEARCH.SEED."""
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=0,
        proposal_files=None,
    )
    try:
        w_half, alpha_half = halve_dataset(dicts, cfg.SEARCH.SEED)
    except ValueError as e:
        raise ValueError(f"DATASETS.TRAIN = {tuple(cfg.DATASETS.TRAIN)}: {e}") from None
    logger.info(
        "ALB search: %d training records of %s halved with SEARCH.SEED=%d -> %d for w, %d for "
        "alpha",
        len(dicts),
        tuple(cfg.DATASETS.TRAIN),
        cfg.SEARCH.SEED,
        len(w_half),
        len(alpha_half),
    )
    return w_half, alpha_half


def iters_per_epoch(num_records: int, total_batch_size: int) -> int:
    """Iterations for one pass over ``num_records`` at ``total_batch_size`` (the last batch of an
    epoch may borrow records of the next, as detectron2's infinite sampler does)."""
    if total_batch_size < 1:
        raise ValueError(f"SOLVER.IMS_PER_BATCH must be >= 1, got {total_batch_size}")
    return max(1, math.ceil(num_records / total_batch_size))


def build_search_loaders(cfg: CfgNode, w_half: List[Dict], alpha_half: List[Dict]):
    """Infinite train loaders (CTDatasetMapper, batch SOLVER.IMS_PER_BATCH over all processes)
    over the weight half and the architecture half."""
    mapper = CTDatasetMapper(cfg, is_train=True)
    return (
        build_detection_train_loader(cfg, mapper=mapper, dataset=w_half),
        build_detection_train_loader(cfg, mapper=mapper, dataset=alpha_half),
    )
