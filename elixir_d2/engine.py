"""Training plumbing shared by train_net.py and search_net.py.

- ``launch``: detectron2's launcher; on a machine without CUDA (where detectron2 v0.6's launcher
  refuses to start) the same process layout over the gloo backend, so multi-process CPU runs and
  tests work.
- ``AtomicCheckpointer`` (defined in ``elixir_d2.checkpoint``): atomic, genotype-aware saves and
  safe loads.
- ``ElixirTrainer``: DefaultTrainer reading CT through CTDatasetMapper, evaluating lesions with
  LesionEvaluator, wrapping the model in DDP on CPU too, and checkpointing atomically.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import weakref
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import launch as d2_launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import AtomicCheckpointer
from .data import CTDatasetMapper

logger = logging.getLogger(__name__)

__all__ = ["launch", "AtomicCheckpointer", "ElixirTrainer", "build_lesion_evaluator", "create_ddp_model"]


# ----------------------------------------------------------------------------------- launch
def _d2_launch_supports_cpu() -> bool:
    # detectron2.engine.launch is shadowed by the function of that name: fetch the module.
    launch_mod = importlib.import_module("detectron2.engine.launch")
    return "gloo" in inspect.getsource(launch_mod._distributed_worker).lower()


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
    if world_size <= 1 or torch.cuda.is_available() or _d2_launch_supports_cpu():
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout)
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("--dist-url must name the first machine (tcp://HOST:PORT) in a multi-machine run")
        dist_url = _local_dist_url()
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, tuple(args), timeout),
        daemon=False,
    )


def _local_dist_url() -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    # detectron2's comm needs the group of the ranks on this machine, as its launcher makes it.
    for machine in range(world_size // procs_per_machine):
        group = dist.new_group(list(range(machine * procs_per_machine, (machine + 1) * procs_per_machine)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """DDP when there are several processes: on the local GPU, or on the CPU (no device_ids)."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).is_cuda:
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


# ----------------------------------------------------------------------------------- trainer
def build_lesion_evaluator(cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """LesionEvaluator (FROC + mAP) for lesion datasets, else pycocotools COCO AP."""
    from .evaluation import LesionEvaluator

    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    if MetadataCatalog.get(dataset_name).get("evaluator_type", "coco") == "lesion":
        return LesionEvaluator(dataset_name, output_folder, fps=tuple(cfg.TEST.FROC_FPS),
                               max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    # The fast COCO evaluation needs detectron2's C++ ops, absent from a Python-only build.
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


class ElixirTrainer(DefaultTrainer):
    """DefaultTrainer for CT lesions: CT mapper, lesion evaluator, CPU-capable DDP, atomic saves."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__, with create_ddp_model that also works on the CPU (gloo) and
        # the atomic checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # detectron2 v0.6's DefaultTrainer checkpoints the iteration and the hooks (LR scheduler)
    # but not the optimizer: a resumed run would restart SGD momentum from zero. Later
    # detectron2 saves it under "_trainer", as here.
    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # absent from checkpoints written before this fix
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model, then MODEL.FREEZE_MODULES frozen (fine-tuning protocol of Table
        4: backbone + proposal generator; see elixir_d2/modeling/freeze.py)."""
        from .modeling.freeze import freeze_modules

        model = super().build_model(cfg)
        freeze_modules(model, cfg.MODEL.FREEZE_MODULES)
        return model

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test; on typed datasets also logs the per-type table (Table 4 layout)."""
        from .evaluation import format_type_table

        results = cls._test_rtm_per_split(cfg, model, evaluators)
        # Under detectron2's logger: train_net's default_setup gives it the console and log.txt,
        # next to detectron2's own results printout.
        d2_logger = logging.getLogger("detectron2.elixir_d2")
        # DefaultTrainer.test unwraps the result of a single dataset.
        per_dataset = {cfg.DATASETS.TEST[0]: results} if "lesion" in results else results
        for name, res in per_dataset.items():
            metrics = res.get("lesion", {}) if isinstance(res, dict) else {}
            if comm.is_main_process() and "AP_typed" in metrics:  # typed dataset
                meta = MetadataCatalog.get(name)
                types = meta.get("thing_classes")
                table = format_type_table({cfg.OUTPUT_DIR: metrics}, types, meta.get("type_abbrev", types))
                d2_logger.info(f"Per-type results on {name}:\n" + table)
        return results

    @classmethod
    def _test_rtm_per_split(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test; an RTM model is run per dataset with typed output on typed splits
        and binary output (one box per proposal, lesion probability) on untyped ones."""
        roi_heads = getattr(getattr(model, "module", model), "roi_heads", None)
        if getattr(roi_heads, "rtm", None) is None:
            return super().test(cfg, model, evaluators)
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        results, before = OrderedDict(), roi_heads.rtm_output
        try:
            for idx, name in enumerate(cfg.DATASETS.TEST):
                sub = cfg.clone()
                sub.defrost()
                sub.DATASETS.TEST = (name,)
                typed = len(MetadataCatalog.get(name).get("thing_classes", None) or ()) > 1
                roi_heads.rtm_output = "typed" if typed else "binary"
                results[name] = super().test(sub, model, [evaluators[idx]] if evaluators else None)
        finally:
            roi_heads.rtm_output = before
        return results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=CTDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=CTDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_lesion_evaluator(cfg, dataset_name, output_folder)


def evaluate_with_proposal_recall(cfg: CfgNode, model: torch.nn.Module) -> Dict[str, float]:
    """Lesion metrics (LesionEvaluator) and the proposals' recall at 50 / 100 / 300 (IoU 0.5,
    keys ``recall@k``) of ``model`` on ``cfg.DATASETS.TEST[0]``, from one inference pass."""
    from detectron2.evaluation import DatasetEvaluators, inference_on_dataset

    from .evaluation.proposal_recall import ProposalRecallEvaluator, capture_proposals

    dataset = cfg.DATASETS.TEST[0]
    with capture_proposals(model) as captured:
        evaluators = DatasetEvaluators([
            ElixirTrainer.build_evaluator(cfg, dataset, os.path.join(cfg.OUTPUT_DIR, "inference", dataset)),
            ProposalRecallEvaluator(dataset, captured),
        ])
        res = inference_on_dataset(model, ElixirTrainer.build_test_loader(cfg, dataset), evaluators)
    return {**res.get("lesion", {}), **res.get("proposals", {})}
