"""Inference fast paths of the ALB ops: an eval-mode BatchNorm folded into the conv before it.

Kept apart from the op definitions (``ops.py``): the ops say what they compute, this module how a
frozen conv + norm pair is computed in one pass. The values are those of ``norm(conv(x))``; in
training mode, with GroupNorm or with no norm, the plain modules run.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["bn_fold", "conv_norm", "concat_conv_norm"]


def bn_fold(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` with ``norm(y) == y * scale + shift`` per channel, for a BatchNorm in
    eval mode with running statistics; None otherwise (train mode, GN, no norm)."""
    if not isinstance(norm, nn.BatchNorm2d) or norm.training or norm.running_var is None:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def conv_norm(
    conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor, channels: Optional[slice] = None
) -> torch.Tensor:
    """``norm(conv(x))``, or ``norm``'s ``channels`` applied to ``conv(x)``. An eval-mode
    BatchNorm is folded into the conv's weights: one pass over the feature map less (these maps
    are small, so elementwise passes are a large part of the CPU time), same values."""
    fold = bn_fold(norm)
    if fold is None:
        if channels is not None:
            raise ValueError("conv_norm: channels only with an eval-mode BatchNorm")
        return norm(conv(x))
    scale, shift = fold
    if channels is not None:
        scale, shift = scale[channels], shift[channels]
    bias = shift if conv.bias is None else shift + conv.bias * scale
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), bias)


def concat_conv_norm(
    norm: nn.Module, pairs: Sequence[Tuple[nn.Conv2d, torch.Tensor]]
) -> torch.Tensor:
    """``norm(cat([conv(x) for conv, x in pairs], dim=1))``; an eval-mode BatchNorm is folded
    into each conv with its slice of channels, so the concatenation is never normalised apart."""
    if bn_fold(norm) is None:
        return norm(torch.cat([conv(x) for conv, x in pairs], dim=1))
    out, start = [], 0
    for conv, x in pairs:
        stop = start + conv.out_channels
        out.append(conv_norm(conv, norm, x, slice(start, stop)))
        start = stop
    return torch.cat(out, dim=1)
