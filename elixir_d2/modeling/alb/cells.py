"""ALB and ALB_r blocks, searchable (mixed ops) or fixed (from a genotype). DARTS-style cells.

A block takes the outputs ``s0, s1`` of the two previous blocks, brings each to ``D`` channels
(1x1 ReLU-Conv-Norm; ``s0`` is first halved in resolution when the previous block was an ALB_r,
so both inputs have the same size), computes B branches, each the sum of two ops on earlier nodes,
and returns the concatenation of the B branch outputs (``B x D`` channels). In ALB_r the edges
leaving the two block inputs have stride 2; the caller doubles D for ALB_r.

The ReLU of that preprocessing is the caller's: a block takes ``relu(s0), relu(s1)``. Each block
output feeds the preprocessing of the next two blocks (the stem output, of the first two three
times), so the head rectifies it once instead of once per consumer; on the 1000 RoIs of a test
image these maps are the largest of the head.

A mixed op brings each op output to channels_last, the layout of the head's maps (see
box_head.ALBStem), before the weighted sum: the ``none`` op's zeros and region_nonlocal's output
(broadcast over H x W) would otherwise make the sum NCHW, and every conv after it take oneDNN's
slower path (projects/benchmarks/search_head.py times both).

Every forward takes ``num_per_image`` (proposals per image) and hands it to each op; only
``region_nonlocal`` uses it.
"""

from typing import List, Optional, Sequence

import torch
from torch import nn

from .genotype import edge_inputs
from .ops import ALBOp, FactorizedReduce, RegionNonLocal, build_op, channels_last, conv_op

__all__ = ["MixedOp", "SearchBlock", "GenotypeBlock"]


class MixedOp(nn.Module):
    """All candidate ops on one edge; output = sum_k weights[k] * op_k(x) (paper eq. 3)."""

    def __init__(
        self,
        ops: Sequence[str],
        c_in: int,
        c_out: int,
        stride: int,
        norm: str,
        affine: bool = False,
    ):
        super().__init__()
        self.op_names = list(ops)
        self.ops = nn.ModuleList(build_op(o, c_in, c_out, stride, norm, affine) for o in ops)

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        num_per_image: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """``weights``: one per op (softmax of the edge's alphas, computed by the caller).

        The weighted sum is float32 whatever dtype autocast gives the ops: each weight is kept a
        (1, 1, 1) float32 tensor, which type promotion honours (a 0-dim weight would take the
        op's half dtype), so the alpha gradient, a sum over the whole feature map, is
        accumulated in float32 and cannot overflow float16.
        """
        if weights.shape != (len(self.ops),):
            raise ValueError(f"MixedOp: {len(self.ops)} ops but weights of shape {weights.shape}")
        weights = weights.float()[:, None, None, None]
        return sum(w * channels_last(op(x, num_per_image)) for w, op in zip(weights, self.ops))


class _BlockBase(nn.Module):
    """Shared preprocessing and bookkeeping of searchable and fixed blocks."""

    def __init__(
        self,
        c_pp: int,
        c_p: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        branches: int,
        norm: str,
        affine: bool,
    ):
        super().__init__()
        self.reduction = reduction
        self.branches = branches
        self.out_channels = branches * channels
        # relu=False: the inputs come rectified (module docstring).
        if reduction_prev:
            self.pre0: ALBOp = FactorizedReduce(c_pp, channels, norm, affine, relu=False)
        else:
            self.pre0 = conv_op(c_pp, channels, 1, 1, norm, affine, relu=False)
        self.pre1 = conv_op(c_p, channels, 1, 1, norm, affine, relu=False)

    def _stride(self, input_index: int) -> int:
        # Only edges leaving the block inputs reduce; branch outputs are already reduced.
        return 2 if self.reduction and input_index < 2 else 1

    def relation_ops(self) -> List[RegionNonLocal]:
        """The block's region_nonlocal ops, in forward order."""
        return [m for m in self.modules() if isinstance(m, RegionNonLocal)]


class SearchBlock(_BlockBase):
    """Searchable ALB / ALB_r: a :class:`MixedOp` on each of the 14 (for B = 4) edges.

    The alphas are not owned here: blocks of one type share them, so the head passes
    ``weights`` = softmax(alpha) of shape ``(num_edges, num_ops)`` to ``forward``.
    """

    def __init__(
        self,
        ops: Sequence[str],
        c_pp: int,
        c_p: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        branches: int = 4,
        norm: str = "GN",
        affine: bool = False,
    ):
        super().__init__(c_pp, c_p, channels, reduction, reduction_prev, branches, norm, affine)
        self.edges = edge_inputs(branches)
        self.mixed_ops = nn.ModuleList(
            MixedOp(ops, channels, channels, self._stride(j), norm, affine) for _, j in self.edges
        )

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        weights: torch.Tensor,
        num_per_image: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        if weights.shape[0] != len(self.mixed_ops):
            raise ValueError(
                f"SearchBlock has {len(self.mixed_ops)} edges but got {weights.shape[0]} rows"
            )
        states = [self.pre0(s0), self.pre1(s1)]
        e = 0
        for b in range(self.branches):
            out = 0
            for j in range(2 + b):
                out = out + self.mixed_ops[e](states[j], weights[e], num_per_image)
                e += 1
            states.append(out)
        return torch.cat(states[2:], dim=1)


class GenotypeBlock(_BlockBase):
    """Fixed ALB / ALB_r: branch b = op(pair 2b) + op(pair 2b+1) from a genotype's pairs."""

    def __init__(
        self,
        pairs: Sequence[Sequence],
        c_pp: int,
        c_p: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        branches: int = 4,
        norm: str = "GN",
        affine: bool = True,
    ):
        super().__init__(c_pp, c_p, channels, reduction, reduction_prev, branches, norm, affine)
        if len(pairs) != 2 * branches:
            raise ValueError(f"GenotypeBlock: {branches} branches need {2 * branches} pairs")
        self.inputs = [int(j) for _, j in pairs]
        self.op_names = [str(o) for o, _ in pairs]
        self.ops = nn.ModuleList(
            build_op(o, channels, channels, self._stride(j), norm, affine) for o, j in pairs
        )

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        num_per_image: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for b in range(self.branches):
            k = 2 * b
            y = self.ops[k](states[self.inputs[k]], num_per_image)
            y = y + self.ops[k + 1](states[self.inputs[k + 1]], num_per_image)
            states.append(y)
        return torch.cat(states[2:], dim=1)
