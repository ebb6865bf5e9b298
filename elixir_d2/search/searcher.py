"""First-order differentiable search of the Auto-lesion Blocks (paper, "Auto-Lesion Block Search").

The detector's backbone and proposal generator come from a trained baseline (MODEL.WEIGHTS) and
stay frozen; the box head is an ``ALBSearchHead``. Each iteration makes one SGD step on the
network weights w (head + box predictor) with a batch of the weight half of the training split,
then one Adam step on the architecture parameters alpha with a batch of the other half (DARTS'
first-order approximation: alpha's gradient is taken at the current w). The objective is the sum
of the detector losses that depend on trainable parameters (the box classification and
regression losses; the frozen RPN's losses carry no gradient and are left out).

Roles as in DARTS: the alpha step is the :class:`~.architect.Architect`'s; both steps are
:func:`~.step.optimizer_step` with their own optimiser; this module runs the loop. With
SOLVER.AMP.ENABLED both forwards run under autocast: float16 on CUDA, each step with its own
GradScaler, saved in the checkpoints, or SOLVER.AMP.PRECISION bfloat16 (CUDA or CPU, unscaled).

Distributed: the model is wrapped in DistributedDataParallel with the alphas as ordinary
parameters, so their gradients are all-reduced like the weights' and every process applies the
same Adam step: alphas stay identical across processes (DDP also broadcasts rank 0's initial
values).
"""

import logging
import math
import os
import time
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import CfgNode
from detectron2.engine import HookBase, TrainerBase, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from ..modeling.alb.genotype import Genotype
from ..modeling.box_head import ALBSearchHead
from ..modeling.freeze import freeze_modules
from ..trainer import create_ddp_model
from .architect import Architect
from .checkpoint import SearchCheckpointer
from .data import build_search_loaders, iters_per_epoch, load_search_halves
from .outputs import AlphaRecorder
from .step import MixedPrecision, optimizer_step, search_precision

__all__ = [
    "ALBSearcher",
    "build_search_optimizers",
    "cosine_lr",
    "freeze_for_search",
    "frozen_modules",
    "search_head",
]

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def search_head(model: nn.Module) -> nn.Module:
    """The model's searchable box head; a clear error if the config built another head."""
    roi_heads = getattr(_unwrap(model), "roi_heads", None)
    head = getattr(roi_heads, "box_head", None)
    if not isinstance(head, ALBSearchHead):
        raise ValueError(
            f"The ALB search needs MODEL.ROI_BOX_HEAD.NAME 'ALBSearchHead' (with ROI_HEADS.NAME "
            f"'ElixirROIHeads'); the model's box head is {type(head).__name__}"
        )
    return head


def frozen_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The parts kept fixed during the search: {"backbone", "proposal_generator"}."""
    model = _unwrap(model)
    parts = {}
    for name in ("backbone", "proposal_generator"):
        module = getattr(model, name, None)
        if module is None:
            raise ValueError(
                f"The ALB search freezes the model's {name}, but {type(model).__name__} has none "
                "(expected a GeneralizedRCNN with an RPN / TRPN proposal generator)"
            )
        parts[name] = module
    return parts


def freeze_for_search(model: nn.Module) -> None:
    """Freeze backbone and proposal generator: no gradients, norm statistics fixed.

    The project's MODEL.FREEZE_MODULES mechanism (``modeling/freeze.py``): its norms are kept in
    eval mode before every forward, whatever called ``model.train()`` since. The proposal
    generator itself stays in training mode so it returns training-time proposal counts
    (PRE/POST_NMS_TOPK_TRAIN), as the head sees when the final network is trained.
    """
    freeze_modules(_unwrap(model), list(frozen_modules(model)))


def build_search_optimizers(
    cfg: CfgNode, model: nn.Module
) -> Tuple[torch.optim.SGD, torch.optim.Adam]:
    """(SGD on every trainable parameter but the alphas, Adam on the alphas), per SEARCH.*."""
    alphas = list(search_head(model).arch_parameters())
    alpha_ids = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in alpha_ids]
    if not weights:
        raise ValueError("The ALB search found no trainable weights (is the box head frozen?)")
    if not all(a.requires_grad for a in alphas):
        raise ValueError("The ALB search head's alphas do not require gradients")
    s = cfg.SEARCH
    w_optimizer = torch.optim.SGD(
        weights, lr=s.W_LR, momentum=s.W_MOMENTUM, weight_decay=s.W_WEIGHT_DECAY
    )
    alpha_optimizer = torch.optim.Adam(
        alphas, lr=s.ALPHA_LR, betas=tuple(s.ALPHA_BETAS), weight_decay=s.ALPHA_WEIGHT_DECAY
    )
    return w_optimizer, alpha_optimizer


def cosine_lr(base_lr: float, iteration: int, max_iter: int) -> float:
    """Cosine annealing from ``base_lr`` at iteration 0 toward 0 at ``max_iter``; a closed form
    of the iteration, so a resumed search needs no scheduler state."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * iteration / max_iter))


class ALBSearcher(TrainerBase):
    """The alternating w / alpha optimisation as a detectron2 trainer (hooks, EventStorage,
    checkpoints, --resume), built from a config like DefaultTrainer.

    One epoch is one pass over the weight half at SOLVER.IMS_PER_BATCH; the search runs
    SEARCH.EPOCHS epochs and checkpoints every SEARCH.CHECKPOINT_PERIOD epochs.
    """

    def __init__(self, cfg: CfgNode, provenance: str = "", record: Optional[Dict] = None):
        """``provenance``: text put on top of genotype.yaml (e.g. the command line); ``record``:
        the ``provenance`` mapping written into it (config, data, epochs, date)."""
        super().__init__()
        if cfg.SEARCH.EPOCHS < 1:
            raise ValueError(f"SEARCH.EPOCHS must be >= 1, got {cfg.SEARCH.EPOCHS}")
        if cfg.SEARCH.CHECKPOINT_PERIOD < 1:
            raise ValueError(
                f"SEARCH.CHECKPOINT_PERIOD must be >= 1 epoch, got {cfg.SEARCH.CHECKPOINT_PERIOD}"
            )
        self.cfg = cfg
        # SOLVER.AMP: autocast, float16 with a GradScaler per optimiser (step.py); checked
        # before the model is built so float16 on the CPU fails at once.
        self.w_precision, alpha_precision = search_precision(cfg)
        model = build_model(cfg)
        search_head(model)
        freeze_for_search(model)
        self.w_optimizer, self.alpha_optimizer = build_search_optimizers(cfg, model)
        logger.info(
            "ALB search: backbone + proposal generator frozen (%d parameters); training %d "
            "weights (SGD) and %d alphas (Adam)",
            sum(p.numel() for m in frozen_modules(model).values() for p in m.parameters()),
            sum(p.numel() for g in self.w_optimizer.param_groups for p in g["params"]),
            sum(p.numel() for g in self.alpha_optimizer.param_groups for p in g["params"]),
        )
        w_half, alpha_half = load_search_halves(cfg)
        self.iters_per_epoch = iters_per_epoch(len(w_half), cfg.SOLVER.IMS_PER_BATCH)
        self.max_iter = cfg.SEARCH.EPOCHS * self.iters_per_epoch
        if not 0 <= cfg.SEARCH.WARMUP_EPOCHS < cfg.SEARCH.EPOCHS:
            raise ValueError(
                f"SEARCH.WARMUP_EPOCHS={cfg.SEARCH.WARMUP_EPOCHS} must be >= 0 and below "
                f"SEARCH.EPOCHS={cfg.SEARCH.EPOCHS}"
            )
        self.alpha_start_iter = cfg.SEARCH.WARMUP_EPOCHS * self.iters_per_epoch
        # Adam moves each alpha by about ALPHA_LR per step: fewer than that many steps cannot
        # separate the ops' softmax weights, and the derived genotype is then noise.
        reach = cfg.SEARCH.ALPHA_LR * (self.max_iter - self.alpha_start_iter)
        if reach < 0.5:
            logger.warning(
                "ALB search: SEARCH.ALPHA_LR x alpha steps = %.3g: the alphas can move by at most "
                "about that much, too little to tell ops apart; raise SEARCH.ALPHA_LR or EPOCHS",
                reach,
            )
        self._loaders = build_search_loaders(cfg, w_half, alpha_half)
        self._iters = None  # loader iterators, started at the first step
        self.model = create_ddp_model(model, broadcast_buffers=False)
        self.model.train()
        self.architect = Architect(self.model, self.alpha_optimizer, alpha_precision)
        self.start_iter = 0
        self.checkpointer = SearchCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            w_optimizer=self.w_optimizer,
            alpha_optimizer=self.alpha_optimizer,
            trainer=weakref.proxy(self),
        )
        self.recorder = AlphaRecorder(
            lambda: search_head(self.model),
            self.iters_per_epoch,
            cfg.OUTPUT_DIR,
            comment=self._genotype_comment(provenance, len(w_half), len(alpha_half)),
            provenance={
                **(record or {"searched": True}),
                "records_w_alpha": [len(w_half), len(alpha_half)],
            },
        )
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ setup
    def _genotype_comment(self, provenance: str, n_w: int, n_alpha: int) -> str:
        c = self.cfg
        lines = [
            "ALB / ALB_r genotype derived by search_net.py (first-order differentiable search).",
            *([provenance] if provenance else []),
            f"Data: {tuple(c.DATASETS.TRAIN)} halved with SEARCH.SEED={c.SEARCH.SEED} into "
            f"{n_w} (w) / {n_alpha} (alpha) records.",
            f"Search: {c.SEARCH.EPOCHS} epochs x {self.iters_per_epoch} iterations, batch "
            f"{c.SOLVER.IMS_PER_BATCH}, space {c.MODEL.ALB.SEARCH_SPACE}, "
            f"B={c.MODEL.ALB.BRANCHES}, D={c.MODEL.ALB.CHANNELS}, backbone/RPN from "
            f"MODEL.WEIGHTS={c.MODEL.WEIGHTS or '(random)'}.",
        ]
        return "\n".join(lines)

    def build_hooks(self) -> List[HookBase]:
        """Timer, per-epoch alpha recording, periodic checkpoints (main process), metric writers."""
        ret: List[HookBase] = [hooks.IterationTimer(), self.recorder]
        if comm.is_main_process():
            period = self.cfg.SEARCH.CHECKPOINT_PERIOD * self.iters_per_epoch
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, period))
            writers = [
                CommonMetricPrinter(self.max_iter),
                JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            ]
            ret.append(hooks.PeriodicWriter(writers, period=20))
        return ret

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from OUTPUT_DIR's last checkpoint (model, alphas, optimizers, iteration) when
        ``resume`` and one exists; else initialise backbone and RPN from MODEL.WEIGHTS."""
        weights = self.cfg.MODEL.WEIGHTS
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load(weights, resume=True)
            self.start_iter = self.iter + 1
            logger.info(
                "ALB search resumed at iteration %d (epoch %d of %d done)",
                self.start_iter,
                self.start_iter // self.iters_per_epoch,
                self.cfg.SEARCH.EPOCHS,
            )
            return
        self.start_iter = 0
        if not weights:
            logger.warning(
                "MODEL.WEIGHTS is empty: the frozen backbone and RPN of the ALB search are RANDOM. "
                "Only a smoke test; a real search starts from a trained baseline "
                "(e.g. MODEL.WEIGHTS output/quickstart/fpn/model_final.pth)."
            )
            return
        self.checkpointer.load(weights, checkpointables=[])
        missing = getattr(self.checkpointer.last_incompatible, "missing_keys", None) or []
        for name in frozen_modules(self.model):
            lost = [k for k in missing if k.startswith(name + ".")]
            if lost:
                logger.warning(
                    "%s lacks %d %s tensors (e.g. %s): they stay RANDOM and frozen during the "
                    "search; MODEL.WEIGHTS should be a trained baseline of the same backbone/RPN",
                    weights,
                    len(lost),
                    name,
                    lost[0],
                )

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> Dict:
        ret = super().state_dict()
        ret["iters_per_epoch"] = self.iters_per_epoch
        for key, precision in self._scalers():
            ret[key] = precision.scaler.state_dict()
        return ret

    def _scalers(self) -> List[Tuple[str, MixedPrecision]]:
        """(checkpoint key, MixedPrecision) of each GradScaler in use (none without AMP)."""
        pairs = [
            ("grad_scaler_w", self.w_precision),
            ("grad_scaler_alpha", self.architect.precision),
        ]
        return [(k, p) for k, p in pairs if p is not None and p.scaler is not None]

    def load_state_dict(self, state_dict: Dict) -> None:
        saved = state_dict.get("iters_per_epoch", self.iters_per_epoch)
        if saved != self.iters_per_epoch:
            raise ValueError(
                f"Checkpoint in {self.cfg.OUTPUT_DIR} has {saved} iterations per epoch but this "
                f"run has {self.iters_per_epoch}: the training split or SOLVER.IMS_PER_BATCH "
                "changed; resume with the same data and batch or use another OUTPUT_DIR"
            )
        super().load_state_dict(state_dict)
        for key, precision in self._scalers():
            if key in state_dict:  # absent when the checkpoint was written without AMP
                precision.scaler.load_state_dict(state_dict[key])

    # ------------------------------------------------------------------ the steps
    @property
    def epochs_done(self) -> int:
        """Epochs completed when the search (re)starts: 0, or those of the checkpoint resumed."""
        return self.start_iter // self.iters_per_epoch

    def w_step(self, batch: List[Dict]) -> Dict[str, float]:
        """One SGD step on the weights with ``batch`` (from the weight half); returns losses."""
        return optimizer_step(self.model, batch, self.w_optimizer, self.w_precision)

    def alpha_step(self, batch: List[Dict]) -> Dict[str, float]:
        """One Adam step on the alphas with ``batch`` (from the architecture half)."""
        return self.architect.step(batch)

    def next_batches(self) -> Tuple[List[Dict], List[Dict]]:
        """The next (weight-half batch, architecture-half batch)."""
        # One iterator per loader for the searcher's whole life: detectron2's aspect-ratio
        # grouping keeps its buckets on the dataset object, so two live iterators over the same
        # loader would corrupt each other's batches.
        if self._iters is None:
            self._iters = tuple(iter(loader) for loader in self._loaders)
        return next(self._iters[0]), next(self._iters[1])

    def run_step(self) -> None:
        assert self.model.training, "[ALBSearcher] model was changed to eval mode!"
        start = time.perf_counter()
        w_batch, alpha_batch = self.next_batches()
        data_time = time.perf_counter() - start

        lr = cosine_lr(self.cfg.SEARCH.W_LR, self.iter, self.max_iter)
        for group in self.w_optimizer.param_groups:
            group["lr"] = lr
        w_losses = self.w_step(w_batch)
        metrics = {f"w_{k}": v for k, v in w_losses.items()}
        # During the warm-up epochs only w learns, so that the alphas first compare ops whose
        # weights have started to fit rather than their random initialisations.
        if self.iter >= self.alpha_start_iter:
            alpha_losses = self.alpha_step(alpha_batch)
            metrics.update({f"alpha_{k}": v for k, v in alpha_losses.items()})
        self._write_metrics(metrics, data_time, lr)

    def _write_metrics(self, metrics: Dict[str, float], data_time: float, lr: float) -> None:
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(
                f"ALB search: non-finite loss at iteration {self.iter}: {metrics}"
            )
        metrics["data_time"] = data_time
        gathered = comm.gather(metrics)
        if comm.is_main_process():
            merged = {k: sum(m[k] for m in gathered) / len(gathered) for k in metrics}
            merged["data_time"] = max(m["data_time"] for m in gathered)
            self.storage.put_scalar("lr", lr, smoothing_hint=False)
            self.storage.put_scalars(**merged)

    def train(self) -> Optional[Genotype]:
        """Run (or finish) the search; returns the final derived genotype."""
        logger.info(
            "ALB search: %d epochs x %d iterations (w step + alpha step each), from iteration %d",
            self.cfg.SEARCH.EPOCHS,
            self.iters_per_epoch,
            self.start_iter,
        )
        super().train(self.start_iter, self.max_iter)
        return self.recorder.final_genotype
