"""Inference over several processes (``predict_net.py --num-gpus N --num-machines M``): which cases
each rank predicts, and the steps one rank does for all.

The ranks are detectron2's (``detectron2.utils.comm``), started by :func:`elixir_d2.launch.launch`
as for training: CUDA processes, or CPU processes over gloo. Every step that must happen once
(finding the cases, preparing the output folder, writing the run files) runs on rank 0 and its
result, or its error, reaches every rank, so that a refusal ends every process with the same
message instead of leaving the others waiting. With one process these helpers call the function
and return, and nothing of torch.distributed is touched.
"""

from __future__ import annotations

from typing import Callable, List, TypeVar

from detectron2.utils import comm

__all__ = ["shard_indices", "run_on_main", "run_on_every_rank"]

T = TypeVar("T")


def shard_indices(num_cases: int, world_size: int, rank: int) -> List[int]:
    """The cases rank ``rank`` of ``world_size`` predicts, by their position in the run's case
    order: every ``world_size``-th case from position ``rank`` (round robin). It depends on nothing
    but the three numbers, so every rank, and a resumed run, computes the same split; cases next
    to each other in the sorted order (often alike in size) go to different ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} process(es)")
    return list(range(rank, num_cases, world_size))


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0; every rank returns its result or raises its error."""
    if comm.get_world_size() == 1:
        return fn()
    result = error = None
    if comm.is_main_process():
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    result, error = comm.all_gather((result, error))[0]
    if error is not None:
        raise error
    return result


def run_on_every_rank(fn: Callable[[], T]) -> List[T]:
    """``fn()`` on every rank; every rank returns the list of results in rank order, or raises the
    error of the lowest rank that failed."""
    if comm.get_world_size() == 1:
        return [fn()]
    result = error = None
    try:
        result = fn()
    except Exception as e:
        error = e
    shared = comm.all_gather((result, error))
    for _, err in shared:
        if err is not None:
            raise err
    return [r for r, _ in shared]
