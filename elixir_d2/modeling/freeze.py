"""Freezing whole sub-modules for fine-tuning (MODEL.FREEZE_MODULES; paper Table 4 protocol:
backbone and RPN frozen, head (+ RTM) fine-tuned).

detectron2's MODEL.BACKBONE.FREEZE_AT only reaches the ResNet stem / stages, not the FPN nor the
proposal generator. Here a frozen module's parameters stop requiring gradients (so the optimizer,
which skips them, never touches them: no update, no weight decay) and its normalisation layers
with running statistics are kept in eval mode, also after ``model.train()``, so BatchNorm
statistics do not drift either. GroupNorm / FrozenBatchNorm have no running statistics to keep.
"""

import logging
from typing import List, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["freeze_modules", "trainable_parameter_count"]

logger = logging.getLogger(__name__)


def _keep_eval(module: nn.Module, inputs) -> None:
    # Forward pre-hook: the trainer calls model.train() (and evaluation restores train mode),
    # so setting eval once is not enough; re-assert it before every forward.
    module.train(False)


def freeze_modules(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Freeze the sub-modules of ``model`` named (dotted paths, e.g. "backbone",
    "proposal_generator", "roi_heads.box_predictor"); returns the names frozen.

    Raises ValueError naming MODEL.FREEZE_MODULES and the valid top-level names when a name is
    not a sub-module of ``model``.
    """
    frozen = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not name or module is None or module is model:
            children = [n for n, _ in model.named_children()]
            raise ValueError(
                f"MODEL.FREEZE_MODULES: {name!r} is not a sub-module of {type(model).__name__}; "
                f"top-level modules: {children}"
            )
        count = 0
        for p in module.parameters():
            p.requires_grad_(False)
            count += p.numel()
        for m in module.modules():
            if isinstance(m, _NormBase) and m.track_running_stats:
                m.train(False)
                m.register_forward_pre_hook(_keep_eval)
        frozen.append(name)
        logger.info(f"Froze {name} ({count} parameters; norm statistics fixed)")
    return frozen


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that still require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
