"""Batched slice-by-slice inference on a :class:`CTVolume`, with the training input pipeline.

Every slice gets the model input :class:`~elixir_d2.data.CTDatasetMapper` would give it in
evaluation: the same slice offsets (``INPUT.NUM_SLICES`` x ``INPUT.SLICE_INTV_MM``), the same
:class:`~elixir_d2.data.ct_mapper.SliceStack` interpolation between the two nearest slices and
fallback toward the key slice at the ends of the series (here over the in-memory volume), the
same HU window, spacing normalisation and size cap. Only the random flip of training is absent,
as in the mapper's evaluation mode.

Optional captures, for drawing, through :func:`elixir_d2.modeling.capture.capture` around each
batch's forward (no hook stays on the model between batches):

* ``capture_relations``: the proposals the box head saw (in inference ROIHeads boxes exactly
  those proposals, in that order) and the relation graphs E the box head relates them with
  (N x N per image; ALBHead with a region_nonlocal edge);
* ``capture_confidence``: TRPN's confidence maps p and thresholds eps per level, cropped to the
  locations inside the image (ImageList padding removed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from ..data.ct_mapper import CTDatasetMapper, CVResizeTransform, SliceStack, window_to_uint8_range
from ..data.deeplesion import LESION_TYPES
from ..modeling.capture import TRPNConfidence, capture, check_capture
from .volume_io import CTVolume, check_context

logger = logging.getLogger(__name__)

__all__ = [
    "ArraySliceStack",
    "SlicePrediction",
    "VolumePrediction",
    "CTPredictor",
    "build_predictor_model",
]


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

    def __init__(
        self,
        cfg,
        model: Optional[torch.nn.Module] = None,
        *,
        batch_size: int = 4,
        capture_relations: bool = False,
        capture_confidence: bool = False,
    ):
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
        self._captures: List[str] = []
        if capture_relations:
            self._captures += ["proposals", "relations"]
        if capture_confidence:
            self._captures.append("trpn_confidence")
        options = {
            "proposals": "--draw-relations",
            "relations": "--draw-relations",
            "trpn_confidence": "--draw-confidence",
        }
        for what in self._captures:
            try:  # before any slice is read: the model cannot give what was asked
                check_capture(self.model, what)
            except ValueError as e:
                raise ValueError(f"{options[what]}: {e}") from None

    # ------------------------------------------------------------------ inputs
    def prepare(self, volume: CTVolume, number: int) -> Prepared:
        """Model input of slice ``number``: the steps of CTDatasetMapper.__call__ in
        evaluation mode, body crop (INPUT.BODY_CROP) included."""
        stack = ArraySliceStack(volume, number)
        hu = np.stack(
            [stack.at_offset(o / volume.slice_interval) for o in self.mapper.offsets_mm], axis=-1
        )
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
        self,
        volume: CTVolume,
        progress=None,
        on_slice: Optional[Callable[[SlicePrediction], None]] = None,
    ) -> VolumePrediction:
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
            with torch.no_grad(), contextlib.ExitStack() as stack:
                records = {w: stack.enter_context(capture(self.model, w)) for w in self._captures}
                outputs = self.model(inputs)
                if str(self.cfg.MODEL.DEVICE).startswith("cuda"):
                    torch.cuda.synchronize()
            t2 = time.perf_counter()
            result.prepare_s += t1 - t0
            result.forward_s += t2 - t1
            captured = {w: r[0] for w, r in records.items()}  # one forward: one record each
            for i, (n, p, out) in enumerate(zip(chunk, prepared, outputs)):
                result.slices.append(self._slice_result(n, p, out["instances"], i, captured))
                if on_slice is not None:
                    on_slice(result.slices[-1])
            if progress is not None:
                progress.update(len(chunk))
        return result

    @staticmethod
    def _model_input(volume: CTVolume, p: Prepared) -> Dict:
        """The model's input dict, as the mapper builds it: outputs come in the slice's pixels
        (BodyCropRCNN undoes the body crop it names)."""
        inp = {"image": p.image, "height": volume.height, "width": volume.width}
        if p.body_crop is not None:
            inp["body_crop"] = p.body_crop
        return inp

    def _slice_result(
        self, number: int, p: Prepared, inst, i: int, captured: Dict
    ) -> SlicePrediction:
        """Image ``i`` of the batch; ``captured``: this batch's record of each capture."""
        size = p.size
        inst = inst.to("cpu")
        classes = inst.pred_classes.numpy().astype(np.int64)
        type_names = None
        if inst.has("pred_types"):  # RTM: a type index per detection
            types = inst.pred_types.numpy().astype(np.int64)
            type_names = [
                LESION_TYPES[t] if 0 <= t < len(LESION_TYPES) else f"type_{t}" for t in types
            ]
        elif self.class_names is not None:
            type_names = [self.class_names[c] for c in classes]
        pred = SlicePrediction(
            slice_number=number,
            boxes=inst.pred_boxes.tensor.numpy().astype(np.float64),
            scores=inst.scores.numpy().astype(np.float64),
            classes=classes,
            type_names=type_names,
            input_size=size,
            fallbacks=p.fallbacks,
        )
        if self.capture_relations:
            props = captured["proposals"][i].to("cpu")  # slice pixels, like the detections
            e = captured["relations"][i].cpu().numpy()
            if e.shape != (len(props), len(props)):
                raise ValueError(f"relation matrix {e.shape} does not match {len(props)} proposals")
            pred.proposals = props.proposal_boxes.tensor.numpy().astype(np.float64)
            pred.proposal_scores = props.objectness_logits.numpy()
            pred.relations = e
        if self.capture_confidence:
            conf: TRPNConfidence = captured["trpn_confidence"]
            pred.conf_maps, pred.conf_eps = {}, {}
            for level, stride in conf.strides.items():
                rows, cols = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
                pred.conf_maps[level] = conf.conf_maps[level][i, :rows, :cols].cpu().numpy()
                pred.conf_eps[level] = float(conf.eps[level][i])
        return pred
