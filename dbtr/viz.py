"""Every plot dbtr draws: per-class AP, precision-recall curves, attention heatmaps (PNG files).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``) and rendered by the Agg canvas:
no pyplot, no global backend switch, so this works in headless runs, in worker threads and inside a notebook
with an interactive backend alike. Files are written atomically (a killed run leaves no half PNG).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dbtr.utils.io import atomic_write_bytes

# (title, attention map (g, g)) panels of one image
Panels = list[tuple[str, np.ndarray]]


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


def pr_curves_figure(class_names: Sequence[str], curves: Sequence[tuple[np.ndarray, np.ndarray] | None],
                     max_legend: int = 20, title: str = "precision-recall"):
    """One step curve per class from :func:`dbtr.metrics.precision_recall_curves` (area = the class's AP)."""
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    drawn = [(n, c) for n, c in zip(class_names, curves) if c is not None]
    for name, (precision, recall) in drawn:
        ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
        # 'pre': precision P_k holds on (R_{k-1}, R_k], exactly the rectangles the AP sums
        ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", lw=1.2,
                label=f"{name} ({100 * ap:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{title} ({len(drawn)} classes; legend: AP %)")
    ax.grid(alpha=0.3)
    if 0 < len(drawn) <= max_legend:
        ax.legend(fontsize=7, loc="lower left")
    return fig


def top_panels(class_names: Sequence[str], scores: np.ndarray, attention: np.ndarray, k: int = 3,
               marks: Sequence[int] = ()) -> Panels:
    """The ``k`` best-scored classes of one image as heatmap panels; ``attention`` is (C, g, g).

    Classes in ``marks`` (e.g. ground truth) get a check mark in the title.
    """
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [(f"{class_names[c]}{' ✓' if c in marks else ''} {float(scores[c]):.2f}", attention[c]) for c in top]


def heatmap_figure(rows: Sequence[tuple[Image.Image, Panels]], panel_inches: float = 2.2,
                   title: str | None = None):
    """One row per image: the image as the model sees it, then each (title, g x g map) drawn over it.

    Maps are upsampled bilinearly over the image; each panel has its own colour scale (a map sums to 1, so
    its peak says how concentrated it is: printed as 'max').
    """
    if not rows:
        raise ValueError("no image to draw")
    cols = 1 + max(len(panels) for _, panels in rows)
    fig = _figure(panel_inches * cols, panel_inches * len(rows) + (0.3 if title else 0))
    axes = np.atleast_2d(fig.subplots(len(rows), cols, squeeze=False))
    for r, (image, panels) in enumerate(rows):
        pixels = np.asarray(image.convert("RGB"))
        h, w = pixels.shape[:2]
        axes[r, 0].imshow(pixels, interpolation="nearest")
        axes[r, 0].set_title("image", fontsize=8)
        for c, ax in enumerate(axes[r, 1:]):
            if c < len(panels):
                name, att = panels[c]
                att = np.asarray(att, dtype=np.float32)
                ax.imshow(pixels, interpolation="nearest")
                ax.imshow(att, cmap="jet", alpha=0.5, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
                ax.set_title(f"{name}\nmax {att.max():.2f}", fontsize=8)
        for ax in axes[r]:
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
