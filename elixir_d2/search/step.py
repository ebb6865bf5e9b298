"""The one optimisation step of the ALB search, shared by the weight step and the architect.

Both steps differentiate the same objective with respect to every trainable parameter (under
DistributedDataParallel every trainable parameter must get a gradient), and each then moves only
the parameters of its own optimiser; the other set's gradients are cleared before the next use.

Mixed precision (``SOLVER.AMP``, as in training: float16 autocast on CUDA with a GradScaler, or
bfloat16 autocast on CUDA or the CPU, unscaled; elixir_d2/amp.py): the forward runs under
autocast, the backward and the step outside it. Under float16 the weight step and the architect
each have their own GradScaler, since an overflow in one parameter set's gradients says nothing
about the other's.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode

from ..amp import autocast_dtype

__all__ = [
    "MixedPrecision",
    "check_search_amp",
    "search_precision",
    "search_loss",
    "optimizer_step",
]


@dataclass
class MixedPrecision:
    """How one search step runs its forward: autocast on ``device_type`` to ``dtype``, with
    ``scaler`` scaling the loss (float16), or None (bfloat16 needs no scaling)."""

    device_type: str
    dtype: torch.dtype = torch.float16
    scaler: Optional[torch.amp.GradScaler] = None


def check_search_amp(cfg: CfgNode) -> None:
    """Raise ValueError naming the key when SOLVER.AMP asks for what the search cannot run:
    float16 off CUDA (detectron2's AMP is CUDA float16; bfloat16 runs on the CPU too)."""
    autocast_dtype(cfg)


def search_precision(cfg: CfgNode) -> Tuple[Optional[MixedPrecision], Optional[MixedPrecision]]:
    """(weight step's, architect's) mixed precision from SOLVER.AMP; (None, None) off.
    float16 gets one GradScaler per step, bfloat16 none."""
    dtype = autocast_dtype(cfg)
    if dtype is None:
        return None, None
    device = torch.device(cfg.MODEL.DEVICE).type
    if dtype == torch.float16:
        return (
            MixedPrecision(device, dtype, torch.amp.GradScaler(device)),
            MixedPrecision(device, dtype, torch.amp.GradScaler(device)),
        )
    return MixedPrecision(device, dtype), MixedPrecision(device, dtype)


def search_loss(model: nn.Module, batch: List[Dict]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(sum of the losses that depend on trainable parameters, their values for logging).

    The frozen RPN's losses carry no gradient and are left out of the objective.
    """
    loss_dict = model(batch)
    trainable = {k: v for k, v in loss_dict.items() if v.requires_grad}
    if not trainable:
        raise RuntimeError(f"No loss depends on trainable parameters (losses: {sorted(loss_dict)})")
    total = sum(trainable.values())
    values = {k: float(v.detach()) for k, v in trainable.items()}
    values["total_loss"] = float(total.detach())
    return total, values


def optimizer_step(
    model: nn.Module,
    batch: List[Dict],
    optimizer: torch.optim.Optimizer,
    precision: Optional[MixedPrecision] = None,
) -> Dict[str, float]:
    """One step of ``optimizer`` on the search objective of ``batch``; returns the losses.

    ``optimizer``'s parameter groups say which parameters move: the network weights for the
    weight step, the alphas for the architect's step. With ``precision`` the forward runs under
    autocast and a scaler, if any, scales the loss and skips the step on inf / NaN gradients.
    """
    if precision is None:
        total, values = search_loss(model, batch)
    else:
        with torch.autocast(device_type=precision.device_type, dtype=precision.dtype):
            total, values = search_loss(model, batch)
    model.zero_grad(set_to_none=True)
    scaler = precision.scaler if precision is not None else None
    if scaler is None:
        total.backward()
        optimizer.step()
    else:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    return values
