"""Inference on new CT: DeepLesion slice folders, NIfTI volumes, DICOM series (predict_net.py)."""

from .discovery import discover_cases  # the walk with predict_net.py's symlink policy
from .grouping import Finding, group_detections
from .predictor import CTPredictor, SlicePrediction, VolumePrediction, build_predictor_model
from .runner import PredictOptions, load_ground_truth, run_prediction
from .volume_io import CaseSource, CTInputError, CTVolume, read_case

__all__ = [
    "CTInputError",
    "CTVolume",
    "CaseSource",
    "discover_cases",
    "read_case",
    "CTPredictor",
    "SlicePrediction",
    "VolumePrediction",
    "build_predictor_model",
    "Finding",
    "group_detections",
    "PredictOptions",
    "load_ground_truth",
    "run_prediction",
]
