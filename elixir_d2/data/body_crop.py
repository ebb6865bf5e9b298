"""Body crop at inference: the part of a CT slice that holds the patient.

A slice is mostly air around the body (and the table under it); the backbone's cost grows with
the pixels it sees, so at inference the mapper crops each slice to the box of its body plus a
margin. The mapped input keeps the whole slice's ``height`` and ``width`` (the frame detectron2
returns predictions in) and names the box ``body_crop``; the model's postprocess
(:class:`elixir_d2.modeling.meta_arch.BodyCropRCNN`) undoes the crop, so predictions come back
in slice pixels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

__all__ = ["body_box"]

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
    return (
        int(max(0, x0 - margin_px)),
        int(max(0, y0 - margin_px)),
        int(min(w, x1 + margin_px)),
        int(min(h, y1 + margin_px)),
    )
