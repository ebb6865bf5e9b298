"""Process launch for train_net.py and search_net.py.

``launch`` is detectron2's launcher where it can run: one process, or CUDA. detectron2 v0.6's
worker insists on CUDA and NCCL, so without CUDA this module starts the same process layout
(ranks, per-machine group) over the gloo backend: multi-process CPU runs and the tests use it.
"""

from __future__ import annotations

import gc
import socket
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from packaging.version import Version

import detectron2
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "release_process_groups"]

# detectron2 v0.6 (the installed release; its main branch still says "0.6") launches CUDA workers
# only. A later release numbered above 0.6 starts gloo workers itself.
_D2_LAUNCH_SUPPORTS_CPU = Version(detectron2.__version__).release > (0, 6)


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = timedelta(minutes=30),
) -> None:
    """detectron2's ``launch``; without CUDA, the same worker layout over gloo (CPU processes).

    ``num_gpus_per_machine`` counts processes per machine in the CPU case.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available() or _D2_LAUNCH_SUPPORTS_CPU:
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines,
            machine_rank,
            dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError(
                "--dist-url must name the first machine (tcp://HOST:PORT) in a multi-machine run"
            )
        dist_url = _local_dist_url()
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            tuple(args),
            timeout,
        ),
        daemon=False,
    )


def _local_dist_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    procs_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    # Every rank creates every machine's group (new_group is collective); this machine keeps its
    # own.
    for machine in range(world_size // procs_per_machine):
        group = dist.new_group(
            list(range(machine * procs_per_machine, (machine + 1) * procs_per_machine))
        )
        if machine == machine_rank:
            # detectron2 v0.6's comm has no public setter: its own launcher assigns this global.
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        release_process_groups()


def release_process_groups() -> None:
    """Destroy every process group, with the references detectron2's comm module keeps to them.

    comm holds the per-machine group and caches the world group for its gathers; a group still
    referenced outlives ``destroy_process_group`` and is freed at interpreter teardown, where
    gloo's threads can abort the worker ("terminate called without an active exception") after
    its work is done. Freed here, those threads are joined before the worker returns.
    """
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
