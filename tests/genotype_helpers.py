"""Shared by the ALB and genotype tests (test_alb_head, test_capture, test_checkpoint_trust,
test_genotype_chain): a tiny ALB head and a genotype that differs from another only in its ops,
not in its weights' names or shapes."""

from detectron2.layers import ShapeSpec

from elixir_d2.modeling.alb.genotype import Genotype
from elixir_d2.modeling.box_head import ALBHead


def swap_dilation(g: Genotype) -> Genotype:
    """The same genotype with dil_conv_3x3_r2 <-> r3: identical weight names and shapes."""
    swap = {"dil_conv_3x3_r2": "dil_conv_3x3_r3", "dil_conv_3x3_r3": "dil_conv_3x3_r2"}
    return Genotype(
        normal=tuple((swap.get(o, o), i) for o, i in g.normal),
        reduce=g.reduce,
        space=g.space,
        branches=g.branches,
    )


def tiny_alb_head(genotype: Genotype) -> ALBHead:
    """An ALB head on 16-channel 7x7 RoI features, small enough to build in milliseconds."""
    return ALBHead(
        ShapeSpec(channels=16, height=7, width=7),
        genotype=genotype,
        channels=4,
        stem_channels=16,
        norm="GN",
    )
