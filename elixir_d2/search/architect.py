"""DARTS' architect role: the step on the architecture parameters alpha.

First order (DARTS' approximation, as the paper): alpha's gradient is taken at the current
network weights w, with a batch of the architecture half of the training split, so alpha is
judged on images w was not fitted to.
"""

from typing import Dict, List, Optional

import torch
from torch import nn

from .step import MixedPrecision, optimizer_step

__all__ = ["Architect"]


class Architect:
    """Owns the alpha optimiser of a search model (possibly DDP-wrapped), and its mixed
    precision (autocast + GradScaler) when SOLVER.AMP.ENABLED; :meth:`step` makes one
    first-order step on the alphas."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Optional[MixedPrecision] = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.precision = precision

    def step(self, batch: List[Dict]) -> Dict[str, float]:
        """One step of the alpha optimiser with ``batch`` (architecture half); returns losses."""
        return optimizer_step(self.model, batch, self.optimizer, self.precision)
