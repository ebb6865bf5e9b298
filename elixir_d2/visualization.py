"""Pictures of what ElixirNet sees and finds, usable from Python.

* :func:`plot_froc` (from :mod:`elixir_d2.evaluation.report`): FROC curves, ``froc.png``.
* :func:`draw_detections`: a windowed slice with detected boxes and scores, ground truth in
  another colour.
* :func:`draw_relation_graph`: paper Figure 5, proposal centres linked by the region_nonlocal
  relation E, line thickness by weight.
* :func:`draw_confidence_map`: TRPN's location confidence p as a heat overlay, one panel per
  level, truncated locations (p <= eps) left uncoloured.
* :func:`draw_alpha_heatmap`: the architecture weights of a search (edges x operations).

Plain overlays use PIL (fast enough for every slice of a volume); figures with axes use
matplotlib's Agg canvas directly (no pyplot, so the caller's backend is left alone). Every
file is written through PathManager.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detectron2.utils.file_io import PathManager

from .data.ct_mapper import window_to_uint8_range
from .evaluation.report import plot_froc

__all__ = [
    "plot_froc",
    "window_for_display",
    "draw_detections",
    "draw_relation_graph",
    "draw_confidence_map",
    "draw_alpha_heatmap",
    "DET_COLOR",
    "GT_COLOR",
]

DET_COLOR = (255, 48, 48)  # detections: red
GT_COLOR = (48, 255, 48)  # ground truth: green
# Soft-tissue viewing window (HU), DeepLesion's most common DICOM window.
VIEW_WINDOW = (-175.0, 275.0)


def _save_png(img: Image.Image, path: str) -> None:
    with PathManager.open(path, "wb") as f:
        img.save(f, format="PNG", compress_level=1)  # overlays are many: favour speed over size


def _save_figure(fig, path: str) -> None:
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png")


def window_for_display(hu: np.ndarray, window: Tuple[float, float] = VIEW_WINDOW) -> np.ndarray:
    """HU slice -> uint8 grey image with ``window`` mapped onto 0..255 (the training windowing)."""
    return np.round(window_to_uint8_range(np.asarray(hu, dtype=np.float32), window)).astype(
        np.uint8
    )


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image (use window_for_display on HU), got {image.dtype}"
        )
    return image


def _box_pixels(box: Sequence[float]) -> Tuple[int, int, int, int]:
    """Outline pixels of a continuous XYXY box: pixel i covers [i, i + 1), so the box [x1, x2)
    has its left edge in column round(x1) and its right edge in column round(x2) - 1."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)


def draw_detections(
    image: np.ndarray,
    boxes: Optional[np.ndarray] = None,
    scores: Optional[Sequence[float]] = None,
    labels: Optional[Sequence[str]] = None,
    gt_boxes: Optional[np.ndarray] = None,
    path: Optional[str] = None,
    *,
    det_color: Tuple[int, int, int] = DET_COLOR,
    gt_color: Tuple[int, int, int] = GT_COLOR,
    width: int = 1,
) -> np.ndarray:
    """Draw detections (with "score label" above each box) and ground truth on a slice.

    Args:
        image: (H, W) or (H, W, 3) uint8, e.g. :func:`window_for_display` of the key slice.
        boxes, gt_boxes: (K, 4) XYXY in the image's pixels (continuous coordinates).
        scores, labels: per detection, printed above its box.
        path: PNG written when given.
    Returns:
        the drawn (H, W, 3) uint8 image. Ground truth is drawn first: a detection on top of it
        stays visible.
    """
    canvas = Image.fromarray(_rgb(image).copy())
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for box in np.asarray(gt_boxes if gt_boxes is not None else np.zeros((0, 4))).reshape(-1, 4):
        draw.rectangle(_box_pixels(box), outline=gt_color, width=width)
    boxes = np.asarray(boxes if boxes is not None else np.zeros((0, 4))).reshape(-1, 4)
    for k, box in enumerate(boxes):
        x1, y1, x2, y2 = _box_pixels(box)
        draw.rectangle((x1, y1, x2, y2), outline=det_color, width=width)
        text = " ".join(
            t
            for t in (
                f"{float(scores[k]):.2f}" if scores is not None else "",
                labels[k] if labels is not None else "",
            )
            if t
        )
        if text:
            # Above the box when there is room, else just below its top edge, inside.
            ty = y1 - 11 if y1 >= 11 else y1 + 2
            draw.text((x1 + 1, ty), text, fill=det_color, font=font)
    out = np.asarray(canvas)
    if path is not None:
        _save_png(canvas, path)
    return out


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def draw_relation_graph(
    image: np.ndarray,
    boxes: np.ndarray,
    relations: np.ndarray,
    path: str,
    *,
    scores: Optional[Sequence[float]] = None,
    max_nodes: int = 20,
    max_edges: int = 40,
    max_linewidth: float = 6.0,
    title: Optional[str] = None,
) -> List[Tuple[int, int, float, float]]:
    """Paper Figure 5: proposals as nodes at their box centres, linked by region_nonlocal edges.

    The ``max_nodes`` proposals of highest score (or the first ones, proposals being sorted by
    objectness) are kept; an edge's weight is (E[i, j] + E[j, i]) / 2 (E is row-softmaxed, so
    not symmetric); the ``max_edges`` heaviest edges between kept nodes are drawn with a line
    width proportional to the weight (the heaviest gets ``max_linewidth``).

    Args:
        image: (H, W) or (H, W, 3) uint8 slice.
        boxes: (N, 4) XYXY proposals in the image's pixels.
        relations: (N, N) relation matrix E of those proposals.
    Returns:
        the drawn edges as (i, j, weight, linewidth), i < j indexing ``boxes``, heaviest first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    e = np.asarray(relations, dtype=np.float64)
    n = len(boxes)
    if e.shape != (n, n):
        raise ValueError(f"relations must be {n} x {n} for {n} boxes, got {e.shape}")
    order = (
        np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        if scores is not None
        else np.arange(n)
    )
    nodes = np.sort(order[:max_nodes])
    sym = (e + e.T) / 2
    pairs = [
        (int(i), int(j), float(sym[i, j])) for a, i in enumerate(nodes) for j in nodes[a + 1 :]
    ]
    pairs.sort(key=lambda p: -p[2])
    pairs = pairs[:max_edges]
    w_max = max((p[2] for p in pairs), default=0.0)
    edges = [(i, j, w, max_linewidth * w / w_max if w_max > 0 else 0.0) for i, j, w in pairs]

    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    fig = _figure(6, 6 * h / max(w, 1))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, extent=(0, w, h, 0), interpolation="nearest")
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    for i, j, _, lw in reversed(edges):  # heaviest drawn last, on top
        ax.plot([cx[i], cx[j]], [cy[i], cy[j]], color="yellow", linewidth=lw, alpha=0.8)
    for i in nodes:
        x1, y1, x2, y2 = boxes[i]
        ax.add_patch(_rectangle((x1, y1), x2 - x1, y2 - y1))
    ax.plot(cx[nodes], cy[nodes], "o", color="cyan", markersize=4)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    if title:
        ax.text(4, 12, title, color="white", fontsize=9)
    _save_figure(fig, path)
    return edges


def _rectangle(xy, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, fill=False, edgecolor="cyan", linewidth=0.6, alpha=0.6)


def _upsample_nearest(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Each output pixel takes the map cell its centre falls in (the map spans the image)."""
    rows = np.minimum(((np.arange(h) + 0.5) * m.shape[0] / h).astype(np.int64), m.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * m.shape[1] / w).astype(np.int64), m.shape[1] - 1)
    return m[rows[:, None], cols[None, :]]


def draw_confidence_map(
    image: np.ndarray,
    conf_maps: Union[np.ndarray, Mapping[str, np.ndarray]],
    path: Optional[str] = None,
    *,
    eps: Union[None, float, Mapping[str, float]] = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """TRPN's location confidence p over a slice, one panel per level side by side.

    Each map (covering the whole image) is upsampled to the image size by nearest cell; a pixel
    gets ``(1 - alpha) * grey + alpha * cmap(p)``, except where ``p <= eps`` (truncated: no
    proposal comes from there), which keeps the plain grey slice.

    Args:
        image: (H, W) or (H, W, 3) uint8 slice.
        conf_maps: one (h, w) map in [0, 1], or level name -> map.
        eps: the truncation threshold (one value, or per level); None colours everything.
    Returns:
        the (H, W * levels, 3) uint8 picture (also written to ``path`` when given).
    """
    from matplotlib import colormaps

    rgb = _rgb(image).astype(np.float64)
    h, w = rgb.shape[:2]
    maps = dict(conf_maps) if isinstance(conf_maps, Mapping) else {"": conf_maps}
    colour = colormaps[cmap]
    panels = []
    for level, m in maps.items():
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"confidence map {level!r} must be 2-D, got shape {m.shape}")
        p = _upsample_nearest(np.clip(m, 0.0, 1.0), h, w)
        heat = colour(p)[..., :3] * 255.0
        blend = (1 - alpha) * rgb + alpha * heat
        level_eps = eps.get(level) if isinstance(eps, Mapping) else eps
        if level_eps is not None:
            blend = np.where((p <= level_eps)[..., None], rgb, blend)
        panel = Image.fromarray(np.round(blend).astype(np.uint8))
        if level:
            label = level + (f"  eps={level_eps:.2f}" if level_eps is not None else "")
            ImageDraw.Draw(panel).text(
                (2, 2), label, fill=(255, 255, 255), font=ImageFont.load_default()
            )
        panels.append(np.asarray(panel))
    out = np.concatenate(panels, axis=1)
    if path is not None:
        _save_png(Image.fromarray(out), path)
    return out


def _edge_labels(num_edges: int) -> List[str]:
    """The search's row names (elixir_d2.search.outputs.edge_labels) of the DARTS-style block with
    ``num_edges`` edges (B branches have 2 + 3 + ... + (B + 1)); "e<k>" when no block has that
    many."""
    from .search.outputs import edge_labels  # the search stack only when a heatmap is drawn

    total, branches = 0, 0
    while total < num_edges:
        total += 2 + branches
        branches += 1
    if total != num_edges:
        return [f"e{k}" for k in range(num_edges)]
    return edge_labels(branches)


def _as_weights(a: np.ndarray) -> np.ndarray:
    """Rows already a distribution (non-negative, summing to 1) are kept, else softmax(alpha)."""
    if np.all(a >= 0) and np.allclose(a.sum(axis=1), 1.0, atol=1e-4):
        return a
    z = np.exp(a - a.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def draw_alpha_heatmap(
    alphas: Mapping[str, np.ndarray],
    op_names: Sequence[str],
    path: str,
    *,
    edge_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Dict[str, np.ndarray]:
    """Heatmaps of architecture weights, one panel per block type (e.g. "normal", "reduce").

    Args:
        alphas: name -> (num_edges, num_ops) array of raw alphas (shown as softmax over ops, the
            weights the mixed ops use) or of weights whose rows already sum to 1 (shown as is).
        op_names: the ``num_ops`` column names.
        path: PNG to write.
        edge_labels: row names; default "b<branch><-<input>" for DARTS-style blocks.
    Returns:
        name -> the (num_edges, num_ops) weights drawn.
    """
    if not alphas:
        raise ValueError("draw_alpha_heatmap: no alphas given")
    drawn = {}
    for name, a in alphas.items():
        a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != len(op_names):
            raise ValueError(
                f"alphas[{name!r}] has shape {a.shape}; expected (num_edges, "
                f"{len(op_names)}) for the {len(op_names)} op names"
            )
        drawn[name] = _as_weights(a)
    rows = max(a.shape[0] for a in drawn.values())
    fig = _figure(1.6 + 0.75 * len(op_names) * len(drawn), 1.6 + 0.32 * rows)
    axes = fig.subplots(1, len(drawn), squeeze=False)[0]
    for ax, (name, a) in zip(axes, drawn.items()):
        im = ax.imshow(a, cmap="viridis", vmin=0.0, vmax=max(float(a.max()), 1e-6), aspect="auto")
        ax.set_xticks(range(len(op_names)))
        ax.set_xticklabels(op_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(a.shape[0]))
        ax.set_yticklabels(
            list(edge_labels) if edge_labels is not None else _edge_labels(a.shape[0]), fontsize=7
        )
        for (r, c), v in np.ndenumerate(a):
            ax.text(
                c,
                r,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=5,
                color="white" if v < 0.6 * a.max() else "black",
            )
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    return drawn
