#!/usr/bin/env python
"""Train and evaluate ElixirNet and its baselines with detectron2.

    python train_net.py --config-file configs/elixirnet_R_50_FPN_deeplesion.yaml --num-gpus 4
    python train_net.py --config-file configs/quickstart/fpn.yaml            # CPU, synthetic data
    python train_net.py --config-file C --eval-only MODEL.WEIGHTS model_final.pth

Multi-machine: add --num-machines M --machine-rank R --dist-url tcp://<host0>:<port>.
"""
from __future__ import annotations

import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, verify_results

import elixir_d2  # noqa: F401  (registers models and datasets)
from elixir_d2 import add_elixirnet_config
from elixir_d2.data import CTDatasetMapper

logger = logging.getLogger("elixir_d2")


def build_lesion_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """LesionEvaluator (FROC + mAP) for lesion datasets, else pycocotools COCO AP."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type == "lesion":
        try:
            from elixir_d2.evaluation import LesionEvaluator
        except ImportError:
            LesionEvaluator = None
        if LesionEvaluator is not None:
            return LesionEvaluator(dataset_name, output_folder, fps=tuple(cfg.TEST.FROC_FPS))
    # The fast COCO evaluation needs detectron2's C++ ops, absent from a Python-only build.
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


class Trainer(DefaultTrainer):
    """DefaultTrainer reading CT slices through CTDatasetMapper and evaluating lesions by FROC."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=CTDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=CTDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_lesion_evaluator(cfg, dataset_name, output_folder)


def setup(args) -> CfgNode:
    """Config from defaults + ElixirNet keys + the file + command-line opts."""
    cfg = get_cfg()
    add_elixirnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            raise ValueError("TEST.AUG is not supported for CT inputs")
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
