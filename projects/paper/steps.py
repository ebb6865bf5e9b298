"""The runs behind the paper's tables: one definition per model, shared by every recipe.
(Configs are relative to the repository root.)

A ``Train`` step trains a config (train_net.py) and is evaluated on its test splits at the end of
training; a ``Search`` step writes a genotype (search_net.py, or ``--random``). Steps name the
steps they read from (``weights_from``: that run's model_final.pth; ``genotype_from``: that
search's genotype.yaml). Every step has its R-50 config and its CPU quickstart counterpart
(``--quick``).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from detectron2.utils.file_io import PathManager

from common import Recipe, StepFailed

__all__ = ["Train", "Search", "STEPS", "load_run_cfg", "measure_speed"]


def load_run_cfg(step_dir: str):
    """The full config a run used (train_net / search_net dump it as config.yaml)."""
    from elixir_d2 import load_config

    return load_config(os.path.join(step_dir, "config.yaml"))


def measure_speed(step_dir: str, dataset: str, num_images: int) -> Dict[str, float]:
    """Inference ms/image of a trained run on the first ``num_images`` images of ``dataset``
    (after one warm-up run), batch 1, median; plus its parameter count."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from elixir_d2.benchmarking import staged_inference
    from elixir_d2.checkpoint import AtomicCheckpointer
    from elixir_d2.data import CTDatasetMapper

    cfg = load_run_cfg(step_dir)
    model = build_model(cfg).eval()
    AtomicCheckpointer(model).load(os.path.join(step_dir, "model_final.pth"))
    mapper = CTDatasetMapper(cfg, is_train=False)
    records = DatasetCatalog.get(dataset)[:num_images]
    if not records:
        raise StepFailed(f"{dataset} has no image to time inference on")
    times = []
    with torch.no_grad():
        staged_inference(model, [mapper(records[0])])  # warm-up
        for r in records:
            times.append(staged_inference(model, [mapper(r)])["total"])
    return {
        "ms_per_image": 1e3 * statistics.median(times),
        "timed_images": len(times),
        "device": cfg.MODEL.DEVICE,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
    }


@dataclass(frozen=True)
class Train:
    """Train ``config`` (``quick_config`` with --quick) on ``train_split``, evaluate on
    ``test_splits``."""

    name: str
    config: str
    quick_config: str
    train_split: str = "train"
    test_splits: Tuple[str, ...] = ("test",)
    weights_from: Optional[str] = None
    genotype_from: Optional[str] = None
    finetune: bool = False  # typed fine-tuning: --finetune-iters instead of --iters
    speed: bool = False  # time inference of the trained model afterwards (Table 1's speed column)
    opts: Tuple[str, ...] = ()

    def config_for(self, quick: bool) -> str:
        return self.quick_config if quick else self.config

    @property
    def deps(self) -> Tuple[str, ...]:
        return tuple(d for d in (self.weights_from, self.genotype_from) if d)

    def plan(self, recipe: Recipe) -> List[str]:
        """The train_net.py options of this run (after the config file)."""
        src = recipe.source
        opts = [
            "DATASETS.TRAIN",
            f"('{src.name(self.train_split)}',)",
            "DATASETS.TEST",
            "(" + "".join(f"'{src.name(s)}'," for s in self.test_splits) + ")",
        ]
        if self.weights_from:
            opts += ["MODEL.WEIGHTS", recipe.weights(self.weights_from)]
        if self.genotype_from:
            opts += ["MODEL.ALB.GENOTYPE", recipe.genotype(self.genotype_from)]
        return (
            opts
            + list(self.opts)
            + recipe.schedule_opts(self.finetune)
            + recipe.common_opts(self.name)
        )

    def execute(self, recipe: Recipe, opts: List[str]) -> None:
        recipe._launch("train", recipe.train_args(self.config_for(recipe.quick), opts))
        recipe.weights(self.name)  # raises if training left no final model
        for split in self.test_splits:
            recipe.metrics(self.name, split)  # raises if it was not evaluated
        if self.speed:
            n = recipe.args.speed_images or (5 if recipe.quick else 50)
            info = measure_speed(
                recipe.step_dir(self.name), recipe.source.name(self.test_splits[0]), n
            )
            with PathManager.open(
                os.path.join(recipe.step_dir(self.name), "speed.json"), "w", encoding="utf-8"
            ) as f:
                json.dump(info, f, indent=1)

    def describe(self, recipe: Recipe) -> dict:
        cfg = load_run_cfg(recipe.step_dir(self.name))
        info = {
            "config": self.config_for(recipe.quick),
            "max_iter": cfg.SOLVER.MAX_ITER,
            "batch": cfg.SOLVER.IMS_PER_BATCH,
            "device": cfg.MODEL.DEVICE,
            "train": recipe.source.name(self.train_split),
        }
        if self.genotype_from:
            info["genotype"] = cfg.MODEL.ALB.GENOTYPE
        return info


@dataclass(frozen=True)
class Search:
    """Search a genotype (search_net.py) from ``weights_from``'s model, or draw one (``random``)."""

    name: str
    config: str
    quick_config: str
    weights_from: Optional[str] = "fpn"
    random: bool = False
    quick_opts: Tuple[str, ...] = ()
    opts: Tuple[str, ...] = ()

    @property
    def overridable(self) -> bool:
        """--genotype replaces this search (the medical-space differentiable one)."""
        return not self.random and not any("darts" in s for s in (self.config,) + self.quick_opts)

    def config_for(self, quick: bool) -> str:
        return self.quick_config if quick else self.config

    @property
    def deps(self) -> Tuple[str, ...]:
        return (self.weights_from,) if self.weights_from and not self.random else ()

    def plan(self, recipe: Recipe) -> List[str]:
        """The search_net.py options of this run (after the config file)."""
        src = recipe.source
        opts = ["DATASETS.TRAIN", f"('{src.name('train')}',)", "DATASETS.TEST", "()"]
        if self.weights_from and not self.random:
            opts += ["MODEL.WEIGHTS", recipe.weights(self.weights_from)]
        if recipe.quick:
            opts += list(self.quick_opts)
        if recipe.args.search_epochs and not self.random:
            opts += ["SEARCH.EPOCHS", str(recipe.args.search_epochs)]
            if recipe.args.search_epochs < 2:  # a one-epoch search has no room for a w-only warm-up
                opts += ["SEARCH.WARMUP_EPOCHS", "0"]
        return opts + list(self.opts) + recipe.common_opts(self.name)

    def execute(self, recipe: Recipe, opts: List[str]) -> None:
        recipe._launch(
            "search", recipe.search_args(self.config_for(recipe.quick), opts, self.random)
        )
        recipe.genotype(self.name)  # raises if no genotype was written

    def describe(self, recipe: Recipe) -> dict:
        cfg = load_run_cfg(recipe.step_dir(self.name))
        info = {
            "config": self.config_for(recipe.quick),
            "genotype": recipe.genotype(self.name),
            "space": cfg.MODEL.ALB.SEARCH_SPACE,
        }
        if not self.random:
            info.update({"epochs": cfg.SEARCH.EPOCHS, "batch": cfg.SOLVER.IMS_PER_BATCH})
        return info


def _steps(*steps) -> Dict[str, object]:
    return {s.name: s for s in steps}


_TYPED = dict(train_split="val_typed", finetune=True)

STEPS = _steps(
    # ---------------------------------------------------------------- DeepLesion, binary
    Train("fpn", "configs/fpn_R_50_deeplesion.yaml", "configs/quickstart/fpn.yaml", speed=True),
    Search(
        "search",
        "configs/search_alb_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/search_alb.yaml",
    ),
    Train(
        "frcnn_c4",
        "configs/faster_rcnn_R_50_C4_deeplesion.yaml",
        "configs/quickstart/faster_rcnn_C4.yaml",
        speed=True,
    ),
    Train(
        "deformv2",
        "configs/deformv2_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/deformv2.yaml",
        speed=True,
    ),
    Train(
        "elixirnet_c4",
        "configs/elixirnet_R_50_C4_deeplesion.yaml",
        "configs/quickstart/elixirnet_C4.yaml",
        genotype_from="search",
        speed=True,
    ),
    # = configs/ablation/trpn_alb.yaml (Table 5 row TRPN + ALB)
    Train(
        "elixirnet_fpn",
        "configs/elixirnet_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/elixirnet.yaml",
        genotype_from="search",
        speed=True,
    ),
    Train(
        "elixirnet_deformv2",
        "configs/elixirnet_deformv2_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/elixirnet_deformv2.yaml",
        genotype_from="search",
        speed=True,
    ),
    # ---------------------------------------------------------------- Table 5 / 6 ablations
    Train("ablation_trpn", "configs/ablation/trpn.yaml", "configs/quickstart/trpn.yaml"),
    Train(
        "ablation_alb",
        "configs/ablation/alb.yaml",
        "configs/quickstart/alb.yaml",
        genotype_from="search",
    ),
    Train(
        "ablation_alb_9slices",
        "configs/ablation/alb_9slices.yaml",
        "configs/quickstart/ablation/alb_9slices.yaml",
        genotype_from="search",
    ),
    Search(
        "search_darts",
        "configs/search_alb_darts_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/search_alb.yaml",
        quick_opts=("MODEL.ALB.SEARCH_SPACE", "darts"),
    ),
    Search(
        "random_alb",
        "configs/search_alb_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/search_alb.yaml",
        weights_from=None,
        random=True,
        opts=("SEED", "0"),
    ),
    Train(
        "ablation_alb_darts",
        "configs/ablation/alb_darts_space.yaml",
        "configs/quickstart/ablation/alb_darts_space.yaml",
        genotype_from="search_darts",
    ),
    Train(
        "ablation_alb_random",
        "configs/ablation/alb_random.yaml",
        "configs/quickstart/ablation/alb_random.yaml",
        genotype_from="random_alb",
    ),
    # ------------------------------------------------ typed fine-tuning (Table 4, RTM rows)
    Train(
        "fpn_finetune_typed",
        "configs/fpn_finetune_typed_deeplesion.yaml",
        "configs/quickstart/fpn_finetune_typed.yaml",
        test_splits=("test_typed",),
        weights_from="fpn",
        **_TYPED,
    ),
    Train(
        "elixirnet_wo_rtm",
        "configs/elixirnet_wo_rtm_finetune_deeplesion.yaml",
        "configs/quickstart/elixirnet_wo_rtm_finetune.yaml",
        test_splits=("test_typed",),
        weights_from="elixirnet_fpn",
        genotype_from="search",
        **_TYPED,
    ),
    # = configs/ablation/full.yaml; also evaluated on the binary test split for Table 5.
    Train(
        "elixirnet_rtm",
        "configs/elixirnet_rtm_finetune_deeplesion.yaml",
        "configs/quickstart/elixirnet_rtm_finetune.yaml",
        test_splits=("test_typed", "test"),
        weights_from="elixirnet_fpn",
        genotype_from="search",
        **_TYPED,
    ),
    Train(
        "ablation_trpn_rtm",
        "configs/ablation/trpn_rtm.yaml",
        "configs/quickstart/ablation/trpn_rtm.yaml",
        test_splits=("test_typed", "test"),
        weights_from="ablation_trpn",
        **_TYPED,
    ),
    # ---------------------------------------------------------------- KiTS19 (Table 3)
    Train("kits19_fpn", "configs/fpn_R_50_kits19.yaml", "configs/quickstart/fpn.yaml"),
    Search(
        "kits19_search",
        "configs/search_alb_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/search_alb.yaml",
        weights_from="kits19_fpn",
    ),
    Train(
        "kits19_deformv2",
        "configs/deformv2_R_50_FPN_kits19.yaml",
        "configs/quickstart/deformv2.yaml",
    ),
    Train(
        "kits19_elixirnet_fpn",
        "configs/elixirnet_R_50_FPN_kits19.yaml",
        "configs/quickstart/elixirnet.yaml",
        genotype_from="kits19_search",
    ),
    Train(
        "kits19_elixirnet_deformv2",
        "configs/elixirnet_deformv2_R_50_FPN_kits19.yaml",
        "configs/quickstart/elixirnet_deformv2.yaml",
        genotype_from="kits19_search",
    ),
)


def steps(*names: str):
    """The named steps, in the order given."""
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise KeyError(f"unknown steps {unknown}; known: {sorted(STEPS)}")
    return [STEPS[n] for n in names]
