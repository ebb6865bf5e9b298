"""CTDatasetMapper: a key slice and its neighbours -> windowed, spacing-normalised model input."""

from __future__ import annotations

import copy
import logging
import math
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .body_crop import body_box

logger = logging.getLogger(__name__)

HU_OFFSET = 32768  # DeepLesion PNGs store HU + 32768 as uint16
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A CT slice is 512-1024 px a side; anything past this is refused before decoding.
MAX_SLICE_SIDE = 8192
# PNG (color type, bit depth) -> the mode PIL names it by, for error messages users recognise.
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}


class CTSliceError(ValueError):
    """A slice file that cannot be used (unreadable, corrupt, not 16-bit, wrong size)."""


def _png_header(path: str, head: bytes) -> Tuple[int, int, int, int]:
    """(width, height, bit depth, color type) from a PNG's signature and IHDR chunk."""
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise CTSliceError(
            f"cannot read CT slice {path}: not a PNG file (DeepLesion-format slices are 16-bit PNG)"
        )
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return width, height, head[24], head[25]


def png_size(path: str) -> Tuple[int, int]:
    """(height, width) of a PNG slice from its IHDR chunk, without decoding it."""
    with PathManager.open(path, "rb") as f:
        width, height, _, _ = _png_header(path, f.read(26))
    return height, width


def hu_to_png16(hu: np.ndarray) -> np.ndarray:
    """HU -> DeepLesion PNG values: round(HU) + 32768 as uint16, what read_hu_slice reads back.

    HU outside what uint16 holds, [-32768, 32767], is clipped to that range (no CT value lies
    there); NaN or infinite HU raises ValueError.
    """
    hu = np.asarray(hu)
    # At least float32: exact for every integer HU, where float16 could not hold HU + 32768.
    hu = hu.astype(np.result_type(hu.dtype, np.float32), copy=False)
    if not np.isfinite(hu).all():
        raise ValueError("HU values to write as a 16-bit PNG hold NaN or infinity")
    return (np.clip(np.rint(hu), -HU_OFFSET, HU_OFFSET - 1) + HU_OFFSET).astype(np.uint16)


def read_hu_slice(path: str) -> np.ndarray:
    """Read a 16-bit grayscale DeepLesion-format PNG as float32 HU; errors name the file.

    Only PNG is accepted (signature checked), and its IHDR is checked (16-bit grayscale, at most
    MAX_SLICE_SIDE a side) before the pixels are decoded with OpenCV.
    """
    with PathManager.open(path, "rb") as f:  # FileNotFoundError passes through: callers fall back
        data = f.read()
    width, height, depth, color = _png_header(path, data[:26])
    if color != 0 or depth != 16:
        mode = "1" if (color, depth) == (0, 1) else _PNG_MODES.get(color, f"color type {color}")
        raise CTSliceError(
            f"{path}: expected a 16-bit grayscale PNG (HU + {HU_OFFSET}), got mode "
            f"{mode!r} ({depth}-bit)"
        )
    if not (0 < width <= MAX_SLICE_SIDE and 0 < height <= MAX_SLICE_SIDE):
        raise CTSliceError(
            f"cannot read CT slice {path}: {width} x {height} pixels (at most "
            f"{MAX_SLICE_SIDE} a side)"
        )
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16 or img.shape != (height, width):
        raise CTSliceError(f"cannot read CT slice {path}: corrupt or truncated PNG data")
    return img.astype(np.float32) - HU_OFFSET


def slice_offsets_mm(num_slices: int, interval_mm: float) -> List[float]:
    """Offsets of the stacked slices from the key slice: 3 -> (-d, 0, d); 9 -> (-4d, ..., 4d)."""
    if num_slices < 1 or num_slices % 2 == 0:
        raise ValueError(f"INPUT.NUM_SLICES must be odd and positive, got {num_slices}")
    half = num_slices // 2
    return [k * interval_mm for k in range(-half, half + 1)]


def window_to_uint8_range(hu: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Map HU linearly so window[0] -> 0 and window[1] -> 255, clipping outside (float32)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"HU window must have hi > lo, got {window}")
    out = (np.clip(hu, lo, hi) - lo) * (255.0 / (hi - lo))
    return out.astype(np.float32, copy=False)


class SliceStack:
    """Reads neighbour slices of one series, interpolating and falling back toward the key slice."""

    def __init__(self, slice_dir: str, key: int, slice_range: Tuple[int, int]):
        self.slice_dir = slice_dir
        self.key = key
        self.first, self.last = int(slice_range[0]), int(slice_range[1])
        self.fallbacks = 0
        self._cache: Dict[int, np.ndarray] = {}

    def _read(self, idx: int) -> Optional[np.ndarray]:
        if idx not in self._cache:
            if not self.first <= idx <= self.last and idx != self.key:
                return None
            try:
                self._cache[idx] = read_hu_slice(f"{self.slice_dir}/{idx:03d}.png")
            except FileNotFoundError:
                if idx == self.key:
                    raise FileNotFoundError(
                        f"key slice missing: {self.slice_dir}/{idx:03d}.png"
                    ) from None
                return None
        return self._cache[idx]

    def slice_at(self, idx: int) -> np.ndarray:
        """Slice ``idx``, or the nearest existing slice between it and the key slice (counted)."""
        step = -1 if idx > self.key else 1
        img = self._read(idx)
        if img is None:
            self.fallbacks += 1
            while img is None:
                idx += step
                img = self._read(idx)
        return img

    def at_offset(self, offset_slices: float) -> np.ndarray:
        """Linear interpolation between the two slices around key + offset (in slice units)."""
        pos = self.key + offset_slices
        lo = math.floor(pos + 1e-6)
        w = pos - lo
        if w < 1e-6:
            return self.slice_at(lo)
        return (1.0 - w) * self.slice_at(lo) + w * self.slice_at(lo + 1)


class CVResizeTransform(T.ResizeTransform):
    """detectron2's ResizeTransform with OpenCV's bilinear resize for float images (same
    half-pixel sampling as ``F.interpolate(align_corners=False)``, several times faster)."""

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        if img.dtype != np.float32 or interp not in (None, Image.BILINEAR) or img.ndim != 3:
            return super().apply_image(img, interp)
        assert img.shape[:2] == (self.h, self.w)
        # cv2.resize takes at most 512 channels and drops a trailing channel axis of size 1.
        out = cv2.resize(
            np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR
        )
        return out.reshape(self.new_h, self.new_w, img.shape[2])


def choose_crop(
    height: int,
    width: int,
    crop_size: int,
    boxes: np.ndarray,
    lesion_prob: float,
    rng: np.random.RandomState,
) -> Tuple[int, int, int, int]:
    """A training crop ``(x0, y0, w, h)`` of at most ``crop_size`` px a side.

    With probability ``lesion_prob`` (and at least one box) the crop holds one lesion chosen at
    random, placed uniformly among the positions that keep it whole (centred when it is larger
    than the crop); otherwise the crop is uniform over the image. ``boxes``: (K, 4) XYXY.
    """
    cw, ch = min(crop_size, width), min(crop_size, height)

    def axis_start(lo_edge: float, hi_edge: float, extent: int, size: int) -> int:
        lo = max(0, int(math.ceil(hi_edge)) - extent)
        hi = min(size - extent, int(math.floor(lo_edge)))
        if lo > hi:  # the lesion is larger than the crop: centre it
            centre = 0.5 * (lo_edge + hi_edge)
            return int(np.clip(round(centre - extent / 2), 0, size - extent))
        return int(rng.randint(lo, hi + 1))

    if len(boxes) and rng.rand() < lesion_prob:
        b = boxes[rng.randint(len(boxes))]
        return axis_start(b[0], b[2], cw, width), axis_start(b[1], b[3], ch, height), cw, ch
    return int(rng.randint(0, width - cw + 1)), int(rng.randint(0, height - ch + 1)), cw, ch


def check_body_crop_model(cfg) -> None:
    """Refuse INPUT.BODY_CROP with a meta-architecture that would not undo the crop: a plain
    GeneralizedRCNN would stretch the crop over the whole slice."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from ..cli import UserInputError
    from ..modeling.meta_arch import BodyCropRCNN

    name = cfg.MODEL.META_ARCHITECTURE
    if name in META_ARCH_REGISTRY and issubclass(META_ARCH_REGISTRY.get(name), BodyCropRCNN):
        return
    raise UserInputError(
        f"INPUT.BODY_CROP.ENABLED needs MODEL.META_ARCHITECTURE BodyCropRCNN, which maps "
        f"detections back from the crop to the slice; got {name!r}. Checkpoints of "
        "GeneralizedRCNN load in it unchanged: add MODEL.META_ARCHITECTURE BodyCropRCNN"
    )


class CTDatasetMapper:
    """Map a CT record (see elixir_d2.data.deeplesion) to the model input dict.

    The image has one channel per stacked slice (key - d, key, key + d for 3 slices) by slice
    position: a neighbour d mm away is interpolated linearly between the two nearest real slices;
    a missing slice falls back toward the key slice (counted in ``fallback_slices``). HU are
    windowed to [0, 255], pixel spacing normalised, the longer side capped; boxes follow the image.
    With ``body_crop`` (inference only) the image is the slice's body box, named ``body_crop``;
    ``height`` / ``width`` stay the slice's, where BodyCropRCNN puts the predictions.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        num_slices: int = 3,
        slice_interval_mm: float = 2.0,
        hu_window: Tuple[float, float] = (-1024.0, 3071.0),
        norm_spacing_mm: float = 0.8,
        max_size: int = 512,
        flip_prob: float = 0.5,
        crop_size: int = 0,
        crop_lesion_prob: float = 0.5,
        body_crop: bool = False,
        body_hu_threshold: float = -500.0,
        body_margin_mm: float = 10.0,
    ):
        self.is_train = is_train
        self.offsets_mm = slice_offsets_mm(num_slices, slice_interval_mm)
        self.hu_window = tuple(hu_window)
        self.norm_spacing_mm = norm_spacing_mm
        self.max_size = max_size
        self.flip_prob = flip_prob if is_train else 0.0
        if crop_size < 0 or not 0.0 <= crop_lesion_prob <= 1.0:
            raise ValueError(
                f"INPUT.LESION_CROP.SIZE={crop_size} must be >= 0 and "
                f"INPUT.LESION_CROP.LESION_PROB={crop_lesion_prob} in [0, 1]"
            )
        # Crops are a training device: inference always sees the whole slice.
        self.crop_size = int(crop_size) if is_train else 0
        self.crop_lesion_prob = float(crop_lesion_prob)
        if body_margin_mm < 0:
            raise ValueError(f"INPUT.BODY_CROP.MARGIN_MM={body_margin_mm} must be >= 0")
        # Body crops are an inference device: training crops come from LESION_CROP.
        self.body_crop = bool(body_crop) and not is_train
        self.body_hu_threshold = float(body_hu_threshold)
        self.body_margin_mm = float(body_margin_mm)
        self.fallback_slices = 0
        self.records_seen = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        if cfg.INPUT.BODY_CROP.ENABLED and not is_train:
            check_body_crop_model(cfg)
        return {
            "is_train": is_train,
            "num_slices": cfg.INPUT.NUM_SLICES,
            "slice_interval_mm": cfg.INPUT.SLICE_INTV_MM,
            "hu_window": cfg.INPUT.HU_WINDOW,
            "norm_spacing_mm": cfg.INPUT.NORM_SPACING_MM,
            "max_size": cfg.INPUT.MAX_IMAGE_SIZE,
            "flip_prob": cfg.INPUT.FLIP_PROB,
            "crop_size": cfg.INPUT.LESION_CROP.SIZE,
            "crop_lesion_prob": cfg.INPUT.LESION_CROP.LESION_PROB,
            "body_crop": cfg.INPUT.BODY_CROP.ENABLED,
            "body_hu_threshold": cfg.INPUT.BODY_CROP.HU_THRESHOLD,
            "body_margin_mm": cfg.INPUT.BODY_CROP.MARGIN_MM,
        }

    def output_size(self, height: int, width: int, spacing: float) -> Tuple[int, int]:
        """Size after spacing normalisation and the cap on the longer side."""
        scale = spacing / self.norm_spacing_mm if self.norm_spacing_mm > 0 else 1.0
        scale = min(scale, self.max_size / max(height, width))
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def load_volume(self, record: Dict) -> Tuple[np.ndarray, int]:
        """HU stack (H, W, num_slices) for the record's key slice, and how many slices fell back."""
        if record.get("slice_intv", 0) <= 0:
            raise ValueError(
                f"{record.get('file_name')}: slice interval must be positive, got "
                f"{record.get('slice_intv')}"
            )
        stack = SliceStack(record["slice_dir"], record["slice_idx"], record["slice_range"])
        channels = [stack.at_offset(o / record["slice_intv"]) for o in self.offsets_mm]
        shapes = {c.shape for c in channels}
        if len(shapes) != 1:
            raise CTSliceError(
                f"{record['slice_dir']}: neighbour slices differ in size {sorted(shapes)}"
            )
        if stack.fallbacks:
            self.fallback_slices += stack.fallbacks
            logger.debug(
                f"{record['file_name']}: {stack.fallbacks} neighbour slice(s) fell back "
                "toward the key slice"
            )
        return np.stack(channels, axis=-1), stack.fallbacks

    def __call__(self, dataset_dict: Dict) -> Dict:
        record = copy.deepcopy(dataset_dict)
        self.records_seen += 1
        hu, fallbacks = self.load_volume(record)
        h, w = hu.shape[:2]
        if (h, w) != (record["height"], record["width"]):
            raise CTSliceError(
                f"{record['file_name']}: image is {w}x{h} but the annotation says "
                f"{record['width']}x{record['height']}"
            )
        new_h, new_w = self.output_size(h, w, record["spacing"])
        if self.body_crop:
            hu, new_h, new_w, box = self.crop_to_body(hu, record["spacing"], new_h, new_w)
            if box is not None:
                # height / width stay the slice's: the model maps its outputs back there.
                h, w = hu.shape[:2]
                record["body_crop"] = box
        image = window_to_uint8_range(hu, self.hu_window)
        annos = record.pop("annotations", None)
        transforms = [CVResizeTransform(h, w, new_h, new_w)]
        if self.crop_size > 0:
            transforms.append(self._crop_transform(annos or [], h, w, new_h, new_w))
            new_h, new_w = transforms[-1].h, transforms[-1].w
        if self.flip_prob > 0 and np.random.rand() < self.flip_prob:
            transforms.append(T.HFlipTransform(new_w))
        tfm = T.TransformList(transforms)
        image = tfm.apply_image(image)
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        record["fallback_slices"] = fallbacks
        if self.is_train and annos is not None:
            annos = [utils.transform_instance_annotations(a, tfm, (new_h, new_w)) for a in annos]
            instances = utils.annotations_to_instances(annos, (new_h, new_w))
            record["instances"] = utils.filter_empty_instances(instances)
        return record

    def crop_to_body(
        self, hu: np.ndarray, spacing: float, new_h: int, new_w: int
    ) -> Tuple[np.ndarray, int, int, Optional[Tuple[int, int, int, int]]]:
        """``hu`` (H, W, slices) cropped to the key slice's body (:func:`body_box`), with the
        output size that keeps the whole slice's scale ``new_h / H`` (the one training saw, not
        the crop's own cap), and the crop box in slice pixels; ``hu`` unchanged and None when
        the body fills the slice or no pixel is above the threshold."""
        h, w = hu.shape[:2]
        margin = int(math.ceil(self.body_margin_mm / spacing))
        box = body_box(hu[..., hu.shape[2] // 2], self.body_hu_threshold, margin)
        if box is None or box == (0, 0, w, h):
            return hu, new_h, new_w, None
        x0, y0, x1, y1 = box
        crop_h = max(1, int(round((y1 - y0) * new_h / h)))
        crop_w = max(1, int(round((x1 - x0) * new_w / w)))
        return hu[y0:y1, x0:x1], crop_h, crop_w, box

    def _crop_transform(
        self, annos: List[Dict], h: int, w: int, new_h: int, new_w: int
    ) -> T.CropTransform:
        """Training crop in resized coordinates (see :func:`choose_crop`)."""
        boxes = np.array(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
            dtype=np.float64,
        ).reshape(-1, 4)
        boxes *= np.array([new_w / w, new_h / h, new_w / w, new_h / h])
        x0, y0, cw, ch = choose_crop(
            new_h, new_w, self.crop_size, boxes, self.crop_lesion_prob, np.random
        )
        return T.CropTransform(x0, y0, cw, ch, orig_w=new_w, orig_h=new_h)
