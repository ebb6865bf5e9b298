"""The one optimisation step of the ALB search, shared by the weight step and the architect.

Both steps differentiate the same objective with respect to every trainable parameter (under
DistributedDataParallel every trainable parameter must get a gradient), and each then moves only
the parameters of its own optimiser; the other set's gradients are cleared before the next use.
"""
from typing import Dict, List, Tuple

import torch
from torch import nn

__all__ = ["search_loss", "optimizer_step"]


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
    model: nn.Module, batch: List[Dict], optimizer: torch.optim.Optimizer
) -> Dict[str, float]:
    """One step of ``optimizer`` on the search objective of ``batch``; returns the losses.

    ``optimizer``'s parameter groups say which parameters move: the network weights for the
    weight step, the alphas for the architect's step.
    """
    total, values = search_loss(model, batch)
    model.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return values
