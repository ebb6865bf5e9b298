"""The FROC's inputs of one evaluation, per image, as a JSON file (``froc_inputs.json``) that
LesionEvaluator writes beside its metrics, so that intervals (:mod:`.stats`) and comparisons
between runs can be computed later without running the model again."""

from __future__ import annotations

import json
from typing import Dict, List, NamedTuple, Sequence

import numpy as np

from ..atomic_io import atomic_write_text

__all__ = ["FrocInputs", "write_froc_inputs", "read_froc_inputs", "FROC_INPUTS_FILE"]

FROC_INPUTS_FILE = "froc_inputs.json"


class FrocInputs(NamedTuple):
    """Per evaluated image (in dataset order): id, patient (the bootstrap's unit), detections
    (XYXY slice pixels), their scores and the lesions; and the FROC convention of the run."""

    convention: str
    image_ids: List[object]
    patients: List[object]
    pred_boxes: List[np.ndarray]
    pred_scores: List[np.ndarray]
    gt_boxes: List[np.ndarray]


def write_froc_inputs(
    path: str,
    dataset: str,
    convention: str,
    image_ids: Sequence[object],
    patients: Sequence[object],
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
) -> None:
    """Write ``path`` atomically (boxes rounded to 1/100 pixel, scores to 6 digits)."""
    images = [
        {
            "image_id": i,
            "patient": p,
            "pred_boxes": np.round(np.asarray(b, dtype=np.float64), 2).tolist(),
            "pred_scores": np.round(np.asarray(s, dtype=np.float64), 6).tolist(),
            "gt_boxes": np.asarray(g, dtype=np.float64).tolist(),
        }
        for i, p, b, s, g in zip(image_ids, patients, pred_boxes, pred_scores, gt_boxes)
    ]
    atomic_write_text(
        path, json.dumps({"dataset": dataset, "convention": convention, "images": images})
    )


def read_froc_inputs(path: str) -> FrocInputs:
    """Read a file written by :func:`write_froc_inputs`; a malformed one is a ValueError naming
    ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        images: List[Dict] = payload["images"]
        return FrocInputs(
            str(payload["convention"]),
            [im["image_id"] for im in images],
            [im["patient"] for im in images],
            [np.asarray(im["pred_boxes"], dtype=np.float64).reshape(-1, 4) for im in images],
            [np.asarray(im["pred_scores"], dtype=np.float64).reshape(-1) for im in images],
            [np.asarray(im["gt_boxes"], dtype=np.float64).reshape(-1, 4) for im in images],
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable {FROC_INPUTS_FILE} ({e})") from None
