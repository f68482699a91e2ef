"""Every plot dbtr draws: per-class AP, precision-recall curves, attention heatmaps (PNG files).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``) and rendered by the Agg canvas:
no pyplot, no global backend switch, so this works in headless runs, in worker threads and inside a notebook
with an interactive backend alike. Files are written atomically (a killed run leaves no half PNG).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dbtr.utils.io import atomic_write_bytes

# (title, attention map (g, g)[, true boxes of that class]) panels of one image
Panels = list[tuple]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (``IPython.display.Image(figure_png(fig))`` shows it in a notebook)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_figure(fig, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(path, figure_png(fig))


def per_class_ap_figure(class_names: Sequence[str], ap: Sequence[float], title: str = "per-class AP"):
    """Horizontal bars, best class on top; classes without a positive (NaN AP) are listed as such."""
    ap = np.asarray(ap, dtype=np.float64)
    if len(ap) != len(class_names):
        raise ValueError(f"{len(ap)} AP values for {len(class_names)} class names")
    order = sorted(range(len(ap)), key=lambda i: (math.isnan(ap[i]), -np.nan_to_num(ap[i])))
    values = [0.0 if math.isnan(ap[i]) else 100.0 * ap[i] for i in order]
    names = [class_names[i] + (" (no positive)" if math.isnan(ap[i]) else "") for i in order]
    fig = _figure(7, 1.0 + 0.22 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, values, color="#4c72b0")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP (%)")
    valid = ap[~np.isnan(ap)]
    ax.set_title(f"{title} (mAP {100.0 * valid.mean():.2f})" if valid.size else title)
    ax.grid(axis="x", alpha=0.3)
    return fig


# Up to 20 classes: 20 distinct colours (tab20); beyond, the colours repeat with another line style each
# round.
_LINE_STYLES = ("-", "--", ":", "-.")


def class_styles(n: int) -> list[tuple[tuple[float, ...], str]]:
    """``n`` distinct (colour, line style) pairs; all colours distinct while ``n <= 20``."""
    from matplotlib import colormaps

    colours = colormaps["tab20"].colors
    colours = colours[0::2] + colours[1::2]  # the 10 strong hues first, then their light twins
    if n > len(colours) * len(_LINE_STYLES):
        raise ValueError(
            f"{n} curves: at most {len(colours) * len(_LINE_STYLES)} can be told apart in one plot"
        )
    return [(colours[i % len(colours)], _LINE_STYLES[i // len(colours)]) for i in range(n)]


def pr_curves_figure(
    class_names: Sequence[str],
    curves: Sequence[tuple[np.ndarray, np.ndarray] | None],
    max_legend: int = 40,
    title: str = "precision-recall",
):
    """One step curve per class from :func:`dbtr.metrics.precision_recall_curves` (area = the class's AP).

    Every class has its own colour (and, past 20 classes, line style), so the legend identifies each curve.
    """
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    drawn = [(n, c) for n, c in zip(class_names, curves) if c is not None]
    for (name, (precision, recall)), (colour, style) in zip(drawn, class_styles(len(drawn))):
        ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
        # 'pre': precision P_k holds on (R_{k-1}, R_k], exactly the rectangles the AP sums
        ax.step(
            np.r_[0.0, recall],
            np.r_[precision[0], precision],
            where="pre",
            lw=1.2,
            color=colour,
            linestyle=style,
            label=f"{name} ({100 * ap:.1f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{title} ({len(drawn)} classes; legend: AP %)")
    ax.grid(alpha=0.3)
    if 0 < len(drawn) <= max_legend:
        ax.legend(fontsize=7, loc="lower left", ncols=1 if len(drawn) <= 20 else 2)
    return fig


# A true box of one class, in pixels of the image as shown: (x0, y0, x1, y1)
Box = tuple[float, float, float, float]


def top_panels(
    class_names: Sequence[str],
    scores: np.ndarray,
    attention: np.ndarray,
    k: int = 3,
    marks: Sequence[int] = (),
    boxes: dict[int, Sequence[Box]] | None = None,
) -> Panels:
    """The ``k`` best-scored classes of one image as heatmap panels; ``attention`` is (C, g, g).

    Classes in ``marks`` (e.g. ground truth) get a check mark in the title; ``boxes`` (class index -> its true
    boxes in the shown image) are drawn on the panel of their class.
    """
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [
        (
            f"{class_names[c]}{' ✓' if c in marks else ''} {float(scores[c]):.2f}",
            attention[c],
            list((boxes or {}).get(int(c), ())),
        )
        for c in top
    ]


def crop_boxes(
    boxes: Sequence[dict], original_size: tuple[int, int], size: int, class_names: Sequence[str]
) -> dict[int, list[Box]]:
    """Labels-file boxes (``{"label", "box": [x0, y0, x1, y1]}`` in original pixels) in the ``size`` x
    ``size`` view of :meth:`dbtr.data.images.ClipImageTransform.crop` (short side resized to ``size``, centre
    crop), per class index; boxes of classes outside ``class_names`` or entirely cropped away are dropped."""
    from dbtr.data.images import crop_origin, resized_size

    w, h = original_size
    nw, nh = resized_size(w, h, size)  # as ClipImageTransform.crop
    (left, top), sx, sy = crop_origin(nw, nh, size), nw / w, nh / h
    index, out = {n: i for i, n in enumerate(class_names)}, {}
    for b in boxes:
        if b.get("label") not in index:
            continue
        x0, y0, x1, y1 = b["box"]
        box = tuple(
            float(np.clip(v, 0, size)) for v in (x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top)
        )
        if box[2] > box[0] and box[3] > box[1]:
            out.setdefault(index[b["label"]], []).append(box)
    return out


def read_boxes(labels_file: str | os.PathLike, file_names: Sequence[str]) -> dict[str, list[dict]]:
    """The ``boxes`` of ``file_names`` from a labels JSONL (the toy world writes them); {} for files
    without."""
    from dbtr.utils.files import iter_jsonl

    wanted, out = set(file_names), {}
    for _, rec in iter_jsonl(labels_file):
        if rec.get("file_name") in wanted and isinstance(rec.get("boxes"), list):
            out[rec["file_name"]] = rec["boxes"]
    return out


OVERLAY_ALPHA = 0.45  # the object's own colours stay readable under the map


def _draw_boxes(ax, boxes: Sequence[Box], labels: Sequence[str] = ()) -> None:
    from matplotlib.patches import Rectangle

    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1.4))
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="black", lw=0.6, linestyle="--"
            )
        )
        if i < len(labels):
            ax.text(
                x0,
                y0 - 1,
                labels[i],
                color="white",
                fontsize=6,
                va="bottom",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0},
            )


def heatmap_figure(
    rows: Sequence[tuple[Image.Image, Panels]],
    panel_inches: float = 2.2,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
):
    """One row per image: the image as the model sees it, then each panel's g x g map drawn over it.

    A panel is ``(title, map)`` or ``(title, map, boxes)``; a row may carry a third item, the true boxes of
    the image per class index (drawn on the image, labelled with ``class_names``). All maps share one colour
    scale, from 0 to the largest value in the figure, shown by a single colour bar: a map sums to 1 over the
    patches, so a flat map is visibly dim and a concentrated one bright. Maps are upsampled bilinearly and
    drawn at ``OVERLAY_ALPHA`` over the image; boxes are white outlines.
    """
    if not rows:
        raise ValueError("no image to draw")
    from matplotlib.colors import Normalize

    maps = [np.asarray(panel[1], dtype=np.float32) for row in rows for panel in row[1]]
    if not maps:
        raise ValueError("no heatmaps to draw")
    norm = Normalize(vmin=0.0, vmax=max(float(m.max()) for m in maps) or 1.0)
    cols = 1 + max(len(row[1]) for row in rows)
    fig = _figure(panel_inches * cols + 0.8, panel_inches * len(rows) + (0.3 if title else 0))
    axes = np.atleast_2d(fig.subplots(len(rows), cols, squeeze=False))
    mappable = None
    for r, row in enumerate(rows):
        image, panels = row[0], row[1]
        image_boxes = row[2] if len(row) > 2 else {}
        pixels = np.asarray(image.convert("RGB"))
        h, w = pixels.shape[:2]
        axes[r, 0].imshow(pixels, interpolation="nearest")
        axes[r, 0].set_title("image", fontsize=8)
        flat = [(box, class_names[c] if class_names else "") for c, bs in image_boxes.items() for box in bs]
        _draw_boxes(axes[r, 0], [b for b, _ in flat], [n for _, n in flat])
        for c, ax in enumerate(axes[r, 1:]):
            if c < len(panels):
                name, att = panels[c][0], np.asarray(panels[c][1], dtype=np.float32)
                ax.imshow(pixels, interpolation="nearest")
                mappable = ax.imshow(
                    att,
                    cmap="jet",
                    norm=norm,
                    alpha=OVERLAY_ALPHA,
                    interpolation="bilinear",
                    extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                )
                _draw_boxes(ax, panels[c][2] if len(panels[c]) > 2 else ())
                ax.set_title(f"{name}\nmax {att.max():.2f}", fontsize=8)
        for ax in axes[r]:
            ax.set_axis_off()
    cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.6, aspect=30, pad=0.02)
    cbar.set_label("attention weight (each map sums to 1)", fontsize=8)
    cbar.solids.set_alpha(1.0)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
