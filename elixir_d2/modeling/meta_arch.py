"""BodyCropRCNN: detectron2's GeneralizedRCNN whose outputs are in whole-slice pixels.

At inference the mapper may crop a slice to its body (``INPUT.BODY_CROP``,
:mod:`elixir_d2.data.body_crop`): the input's ``image`` is then the region ``body_crop`` =
(x0, y0, x1, y1) of the ``height`` x ``width`` slice, resized. The model undoes that once, in its
postprocess: boxes are scaled from the network input to the region, clipped to it, and shifted by
its corner, so every output is in the pixels of the whole slice (``image_size`` = (height, width))
and callers never learn that a crop existed. An input without ``body_crop`` is postprocessed
exactly as by GeneralizedRCNN. The subclass adds no module: checkpoints load in either class.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

__all__ = ["BodyCropRCNN", "to_slice_frame"]


def _input_region(inp: Mapping, image_size: Sequence[int]) -> Tuple[int, int, int, int]:
    """The region (x0, y0, x1, y1) of the output frame that the network input shows: the body
    crop, or the whole ``height`` x ``width`` frame (``image_size`` when the input names none,
    as in GeneralizedRCNN)."""
    crop = inp.get("body_crop")
    if crop is None:
        return 0, 0, inp.get("width", image_size[1]), inp.get("height", image_size[0])
    if "height" not in inp or "width" not in inp:
        raise ValueError(
            "an input with 'body_crop' must name the whole slice's 'height' and "
            f"'width', got keys {sorted(inp)}"
        )
    x0, y0, x1, y1 = (int(v) for v in crop)
    if not (0 <= x0 < x1 <= inp["width"] and 0 <= y0 < y1 <= inp["height"]):
        raise ValueError(
            f"body_crop {tuple(crop)} is not a box inside the "
            f"{inp['width']} x {inp['height']} slice"
        )
    return x0, y0, x1, y1


def _box_field(instances: Instances) -> str:
    return "pred_boxes" if instances.has("pred_boxes") else "proposal_boxes"


def to_slice_frame(instances: Instances, inp: Mapping, *, clip: bool = True) -> Instances:
    """``instances`` of one image, in network-input pixels (their ``image_size``), in the pixels
    of the whole slice of model input ``inp``; image_size becomes (height, width).

    ``clip``: detections go through detectron2's ``detector_postprocess`` into the region
    (scaled, clipped to it, empty boxes dropped), as GeneralizedRCNN does; proposals
    (``clip=False``) are only scaled, on a copy, so they keep their number and order (the ROI
    heads' relations index them).
    """
    x0, y0, x1, y1 = _input_region(inp, instances.image_size)
    if clip:
        out = detector_postprocess(instances, y1 - y0, x1 - x0)
    else:
        h_in, w_in = instances.image_size
        out = Instances((y1 - y0, x1 - x0), **instances.get_fields())
        name = _box_field(out)
        boxes = out.get(name).tensor
        out.set(name, Boxes(boxes * boxes.new_tensor([(x1 - x0) / w_in, (y1 - y0) / h_in] * 2)))
    if inp.get("body_crop") is None:
        return out
    if out.has("pred_masks") or out.has("pred_keypoints"):
        raise NotImplementedError("the body crop is undone for boxes only")
    name = _box_field(out)
    boxes = out.get(name).tensor
    out.set(name, Boxes(boxes + boxes.new_tensor([x0, y0, x0, y0])))
    return Instances((inp["height"], inp["width"]), **out.get_fields())


@META_ARCH_REGISTRY.register()
class BodyCropRCNN(GeneralizedRCNN):
    """GeneralizedRCNN with inference outputs in whole-slice pixels, the input's ``body_crop``
    undone (module docstring). Training is GeneralizedRCNN's: training inputs are never
    body-cropped."""

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        # GeneralizedRCNN.inference calls GeneralizedRCNN._postprocess by name, not through self.
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        if not do_postprocess:
            return results
        return self._postprocess(results, batched_inputs, [r.image_size for r in results])

    @staticmethod
    def _postprocess(instances, batched_inputs: List[Dict[str, torch.Tensor]], image_sizes):
        """Each image's detections in the pixels of its whole slice (:func:`to_slice_frame`).
        ``image_sizes`` (GeneralizedRCNN's signature) are the detections' own image_size."""
        return [{"instances": to_slice_frame(r, inp)} for r, inp in zip(instances, batched_inputs)]
