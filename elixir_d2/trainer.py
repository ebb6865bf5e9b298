"""Training and evaluation for CT lesions, used by train_net.py, the projects and the tests.

- ``ElixirTrainer``: detectron2's DefaultTrainer, built step by step with the parts that differ:
  CT read through CTDatasetMapper, lesions evaluated with LesionEvaluator, the model wrapped in
  DDP on the CPU too (``create_ddp_model``), the training step chosen by SOLVER.AMP
  (``elixir_d2.amp.build_step_trainer``: bfloat16 besides float16) and checkpoints written by
  ``AtomicCheckpointer`` (``elixir_d2.checkpoint``).
- ``build_lesion_evaluator``, ``create_ddp_model``, ``evaluate_with_proposal_recall``.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.solver.build import (
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .amp import autocast_dtype, build_step_trainer
from .checkpoint import AtomicCheckpointer
from .data import CTDatasetMapper
from .modeling.roi_heads import rtm_heads, rtm_output_mode
from .solver import PerParameterNormClippedSGD

__all__ = [
    "ElixirTrainer",
    "build_lesion_evaluator",
    "build_optimizer",
    "create_ddp_model",
    "deform_offset_parameters",
    "evaluate_with_proposal_recall",
]


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """DDP when there are several processes: on the local GPU, or on the CPU (no device_ids)."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).is_cuda:
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


def build_lesion_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
) -> DatasetEvaluator:
    """LesionEvaluator (FROC + mAP) for lesion datasets, else pycocotools COCO AP."""
    from .evaluation import LesionEvaluator

    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    if MetadataCatalog.get(dataset_name).get("evaluator_type", "coco") == "lesion":
        return LesionEvaluator(
            dataset_name,
            output_folder,
            fps=tuple(cfg.TEST.FROC_FPS),
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            froc_convention=cfg.TEST.FROC_CONVENTION,
        )
    # The fast COCO evaluation needs detectron2's C++ ops, absent from a Python-only build.
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


class ElixirTrainer(DefaultTrainer):
    """DefaultTrainer for CT lesions: CT mapper, lesion evaluator, CPU-capable DDP, atomic saves,
    bfloat16 mixed precision (SOLVER.AMP.PRECISION) besides detectron2's float16.

    Everything DefaultTrainer offers its callers and subclasses (``build_*``, ``test``,
    ``resume_or_load``, ``train``, ``build_hooks``, ``state_dict``) is inherited; only the
    construction is this class's own.
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ is not called: it hard-wires three parts this trainer replaces
        # (its DDP wrapper always passes device_ids, which DDP refuses for a CPU model; its AMP
        # loop is float16 on CUDA only; its checkpointer is not atomic). The rest is the same
        # sequence, so the state DefaultTrainer's methods rely on is all here.
        autocast_dtype(cfg)  # a bad SOLVER.AMP is refused before anything is built
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # a caller that set up no logging still sees detectron2's progress
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # Buffers are not broadcast each step, as in DefaultTrainer: BN statistics stay per rank.
        model = create_ddp_model(model, broadcast_buffers=False)
        # model, data_loader and optimizer are DefaultTrainer properties reading this loop.
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_checkpointer(self, cfg: CfgNode, model: torch.nn.Module) -> AtomicCheckpointer:
        """The checkpointer of ``model`` (DDP-wrapped or not) and of this trainer's state, in
        cfg.OUTPUT_DIR; DefaultTrainer.build_hooks hands it to the PeriodicCheckpointer."""
        # A proxy, as DefaultTrainer gives it: no trainer -> checkpointer -> trainer cycle.
        return AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    # detectron2 v0.6's DefaultTrainer checkpoints the iteration and the hooks (LR scheduler)
    # but not the optimizer: a resumed run would restart SGD momentum from zero. Later
    # detectron2 saves it under "_trainer", as here.
    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # detectron2 v0.6's own DefaultTrainer does not save it
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
                table = format_type_table(
                    {cfg.OUTPUT_DIR: metrics}, types, meta.get("type_abbrev", types)
                )
                d2_logger.info(f"Per-type results on {name}:\n" + table)
        return results

    @classmethod
    def _test_rtm_per_split(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test; an RTM model is run per dataset with typed output on typed splits
        and binary output (one box per proposal, lesion probability) on untyped ones."""
        if not rtm_heads(model):
            return super().test(cfg, model, evaluators)
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            sub = cfg.clone()
            sub.defrost()
            sub.DATASETS.TEST = (name,)
            typed = len(MetadataCatalog.get(name).get("thing_classes", None) or ()) > 1
            with rtm_output_mode(model, "typed" if typed else "binary"):
                results[name] = super().test(sub, model, [evaluators[idx]] if evaluators else None)
        return results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, with SOLVER.DEFORM_OFFSET_LR_FACTOR on the deformable convs' offset
        layers (see :func:`build_optimizer`)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=CTDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CTDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_lesion_evaluator(cfg, dataset_name, output_folder)


def deform_offset_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters of the layers predicting deformable-conv offsets (and DCNv2 masks): the
    ``conv2_offset`` of every detectron2 ``DeformBottleneckBlock``."""
    from detectron2.modeling.backbone.resnet import DeformBottleneckBlock

    return [
        p
        for m in model.modules()
        if isinstance(m, DeformBottleneckBlock)
        for p in m.conv2_offset.parameters()
    ]


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's ``build_optimizer`` (SGD, its norm / bias settings, gradient clipping; "norm"
    clipping batched by :class:`~elixir_d2.solver.PerParameterNormClippedSGD`), with
    the learning rate of :func:`deform_offset_parameters` scaled by
    SOLVER.DEFORM_OFFSET_LR_FACTOR. The LR scheduler reads each group's rate, so the factor
    holds through warmup and steps."""
    factor = float(cfg.SOLVER.DEFORM_OFFSET_LR_FACTOR)
    if factor <= 0:
        raise ValueError(f"SOLVER.DEFORM_OFFSET_LR_FACTOR must be > 0, got {factor}")
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    offsets = {id(p) for p in deform_offset_parameters(model)}
    if factor != 1.0 and offsets:
        # One group per parameter, the offset ones rescaled, then merged again by settings.
        single = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [p]}
            for g in groups
            for p in g["params"]
        ]
        for g in single:
            if id(g["params"][0]) in offsets:
                g["lr"] = g.get("lr", cfg.SOLVER.BASE_LR) * factor
        groups = reduce_param_groups(single)
    sgd = dict(
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "norm":
        # detectron2's per-parameter norm clipping, batched (same values, elixir_d2.solver).
        return PerParameterNormClippedSGD(
            groups, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE, **sgd
        )
    return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(groups, **sgd)


def evaluate_with_proposal_recall(cfg: CfgNode, model: torch.nn.Module) -> Dict[str, float]:
    """Lesion metrics (LesionEvaluator) and the proposals' recall at 50 / 100 / 300 (IoU 0.5,
    keys ``recall@k``) of ``model`` on ``cfg.DATASETS.TEST[0]``, from one inference pass."""
    from detectron2.evaluation import DatasetEvaluators, inference_on_dataset

    from .evaluation.proposal_recall import ProposalRecallEvaluator
    from .modeling.capture import capture

    dataset = cfg.DATASETS.TEST[0]
    with capture(model, "proposals") as captured:
        evaluators = DatasetEvaluators(
            [
                ElixirTrainer.build_evaluator(
                    cfg, dataset, os.path.join(cfg.OUTPUT_DIR, "inference", dataset)
                ),
                ProposalRecallEvaluator(dataset, captured),
            ]
        )
        res = inference_on_dataset(model, ElixirTrainer.build_test_loader(cfg, dataset), evaluators)
    return {**res.get("lesion", {}), **res.get("proposals", {})}
