"""Batched slice-by-slice inference on a :class:`CTVolume`, with the training input pipeline.

Every slice gets the model input :class:`~elixir_d2.data.CTDatasetMapper` would give it in
evaluation: the same slice offsets (``INPUT.NUM_SLICES`` x ``INPUT.SLICE_INTV_MM``), the same
:class:`~elixir_d2.data.ct_mapper.SliceStack` interpolation between the two nearest slices and
fallback toward the key slice at the ends of the series (here over the in-memory volume), the
same HU window, spacing normalisation and size cap. Only the random flip of training is absent,
as in the mapper's evaluation mode.

Optional captures, for drawing:

* ``capture_relations``: the proposals the box head saw (a forward hook on the proposal
  generator: in inference ROIHeads boxes exactly those proposals, in that order) and the relation
  graphs E the box head returns (N x N per image; ALBHead with a region_nonlocal edge), through a
  forward hook on the head;
* ``capture_confidence``: TRPN's ``last_conf_maps`` / ``last_eps`` per level, cropped to the
  locations inside the image (ImageList padding removed).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from ..data.body_crop import crop_frame, to_slice_pixels
from ..data.ct_mapper import CTDatasetMapper, CVResizeTransform, SliceStack, window_to_uint8_range
from ..data.deeplesion import LESION_TYPES
from ..modeling.box_head import RelationBoxHead
from .volume_io import CTVolume, check_context

logger = logging.getLogger(__name__)

__all__ = ["ArraySliceStack", "SlicePrediction", "VolumePrediction", "CTPredictor",
           "build_predictor_model"]


class ArraySliceStack(SliceStack):
    """Training's :class:`SliceStack` (interpolation, fallback toward the key slice) reading
    slices from an in-memory :class:`CTVolume` instead of PNG files."""

    def __init__(self, volume: CTVolume, key: int):
        first, last = volume.series_range or (min(volume.slice_numbers), max(volume.slice_numbers))
        super().__init__(volume.source, key, (first, last))
        self._volume = volume

    def _read(self, idx: int) -> Optional[np.ndarray]:
        row = self._volume.rows.get(idx)
        return None if row is None else self._volume.hu[row]


class Prepared(NamedTuple):
    """One slice's model input and where it came from."""

    image: torch.Tensor  # 3 x h x w
    size: Tuple[int, int]  # (h, w)
    fallbacks: int  # neighbour slices that fell back toward the key slice
    body_crop: Optional[Tuple[int, int, int, int]]  # (x0, y0, x1, y1) slice pixels, or None


@dataclass
class SlicePrediction:
    """Detections of one slice, in the slice's native pixels (XYXY, continuous)."""

    slice_number: int
    boxes: np.ndarray  # (K, 4)
    scores: np.ndarray  # (K,)
    classes: np.ndarray  # (K,) int
    type_names: Optional[List[str]]  # lesion type per detection when the model has several
    input_size: Tuple[int, int]  # (h, w) the model saw
    fallbacks: int = 0  # neighbour slices that fell back toward the key slice
    proposals: Optional[np.ndarray] = None  # (P, 4) native pixels, with capture_relations
    proposal_scores: Optional[np.ndarray] = None  # (P,) objectness logits
    relations: Optional[np.ndarray] = None  # (P, P) E
    conf_maps: Optional[Dict[str, np.ndarray]] = None  # level -> (h_l, w_l) p in [0, 1]
    conf_eps: Optional[Dict[str, float]] = None  # level -> eps


@dataclass
class VolumePrediction:
    volume: CTVolume
    slices: List[SlicePrediction] = field(default_factory=list)
    forward_s: float = 0.0  # time inside model(...) calls
    prepare_s: float = 0.0  # building the model inputs


def build_predictor_model(cfg) -> torch.nn.Module:
    """build_model + AtomicCheckpointer.load(cfg.MODEL.WEIGHTS) + eval() (weights_only loads,
    a mismatch summary, an error for a checkpoint of another model)."""
    from ..checkpoint import AtomicCheckpointer

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: predicting with a randomly initialised model")
    return model.eval()


def _class_names(cfg) -> Optional[List[str]]:
    """Lesion type names for pred_classes when the model has more than one class."""
    n = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if n <= 1:
        return None
    for name in cfg.DATASETS.TEST:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) == n:
            return list(classes)
    if n == len(LESION_TYPES):
        return list(LESION_TYPES)
    return [f"class_{i}" for i in range(n)]


class CTPredictor:
    """Runs a detectron2 model over the slices of CT volumes in batches.

    Args:
        cfg: the model's config (with ElixirNet keys); the model is built and loaded from
            ``cfg.MODEL.WEIGHTS`` unless ``model`` is given.
        batch_size: slices per forward call.
        capture_relations / capture_confidence: keep what :mod:`elixir_d2.visualization` draws
            (see the module docstring); raise ValueError when the model has none.
    """

    def __init__(self, cfg, model: Optional[torch.nn.Module] = None, *, batch_size: int = 4,
                 capture_relations: bool = False, capture_confidence: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.model = model if model is not None else build_predictor_model(cfg)
        self.model.eval()
        self.mapper = CTDatasetMapper(cfg, is_train=False)
        # TRPN's confidence is drawn over the whole slice, air included, as training saw it.
        self.body_crop = self.mapper.body_crop and not capture_confidence
        if self.mapper.body_crop and capture_confidence:
            logger.info("--draw-confidence: slices are seen whole (INPUT.BODY_CROP left out)")
        self.batch_size = batch_size
        self.class_names = _class_names(cfg)
        self.capture_relations = capture_relations
        self.capture_confidence = capture_confidence
        self._proposals: Optional[list] = None
        self._relations: List[torch.Tensor] = []
        self._hooks: list = []
        if capture_relations:
            head = getattr(getattr(self.model, "roi_heads", None), "box_head", None)
            if not isinstance(head, RelationBoxHead):
                raise ValueError(
                    f"--draw-relations needs a box head with region_nonlocal relations (ALBHead); "
                    f"MODEL.ROI_BOX_HEAD.NAME is {cfg.MODEL.ROI_BOX_HEAD.NAME!r}"
                )
            self._hooks = [
                self.model.proposal_generator.register_forward_hook(self._keep_proposals),
                head.register_forward_hook(self._keep_relations),
            ]
        if capture_confidence and not hasattr(getattr(self.model, "proposal_generator", None),
                                              "last_conf_maps"):
            raise ValueError(
                "--draw-confidence needs the TRPN proposal generator; "
                f"MODEL.PROPOSAL_GENERATOR.NAME is {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r}"
            )

    def _keep_proposals(self, module, inputs, output) -> None:
        self._proposals = output[0]

    def _keep_relations(self, module, inputs, output) -> None:
        self._relations = output[1]

    def close(self) -> None:
        """Remove the capture hooks from the model (it may be reused by another predictor)."""
        # getattr: __del__ also runs on an instance whose __init__ failed before setting _hooks.
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self._hooks = []

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ inputs
    def prepare(self, volume: CTVolume, number: int) -> Prepared:
        """Model input of slice ``number``: the steps of CTDatasetMapper.__call__ in
        evaluation mode, body crop (INPUT.BODY_CROP) included."""
        stack = ArraySliceStack(volume, number)
        hu = np.stack([stack.at_offset(o / volume.slice_interval) for o in self.mapper.offsets_mm],
                      axis=-1)
        new_h, new_w = self.mapper.output_size(hu.shape[0], hu.shape[1], volume.spacing[0])
        crop = None
        if self.body_crop:
            hu, new_h, new_w, crop = self.mapper.crop_to_body(hu, volume.spacing[0], new_h, new_w)
        h, w = hu.shape[:2]
        image = window_to_uint8_range(hu, self.mapper.hu_window)
        image = CVResizeTransform(h, w, new_h, new_w).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return Prepared(tensor, (new_h, new_w), stack.fallbacks, crop)

    # ------------------------------------------------------------------ inference
    def predict_volume(
            self, volume: CTVolume, progress=None,
            on_slice: Optional[Callable[[SlicePrediction], None]] = None) -> VolumePrediction:
        """Predict every slice of ``volume`` (or its key slices). ``progress``: an object with
        ``update(n)`` (e.g. tqdm), advanced after each batch. ``on_slice``: called with each
        slice's prediction as soon as its batch is done (to draw it and release its captures)."""
        check_context(volume, self.mapper.offsets_mm)
        sx, sy = volume.spacing
        if abs(sx - sy) > 0.01 * max(sx, sy):
            volume.warnings.append(
                f"{volume.source}: non-square pixels ({sx:g} x {sy:g} mm); resampled by the x "
                "spacing as in training"
            )
        result = VolumePrediction(volume)
        numbers = volume.slices_to_predict()
        for start in range(0, len(numbers), self.batch_size):
            chunk = numbers[start : start + self.batch_size]
            t0 = time.perf_counter()
            prepared = [self.prepare(volume, n) for n in chunk]
            inputs = [self._model_input(volume, p) for p in prepared]
            t1 = time.perf_counter()
            with torch.no_grad():
                outputs = self.model(inputs)
                if str(self.cfg.MODEL.DEVICE).startswith("cuda"):
                    torch.cuda.synchronize()
            t2 = time.perf_counter()
            result.prepare_s += t1 - t0
            result.forward_s += t2 - t1
            for i, (n, p, inp, out) in enumerate(zip(chunk, prepared, inputs, outputs)):
                result.slices.append(self._slice_result(volume, n, p, inp, out["instances"], i))
                if on_slice is not None:
                    on_slice(result.slices[-1])
            if progress is not None:
                progress.update(len(chunk))
        return result

    @staticmethod
    def _model_input(volume: CTVolume, p: Prepared) -> Dict:
        """The model's input dict: outputs come in the crop's frame when the slice was cropped
        (the mapper's convention, undone by to_slice_pixels)."""
        if p.body_crop is None:
            return {"image": p.image, "height": volume.height, "width": volume.width}
        return {"image": p.image, **crop_frame(p.body_crop)}

    def _slice_result(self, volume: CTVolume, number: int, p: Prepared, inp: Dict, inst,
                      i: int) -> SlicePrediction:
        size = p.size
        inst = inst.to("cpu")
        classes = inst.pred_classes.numpy().astype(np.int64)
        type_names = None
        if inst.has("pred_types"):  # RTM: a type index per detection
            types = inst.pred_types.numpy().astype(np.int64)
            type_names = [LESION_TYPES[t] if 0 <= t < len(LESION_TYPES) else f"type_{t}"
                          for t in types]
        elif self.class_names is not None:
            type_names = [self.class_names[c] for c in classes]
        pred = SlicePrediction(
            slice_number=number,
            boxes=to_slice_pixels(inst.pred_boxes.tensor.numpy().astype(np.float64), inp),
            scores=inst.scores.numpy().astype(np.float64), classes=classes, type_names=type_names,
            input_size=size, fallbacks=p.fallbacks,
        )
        scale = np.array([inp["width"] / size[1], inp["height"] / size[0]] * 2)
        if self.capture_relations:
            props = self._proposals[i].to("cpu")
            relations = self._relations
            if len(relations) <= i:
                raise ValueError(
                    "--draw-relations: the box head kept no relation matrix (its genotype has no "
                    "region_nonlocal edge)"
                )
            e = relations[i].detach().cpu().numpy()
            if e.shape != (len(props), len(props)):
                raise ValueError(f"relation matrix {e.shape} does not match {len(props)} proposals")
            pred.proposals = to_slice_pixels(props.proposal_boxes.tensor.numpy() * scale, inp)
            pred.proposal_scores = props.objectness_logits.numpy()
            pred.relations = e
        if self.capture_confidence:
            pg = self.model.proposal_generator
            pred.conf_maps, pred.conf_eps = {}, {}
            for level, stride in zip(pg.in_features, pg.anchor_generator.strides):
                rows, cols = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
                pred.conf_maps[level] = pg.last_conf_maps[level][i, :rows, :cols].cpu().numpy()
                pred.conf_eps[level] = float(pg.last_eps[level][i])
        return pred
