"""One evaluation epoch's numbers from its collected scores: a pure function of (scores, labels) per branch.

The LightningModule only collects the scores (all-gathered under DDP); :func:`summarise` turns them into the
result dict that is logged, printed and written to metrics.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from dbtr.metrics import evaluate_scores, f1_at_k, map_by_size, minmax

EVALUATION_DEFAULTS = {"difficult": "negative", "top_k": [3], "f1_at": [], "val_subset": None, "sparc": None}
BRANCHES = ("merged", "global", "local")


def branch_metrics(
    scores: Tensor, labels: Tensor, eval_cfg: dict[str, Any], with_f1: bool = True
) -> dict[str, Any]:
    """mAP, per-class AP, CF1/OF1@top_k and (``f1_at``) the zero-shot literature's F1@k of one score
    matrix."""
    top_k = tuple(k for k in eval_cfg["top_k"] if k <= scores.shape[1]) if with_f1 else ()
    metrics = evaluate_scores(scores, labels, difficult=eval_cfg["difficult"], top_k=top_k, per_class=True)
    for k in eval_cfg["f1_at"]:
        if int(k) <= scores.shape[1] and bool((labels == 1).any()):
            metrics.update({f"{m}@{k}": v for m, v in f1_at_k(scores, labels, int(k)).items()})
    return metrics


def summarise(
    collected: dict[str, tuple[Tensor, Tensor]],
    stage: str,
    eval_cfg: dict[str, Any],
    class_names: Sequence[str],
    class_subsets: dict[str, list[int]] | None = None,
    ensemble_rate: float = 0.9,
    object_areas: tuple[Any, Sequence[float]] | None = None,
) -> tuple[dict[str, Any], tuple[Tensor, Tensor] | None]:
    """``(result, merged (scores, labels))`` of one stage.

    :param collected: ``branch -> (scores, labels)`` for ``merged``, ``global``, ``local`` and, with an
        ensemble, ``text`` (the text-only model); ``ensemble`` =
        ``(1 - r) * minmax(text) + r * minmax(merged)`` is added.
    :param eval_cfg: ``difficult``, ``top_k``, ``f1_at``, ``val_subset`` (validation on one class subset
        only).
    :param class_subsets: subset name -> label columns; the test also reports ``test/<subset>/mAP`` on each.
    :param object_areas: ``(areas (N, C), size_thresholds)`` when the test labels carry boxes: the test also
        reports ``test/mAP_small``, ``_medium``, ``_large`` (per branch with its suffix, e.g.
        ``test/mAP_small_local``), see :func:`dbtr.metrics.map_by_size`.
    """
    class_subsets = class_subsets or {}
    eval_cfg = {**EVALUATION_DEFAULTS, **eval_cfg}
    collected = dict(collected)
    if "text" in collected and "merged" in collected:
        r = float(ensemble_rate)
        (text, labels), (mine, _) = collected["text"], collected["merged"]
        collected["ensemble"] = ((1 - r) * minmax(text) + r * minmax(mine), labels)
    subset = eval_cfg["val_subset"] if stage == "val" else None
    result: dict[str, Any] = {}
    merged = None
    for branch, (scores, labels) in collected.items():
        if subset is not None:  # selection sees only these classes (e.g. seen ones in the ZSL protocol)
            cols = class_subsets[subset]
            scores, labels = scores[:, cols], labels[:, cols]
        metrics = branch_metrics(scores, labels, eval_cfg)
        ap = metrics.pop("AP")
        suffix = "" if branch == "merged" else f"_{branch}"
        if stage == "test" and object_areas is not None and subset is None:
            areas, thresholds = object_areas
            if len(areas) != scores.shape[0]:
                raise RuntimeError(f"{len(areas)} rows of object areas for {scores.shape[0]} scored images")
            metrics.update(map_by_size(scores, labels, areas, thresholds, eval_cfg["difficult"]))
        for name, value in metrics.items():
            result[f"{stage}/{name}{suffix}"] = float(value)
        if branch == "merged":
            merged = (scores, labels)
            names = [class_names[c] for c in class_subsets[subset]] if subset else list(class_names)
            result[f"{stage}/per_class_AP"] = {
                n: (None if math.isnan(a) else round(100.0 * float(a), 4)) for n, a in zip(names, ap)
            }
            result[f"{stage}/num_images"] = int(scores.shape[0])
            if stage == "test":
                for name, cols in class_subsets.items():
                    sub = branch_metrics(scores[:, cols], labels[:, cols], eval_cfg, with_f1=False)
                    sub.pop("AP")
                    result.update({f"{stage}/{name}/{k}": float(v) for k, v in sub.items()})
    return result, merged


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The numbers loggers get (mAP and F1s); precision/recall and per-class AP go to metrics.json only."""
    return {
        k: v
        for k, v in result.items()
        if isinstance(v, float) and k.split("/")[-1].startswith(("mAP", "CF1", "OF1", "F1@"))
    }
