"""Named captures of what a model computes on the way to its detections, for drawing and
analysis: ``with capture(model, what) as records:`` registers forward hooks
(:func:`~elixir_d2.modeling.hooks.capture_outputs`) on the modules that compute ``what``, found
by type, and removes them on exit. Each forward of the model within the block appends one record
to ``records``; the caller pops what it has read. Tensors are detached (a record outliving the
forward must not hold its autograd graph).

- ``"trpn_confidence"``: a :class:`TRPNConfidence` per forward of the model's TRPN.
- ``"relations"``: per forward of the box head, the list of per-image relation graphs E
  (N_i x N_i) that the head relates its RoIs with (its :meth:`RelationBoxHead.relation_op`).
- ``"proposals"``: per forward of the model (the meta-architecture, called with its batched
  inputs), its proposal generator's list of proposal Instances per image, in the frame of the
  model's detections: whole-slice pixels, body crop undone
  (:func:`~elixir_d2.modeling.meta_arch.to_slice_frame`, scaled and shifted, not clipped). In
  inference the ROI heads box exactly these, in this order.

Asking for something the model lacks raises ValueError at entry, before any forward runs.
"""

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Tuple, Type, TypeVar

import torch
from torch import nn

from detectron2.modeling.proposal_generator.rpn import RPN

from .box_head import RelationBoxHead
from .hooks import capture_outputs
from .meta_arch import to_slice_frame
from .trpn import TRPN, Truncation

__all__ = ["CAPTURES", "TRPNConfidence", "capture", "check_capture"]

CAPTURES = ("trpn_confidence", "relations", "proposals")

M = TypeVar("M", bound=nn.Module)


@dataclass
class TRPNConfidence:
    """TRPN's location confidence of one forward, per level name (``in_features``), for the N
    images of the batch (padded size H x W; ``valid_masks`` tells the image's own locations)."""

    conf_maps: Dict[str, torch.Tensor]  # (N, H, W) p in [0, 1]
    eps: Dict[str, torch.Tensor]  # (N,) the threshold of each image
    keep_masks: Dict[str, torch.Tensor]  # (N, H, W) bool: p > eps, proposals come from these
    valid_masks: Dict[str, torch.Tensor]  # (N, H, W) bool: inside the image, not padding
    strides: Dict[str, int]  # anchor stride of each level


def _only(model: nn.Module, kind: Type[M], missing: str) -> M:
    found = [m for m in model.modules() if isinstance(m, kind)]
    if not found:
        raise ValueError(missing)
    if len(found) > 1:
        raise ValueError(f"the model has {len(found)} {kind.__name__} modules; expected one")
    return found[0]


def _trpn_record(trpn: TRPN) -> Callable[[nn.Module, tuple, Truncation], TRPNConfidence]:
    names = list(trpn.in_features)

    def keep(_module: nn.Module, inputs: tuple, output: Truncation) -> TRPNConfidence:
        conf = inputs[0]  # LocationTruncation.forward(conf, image_sizes)
        return TRPNConfidence(
            conf_maps={f: p[:, 0].detach() for f, p in zip(names, conf)},
            eps=dict(zip(names, (e.detach() for e in output.eps))),
            keep_masks=dict(zip(names, output.keep)),
            valid_masks=dict(zip(names, output.valid)),
            strides=dict(zip(names, trpn.truncation.strides)),
        )

    return keep


def _relations(_module: nn.Module, inputs: tuple, output: List[torch.Tensor]):
    return [e.detach() for e in output]


def _proposals(_module: nn.Module, inputs: tuple, output: Any):
    return output[0]  # (proposals, losses): proposals hold no graph (computed under no_grad)


def _target(model: nn.Module, what: str) -> Tuple[nn.Module, Callable]:
    """The module to hook for ``what`` and what its hook keeps."""
    if what == "trpn_confidence":
        trpn = _only(
            model,
            TRPN,
            "the model has no TRPN proposal generator (MODEL.PROPOSAL_GENERATOR.NAME 'TRPN')",
        )
        return trpn.truncation, _trpn_record(trpn)
    if what == "relations":
        head = _only(
            model,
            RelationBoxHead,
            "the model has no box head with region_nonlocal relations (ALBHead)",
        )
        op = head.relation_op()
        if op is None:
            raise ValueError(
                f"the box head {type(head).__name__} has no region_nonlocal edge "
                "(its genotype relates no RoIs)"
            )
        return op.graph, _relations
    if what == "proposals":
        return _only(model, RPN, "the model has no RPN / TRPN proposal generator"), _proposals
    raise ValueError(f"capture: unknown {what!r}; expected one of {CAPTURES}")


def check_capture(model: nn.Module, what: str) -> None:
    """Raise the ValueError :func:`capture` would raise for ``model`` and ``what``, if any."""
    _target(model, what)


@contextlib.contextmanager
def _in_slice_pixels(model: nn.Module, raw: List[Any]) -> Iterator[List[Any]]:
    """Each forward of ``model`` turns the proposals its proposal generator appended to ``raw``
    into one record in whole-slice pixels, with the batched inputs they came from."""
    records: List[Any] = []

    def hook(_module: nn.Module, args: tuple, kwargs: Dict[str, Any], _output: Any) -> None:
        if not raw:  # no proposals made (proposals given with the inputs)
            return
        if len(raw) > 1:
            raise RuntimeError(
                f"capture 'proposals': {len(raw)} proposal generator calls in one "
                "forward of the model; expected one"
            )
        inputs = args[0] if args else kwargs["batched_inputs"]
        records.append([to_slice_frame(p, inp, clip=False) for p, inp in zip(raw.pop(), inputs)])

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()


@contextlib.contextmanager
def capture(model: nn.Module, what: str) -> Iterator[List[Any]]:
    """Within the block, each forward appends one record of ``what`` (see the module
    docstring) to the yielded list. Raises ValueError when the model has nothing to capture."""
    module, keep = _target(model, what)
    with contextlib.ExitStack() as stack:
        records = stack.enter_context(capture_outputs(module, keep))
        if what == "proposals":
            records = stack.enter_context(_in_slice_pixels(model, records))
        yield records
