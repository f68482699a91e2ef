"""Does the local branch look at the right place? Mass-in-box and pointing game against ground-truth boxes.

For an image, a true class c and the local branch's spatial softmax ``P[:, c]`` over the patch grid:
- mass in box: the attention mass on patches whose centre lies inside a box of class c; a uniform map scores
  the fraction of such patches, which is the baseline it is compared with;
- pointing game: whether the most-attended patch lies inside a box of class c (uniform: the same fraction).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def box_masks(boxes: Sequence[dict], class_names: Sequence[str], grid: int, image_size: int) -> np.ndarray:
    """(C, grid*grid) bool: patch centres inside any box of each class."""
    centres = (np.arange(grid) + 0.5) * image_size / grid
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    index = {n: i for i, n in enumerate(class_names)}
    masks = np.zeros((len(class_names), grid * grid), dtype=bool)
    for b in boxes:
        x0, y0, x1, y1 = b["box"]
        inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        masks[index[b["label"]]] |= inside.reshape(-1)
    return masks


def localization_scores(
    attention: np.ndarray,
    labels: np.ndarray,
    boxes: Sequence[Sequence[dict]],
    class_names: Sequence[str],
    image_size: int,
) -> dict[str, float]:
    """``attention`` (N, P, C) spatial softmax; returns mean mass-in-box, pointing accuracy and their uniform
    baselines."""
    n, p, _ = attention.shape
    grid = int(round(p**0.5))
    if grid * grid != p:
        raise ValueError(f"attention has {p} positions, not a square grid")
    mass, uniform, hits = [], [], []
    for i in range(n):
        masks = box_masks(boxes[i], class_names, grid, image_size)
        for c in np.flatnonzero(labels[i] == 1):
            if not masks[c].any():  # a box smaller than a patch holds no patch centre: nothing to measure
                continue
            mass.append(float(attention[i, masks[c], c].sum()))
            uniform.append(float(masks[c].mean()))
            hits.append(bool(masks[c][int(attention[i, :, c].argmax())]))
    if not mass:
        raise ValueError("no (image, true class) pair with a box covering a patch centre")
    return {
        "mass_in_box": 100.0 * float(np.mean(mass)),
        "mass_in_box_uniform": 100.0 * float(np.mean(uniform)),
        "pointing_accuracy": 100.0 * float(np.mean(hits)),
        "pairs": len(mass),
    }
