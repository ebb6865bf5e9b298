"""Paper-layout FROC tables (Tables 1 and 2) and the FROC plot written by LesionEvaluator."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from .froc import CRITERIA, PAPER_FPS

__all__ = ["fp_key", "format_froc_table", "format_type_table", "plot_froc", "CRITERION_NAMES"]

CRITERION_NAMES = {"iou": "IoU", "iobb": "IoBB"}


def fp_key(fp: float) -> str:
    """How an FP point appears in metric names: 0.5 -> "0.5", 1.0 -> "1"."""
    return f"{float(fp):g}"


def _metrics_of(entry: Mapping) -> Mapping:
    # Accept evaluate()'s {"lesion": {...}}, lesion_metrics.json's {"metrics": {...}} or the flat
    # dict.
    for key in ("lesion", "metrics"):
        if key in entry and isinstance(entry[key], Mapping):
            return entry[key]
    return entry


def _cell(value, digits: int) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def format_froc_table(
    rows: Mapping[str, Mapping], criterion: str = "iou", fps: Sequence[float] = PAPER_FPS
) -> str:
    """Markdown table in the layout of the paper's Tables 1/2.

    Args:
        rows: model name -> metrics (the flat dict of ``LesionEvaluator.evaluate()["lesion"]``,
            or that whole result, or a loaded lesion_metrics.json), values in %.
        criterion: ``"iou"`` or ``"iobb"``.
        fps: FP-per-image columns.

    Returns:
        a caption line and a table: one row per model, columns = sensitivity (%) at each FP point
        (2 decimals) then mAP (%, 1 decimal); "-" where a value is missing or undefined.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    cols = [fp_key(f) for f in fps]
    lines = [
        f"Sensitivity {CRITERION_NAMES[criterion]} (%) at FPs per image; mAP@[.5:.95] (%)",
        "",
        "| Method | " + " | ".join(cols) + " | mAP |",
        "|:--|" + "--:|" * (len(cols) + 1),
    ]
    for name, entry in rows.items():
        m = _metrics_of(entry)
        cells = [_cell(m.get(f"sens@{c}_{criterion}"), 2) for c in cols] + [_cell(m.get("AP"), 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_type_table(
    rows: Mapping[str, Mapping],
    types: Optional[Sequence[str]] = None,
    abbrev: Optional[Sequence[str]] = None,
) -> str:
    """Markdown table in the layout of the paper's Table 4: per-type sensitivity (%) at 3 FPs
    per image (IoU), one row per model, "-" where the type's curve never reaches 3 FPs (NaN or
    None in the metrics) or the value is missing.

    Args:
        rows: model name -> metrics as for :func:`format_froc_table` (keys
            ``sens@3_iou_<type>``, spaces in type names as underscores).
        types: lesion type names in column order (default: DeepLesion's 8 types).
        abbrev: column headers (default: BN, AB, ME, LV, LU, KD, ST, PV).
    """
    from ..data.deeplesion import LESION_TYPE_ABBREV, LESION_TYPES

    types = list(LESION_TYPES if types is None else types)
    abbrev = list(LESION_TYPE_ABBREV if abbrev is None else abbrev)
    if len(types) != len(abbrev):
        raise ValueError(f"format_type_table: {len(types)} types but {len(abbrev)} abbreviations")
    lines = [
        "Sensitivity (%) at 3 FPs per image (IoU) per lesion type",
        "",
        "| Method | " + " | ".join(abbrev) + " |",
        "|:--|" + "--:|" * len(abbrev),
    ]
    for name, entry in rows.items():
        m = _metrics_of(entry)
        cells = [_cell(m.get(f"sens@3_iou_{t.replace(' ', '_')}"), 2) for t in types]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_froc(
    curves: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    path: str,
    fps: Sequence[float] = PAPER_FPS,
    title: Optional[str] = None,
) -> None:
    """Draw FROC curves (label -> (fp_per_image, sensitivity in [0, 1])) to a PNG at ``path``.

    FP axis log-scaled; dotted verticals and markers at the ``fps`` points; a curve that stops
    before the last point is drawn flat to it (the evaluation's "last sensitivity" rule).
    """
    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from detectron2.utils.file_io import PathManager

    fps = [float(f) for f in fps if f > 0]
    lo = min(fps) / 2 if fps else 0.1
    hi = max(fps) * 1.5 if fps else 10.0
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (x, y) in curves.items():
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        keep = (x > 0) & (x <= hi)
        xs, ys = x[keep], y[keep]
        if len(x) and x[-1] < hi:
            xs, ys = np.append(xs, hi), np.append(ys, y[-1])
        line = ax.plot(xs, 100.0 * ys, label=label, linewidth=1.5)[0]
        marks = [float(np.interp(f, x, y)) for f in fps] if len(x) else []
        ax.plot(fps, [100.0 * v for v in marks], "o", color=line.get_color(), markersize=4)
    for f in fps:
        ax.axvline(f, color="0.7", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 100)
    ax.set_xticks(fps)
    ax.set_xticklabels([fp_key(f) for f in fps])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png")
