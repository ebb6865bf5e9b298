"""evaluation: the DeepLesion FROC protocol and its DatasetEvaluator (docs/design.md, Evaluation
protocol)."""

from .froc import MEAN_SENS_FPS, PAPER_FPS, compute_froc
from .lesion_evaluator import LesionEvaluator
from .report import format_froc_table, format_type_table, plot_froc

__all__ = [
    "compute_froc",
    "LesionEvaluator",
    "format_froc_table",
    "format_type_table",
    "plot_froc",
    "PAPER_FPS",
    "MEAN_SENS_FPS",
]
