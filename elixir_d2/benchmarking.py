"""Timing helpers shared by projects/benchmarks (models_speed.py) and projects/paper (Table 1's
speed column)."""

from __future__ import annotations

import time
from typing import Dict, List

import torch

from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN

__all__ = ["staged_inference", "sync"]


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def staged_inference(model: GeneralizedRCNN, inputs: List[Dict]) -> Dict[str, float]:
    """GeneralizedRCNN.inference step by step; wall seconds per stage (CUDA-synchronised)."""
    dev = model.device
    out = {}
    sync(dev)
    t0 = time.perf_counter()
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    sync(dev)
    t1 = time.perf_counter()
    proposals, _ = model.proposal_generator(images, features, None)
    sync(dev)
    t2 = time.perf_counter()
    results, _ = model.roi_heads(images, features, proposals, None)
    model._postprocess(results, inputs, images.image_sizes)  # the model's own (BodyCropRCNN)
    sync(dev)
    t3 = time.perf_counter()
    out["backbone"], out["proposals"], out["roi_heads"] = t1 - t0, t2 - t1, t3 - t2
    out["total"] = t3 - t0
    out["num_proposals"] = float(sum(len(p) for p in proposals))
    return out
