"""Body crop at inference: the part of a CT slice that holds the patient.

A slice is mostly air around the body (and the table under it); the backbone's cost grows with
the pixels it sees, so at inference the mapper crops each slice to the box of its body plus a
margin, and predictions are shifted back to slice pixels with :func:`to_slice_pixels`.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import cv2
import numpy as np

__all__ = ["body_box", "crop_frame", "to_slice_pixels"]

# Components smaller than this share of the largest one are specks (noise, streaks, wires), not
# body; arms and the table are far larger and are kept, which only widens the box.
MIN_COMPONENT_FRACTION = 0.01


def body_box(
    hu: np.ndarray, threshold: float, margin_px: int
) -> Optional[Tuple[int, int, int, int]]:
    """Box ``(x0, y0, x1, y1)`` (end-exclusive pixel bounds) around the body of a slice.

    The body is every connected region (8-connectivity) of pixels above ``threshold`` HU whose
    area is at least :data:`MIN_COMPONENT_FRACTION` of the largest region's; the box around them
    is grown by ``margin_px`` on each side and clipped to the slice. None when no pixel is above
    the threshold (an empty slice is then seen whole).
    """
    if hu.ndim != 2:
        raise ValueError(f"body_box expects one 2-D slice, got shape {hu.shape}")
    if margin_px < 0:
        raise ValueError(f"body crop margin must be >= 0 pixels, got {margin_px}")
    mask = (hu > threshold).astype(np.uint8)
    num, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if num <= 1:  # label 0 is the background
        return None
    stats = stats[1:]
    areas = stats[:, cv2.CC_STAT_AREA]
    body = stats[areas >= MIN_COMPONENT_FRACTION * areas.max()]
    x0 = body[:, cv2.CC_STAT_LEFT].min()
    y0 = body[:, cv2.CC_STAT_TOP].min()
    x1 = (body[:, cv2.CC_STAT_LEFT] + body[:, cv2.CC_STAT_WIDTH]).max()
    y1 = (body[:, cv2.CC_STAT_TOP] + body[:, cv2.CC_STAT_HEIGHT]).max()
    h, w = hu.shape
    return (int(max(0, x0 - margin_px)), int(max(0, y0 - margin_px)),
            int(min(w, x1 + margin_px)), int(min(h, y1 + margin_px)))


def crop_frame(box: Tuple[int, int, int, int]) -> Dict:
    """The model-input keys of a slice cropped to ``box``: detectron2 puts predictions in the
    ``height`` x ``width`` frame, which becomes the crop's, and ``body_crop`` keeps the box for
    :func:`to_slice_pixels`."""
    x0, y0, x1, y1 = box
    return {"height": y1 - y0, "width": x1 - x0, "body_crop": box}


def to_slice_pixels(boxes: np.ndarray, record: Mapping) -> np.ndarray:
    """XYXY ``boxes`` in the mapped record's ``height`` x ``width`` frame (where detectron2's
    postprocessing puts predictions) -> pixels of the whole slice: shifted by the record's
    ``body_crop`` offset when the mapper cropped it, unchanged otherwise."""
    boxes = np.asarray(boxes)
    crop = record.get("body_crop")
    if crop is None:
        return boxes
    if boxes.dtype.kind != "f":
        boxes = boxes.astype(np.float64)
    x0, y0 = crop[0], crop[1]
    return boxes + np.asarray([x0, y0, x0, y0], dtype=boxes.dtype)
