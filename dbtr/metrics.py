"""Multi-label evaluation: mAP (sklearn-exact, tie-aware), CP/CR/CF1/OP/OR/OF1, and a DDP-safe score
collector.

Labels are either VOC style ``{1, 0, -1}`` (1 present, -1 absent, 0 "difficult" / unknown) or plain
``{0, 1}``. The matrix is VOC style iff it contains a -1 anywhere; only then does ``difficult`` matter:

* ``"negative"`` (TaI-DPT convention, the published numbers): only label 1 is positive, 0 counts as negative;
* ``"ignore"``: entries with label 0 are dropped, for that class only.

Scores and labels may be numpy arrays or torch tensors (any float dtype, bf16 included); everything is
computed in float64 numpy, once, on the full evaluation set.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "DIFFICULT_OPTIONS",
    "RowCollector",
    "ScoreCollector",
    "average_precision_per_class",
    "evaluate_scores",
    "map_by_size",
    "mean_average_precision",
    "multilabel_f1",
    "precision_recall_curves",
    "relative_threshold_predictions",
]

DIFFICULT_OPTIONS = ("negative", "ignore")
ArrayLike = Any  # np.ndarray | torch.Tensor | nested sequences


# ------------------------------------------------------------------ input checks
def _to_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16; float32 holds every bf16/fp16 value exactly.
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x).astype(dtype, copy=False)


def _check_scores(scores: ArrayLike) -> np.ndarray:
    s = _to_numpy(scores, np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, C), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf value(s)")
    return s


def _check_labels(labels: ArrayLike) -> np.ndarray:
    y = _to_numpy(labels, np.float64)
    bad = np.setdiff1d(np.unique(y), [-1.0, 0.0, 1.0])  # NaN lands here too
    if bad.size:
        shown = ", ".join(repr(float(v)) for v in bad[:10])
        raise ValueError(f"labels must be in {{-1, 0, 1}}; found bad value(s): {shown}")
    return y.astype(np.int8)


def _check_difficult(difficult: str) -> None:
    if difficult not in DIFFICULT_OPTIONS:
        raise ValueError(f"difficult must be one of {DIFFICULT_OPTIONS}, got {difficult!r}")


def _prepare(
    scores: ArrayLike, labels: ArrayLike, difficult: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(scores float64, positive bool, valid bool)``, all (N, C)."""
    _check_difficult(difficult)
    s = _check_scores(scores)
    y = _check_labels(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same shape, got {s.shape} and {y.shape}")
    positive = y == 1
    if difficult == "ignore" and (y == -1).any():
        valid = y != 0
    else:  # plain {0,1} labels, or difficult counted as negative
        valid = np.ones_like(positive)
    return s, positive, valid


# ------------------------------------------------------------------------- AP
def average_precision_per_class(
    scores: ArrayLike, labels: ArrayLike, difficult: str = "negative"
) -> np.ndarray:
    """Non-interpolated AP per class, identical to ``sklearn.metrics.average_precision_score``.

    Tied scores form one threshold: ``AP = sum_k (R_k - R_{k-1}) * P_k`` over distinct score values.
    Returns shape (C,), values in [0, 1], NaN for a class without any positive.
    """
    s, positive, valid = _prepare(scores, labels, difficult)
    n, c = s.shape
    if n == 0:
        return np.full(c, np.nan)
    # Work class-major so each sort runs over contiguous memory.
    s_t = np.ascontiguousarray(s.T)
    order = np.argsort(-s_t, axis=1)  # any sort kind: ties are grouped below
    s_sorted = np.take_along_axis(s_t, order, axis=1)
    tp = np.take_along_axis((positive & valid).T, order, axis=1)
    w = np.take_along_axis(valid.T, order, axis=1)  # ignored entries weigh 0: they move neither P nor R
    ctp = np.cumsum(tp, axis=1, dtype=np.float64)
    cnt = np.cumsum(w, axis=1, dtype=np.float64)
    precision = np.divide(ctp, cnt, out=np.zeros_like(ctp), where=cnt > 0)
    # Every element takes the precision at the end of its tie group (the threshold it belongs to).
    is_last = np.ones_like(tp)
    is_last[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    idx = np.where(is_last, np.arange(n), n)
    group_end = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    p_group = np.take_along_axis(precision, group_end, axis=1)
    n_pos = ctp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (tp * p_group).sum(axis=1) / n_pos
    ap[n_pos == 0] = np.nan
    return ap


def precision_recall_curves(
    scores: ArrayLike, labels: ArrayLike, difficult: str = "negative"
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per class, ``(precision, recall)`` at each distinct score threshold, highest threshold first.

    The points ``average_precision_per_class`` sums over: ``AP = sum_k (R_k - R_{k-1}) P_k`` with ``R_0 = 0``
    (tied scores form one point, ignored entries are dropped). ``None`` for a class without any positive.
    """
    s, positive, valid = _prepare(scores, labels, difficult)
    curves: list[tuple[np.ndarray, np.ndarray] | None] = []
    for c in range(s.shape[1]):
        sc, pos = s[valid[:, c], c], positive[valid[:, c], c]
        if not pos.any():
            curves.append(None)
            continue
        order = np.argsort(-sc, kind="stable")
        sc, pos = sc[order], pos[order]
        group_end = np.r_[sc[:-1] != sc[1:], True]
        tp = np.cumsum(pos, dtype=np.float64)[group_end]
        count = np.arange(1, sc.size + 1, dtype=np.float64)[group_end]
        curves.append((tp / count, tp / tp[-1]))
    return curves


def _classes_without_positive_warning(missing: np.ndarray, total: int, what: str) -> None:
    idx = np.flatnonzero(missing).tolist()
    warnings.warn(
        f"{len(idx)} of {total} classes have no positive label and are left out of {what}: "
        f"class indices {idx}",
        stacklevel=3,
    )


def mean_average_precision(scores: ArrayLike, labels: ArrayLike, difficult: str = "negative") -> float:
    """100 x mean AP over the classes that have at least one positive (others are left out, with a
    warning)."""
    return _mean_ap(average_precision_per_class(scores, labels, difficult=difficult))


def _mean_ap(ap: np.ndarray) -> float:
    missing = np.isnan(ap)
    if missing.all():
        raise ValueError("no class has a positive label: mAP is undefined")
    if missing.any():
        _classes_without_positive_warning(missing, ap.size, "the mAP")
    return float(100.0 * ap[~missing].mean())


# ----------------------------------------------------------------- AP by object size
SIZE_NAMES = ("small", "medium", "large")


def size_buckets(areas: ArrayLike, thresholds: Sequence[float]) -> np.ndarray:
    """(N, C) int8 bucket of each (image, class) from the area of its largest instance: 0 small (area <
    thresholds[0]), 1 medium, 2 large (area >= thresholds[1]), -1 where the area is unknown (NaN)."""
    a = np.asarray(areas, dtype=np.float64)
    lo, hi = (float(t) for t in thresholds)
    if not 0 < lo < hi:
        raise ValueError(f"size thresholds must be 0 < small/medium < medium/large, got {thresholds}")
    out = np.where(a < lo, 0, np.where(a < hi, 1, 2)).astype(np.int8)
    out[np.isnan(a)] = -1
    return out


def map_by_size(
    scores: ArrayLike,
    labels: ArrayLike,
    areas: ArrayLike,
    thresholds: Sequence[float],
    difficult: str = "negative",
) -> dict[str, float]:
    """``{"mAP_small", "mAP_medium", "mAP_large"}``: for class c and bucket s, the positives are the images
    whose largest instance of c falls in s, ranked against all negatives of c (positives of other buckets and
    positives of unknown size are left out); the mean is over the classes with a positive in s (NaN when none
    has). ``areas`` (N, C): area of the largest instance, NaN where unknown."""
    s, positive, valid = _prepare(scores, labels, difficult)
    bucket = size_buckets(areas, thresholds)
    if bucket.shape != s.shape:
        raise ValueError(f"areas must have the scores' shape {s.shape}, got {bucket.shape}")
    out = {}
    for b, name in enumerate(SIZE_NAMES):
        # VOC-style matrix: 1 = positive of this bucket, -1 = negative, 0 = dropped for this class
        y = np.where(positive, np.where(bucket == b, 1, 0), np.where(valid, -1, 0)).astype(np.int8)
        ap = average_precision_per_class(s, y, difficult="ignore")
        out[f"mAP_{name}"] = float(100.0 * np.nanmean(ap)) if not np.isnan(ap).all() else float("nan")
    return out


# ------------------------------------------------------------------------- F1
def relative_threshold_predictions(scores: ArrayLike, ratio: float = 0.5) -> np.ndarray:
    """Boolean (N, C): ``score > min + ratio * (max - min)`` per image (TagCLIP convention).

    Scale-free, so it suits uncalibrated logits of a text-trained head, where no fixed threshold transfers.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    s = _check_scores(scores)
    lo = s.min(axis=1, keepdims=True) if s.shape[1] else np.zeros((s.shape[0], 1))
    hi = s.max(axis=1, keepdims=True) if s.shape[1] else np.zeros((s.shape[0], 1))
    return s > lo + ratio * (hi - lo)


def _top_k_predictions(s: np.ndarray, k: int) -> np.ndarray:
    n, c = s.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= c:
        raise ValueError(f"top_k must be an integer in [1, {c}], got {k!r}")
    # Stable sort on the negated scores: among ties the lower class index wins, deterministically.
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    pred = np.zeros((n, c), dtype=bool)
    np.put_along_axis(pred, top, True, axis=1)
    return pred


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def multilabel_f1(
    scores: ArrayLike,
    labels: ArrayLike,
    top_k: int | None = None,
    threshold: float | None = None,
    difficult: str = "negative",
    predictions: ArrayLike | None = None,
) -> dict[str, float]:
    """Per-class (CP, CR, CF1) and overall (OP, OR, OF1) precision / recall / F1, in percent.

    Exactly one of ``top_k`` (k best classes per image), ``threshold`` (``score >= threshold``) or
    ``predictions`` (a boolean (N, C) matrix) decides what is predicted. Per class, ``Nc`` = correct,
    ``Np`` = predicted, ``Ng`` = ground-truth positives. As in the ML-GCN / TaI-DPT evaluation code, a
    class never predicted has its ``Np`` set to 1 (precision 0), in OP's denominator too. Classes
    without a positive are left out of CP and CR (with a warning, as for the mAP); the overall numbers
    count every class, since predictions on such a class are genuine false positives.
    """
    given = sum(x is not None for x in (top_k, threshold, predictions))
    if given != 1:
        raise ValueError("give exactly one of top_k, threshold, predictions")
    s, positive, valid = _prepare(scores, labels, difficult)
    if top_k is not None:
        pred = _top_k_predictions(s, top_k)
    elif threshold is not None:
        pred = s >= float(threshold)
    else:
        pred = _to_numpy(predictions, bool)
        if pred.shape != s.shape:
            raise ValueError(f"predictions must have the scores' shape {s.shape}, got {pred.shape}")

    n_correct = (pred & positive & valid).sum(axis=0).astype(np.float64)
    n_pred = (pred & valid).sum(axis=0).astype(np.float64)
    n_gt = (positive & valid).sum(axis=0).astype(np.float64)
    has_gt = n_gt > 0
    if not has_gt.any():
        raise ValueError("no class has a positive label: recall is undefined")
    if not has_gt.all():
        _classes_without_positive_warning(~has_gt, n_gt.size, "CP/CR/CF1")

    # ML-GCN / TaI-DPT replace Np = 0 by 1 before both CP and OP; kept so the numbers stay comparable.
    n_pred = np.maximum(n_pred, 1.0)
    cp = float(np.mean(n_correct[has_gt] / n_pred[has_gt]))
    cr = float(np.mean(n_correct[has_gt] / n_gt[has_gt]))
    op = float(n_correct.sum() / n_pred.sum())
    or_ = float(n_correct.sum() / n_gt.sum())
    return {
        "CP": 100.0 * cp,
        "CR": 100.0 * cr,
        "CF1": 100.0 * _f1(cp, cr),
        "OP": 100.0 * op,
        "OR": 100.0 * or_,
        "OF1": 100.0 * _f1(op, or_),
    }


def minmax(scores: Tensor) -> Tensor:
    """Min-max normalisation over the whole score matrix (not per class or image), as TaI-DPT's ensemble
    does."""
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo).clamp_min(1e-12)


def f1_at_k(scores: ArrayLike, labels: ArrayLike, k: int) -> dict[str, float]:
    """Precision, recall and F1 of the top-``k`` classes per image, pooled over all images (percent).

    The zero-shot multi-label definition (LESA, BiAM, DualCoOp ZSL/GZSL): every image predicts exactly k
    classes, P = correct / (N * k), R = correct / positives, F1 = 2PR / (P + R). Unlike ``OP@k`` of
    :func:`multilabel_f1` there is no per-class Np = 1 substitution. Only label 1 is positive.
    """
    s = _to_numpy(scores, np.float64)
    y = _to_numpy(labels, np.int64)
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be the same (N, C) shape")
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k={k} must lie in [1, {s.shape[1]}] (the number of classes)")
    positive = y == 1
    if not positive.any():
        raise ValueError("no positive label: recall is undefined")
    correct = float((_top_k_predictions(s, k) & positive).sum())
    p, r = correct / (s.shape[0] * k), correct / float(positive.sum())
    return {"P": 100.0 * p, "R": 100.0 * r, "F1": 100.0 * (2 * p * r / (p + r) if p + r > 0 else 0.0)}


def evaluate_scores(
    scores: ArrayLike,
    labels: ArrayLike,
    difficult: str = "negative",
    top_k: Sequence[int] = (3,),
    per_class: bool = False,
) -> dict[str, Any]:
    """``{"mAP", "CP@k", "CR@k", "CF1@k", "OP@k", "OR@k", "OF1@k"}`` for every k in ``top_k``; with
    ``per_class``, also ``"AP"``: the per-class AP array the mAP was averaged from (computed once)."""
    ap = average_precision_per_class(scores, labels, difficult=difficult)
    out: dict[str, Any] = {"mAP": _mean_ap(ap)}
    if per_class:
        out["AP"] = ap
    with warnings.catch_warnings():
        # the mAP already warned about classes without positives; say it once
        warnings.simplefilter("ignore")
        for k in top_k:
            for name, value in multilabel_f1(scores, labels, top_k=int(k), difficult=difficult).items():
                out[f"{name}@{k}"] = value
    return out


# ------------------------------------------------------------------ collector
class ScoreCollector(Metric):
    """Gathers raw (B, C) scores and labels over an epoch (and across DDP ranks); AP is computed once after.

    Why not ``torchmetrics.classification.MultilabelAveragePrecision``: it decides per ``update()``
    whether to apply a sigmoid (when any value of that batch lies outside [0, 1]). With raw CLIP logits
    one batch may fall inside [0, 1] and another not, so some batches get squashed and others not,
    which scrambles the ranking across batches and silently corrupts the mAP. Keeping raw scores and
    computing AP on their concatenation is exact.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor, indices: Tensor | None = None) -> None:
        """``indices`` (B,) are the samples' dataset positions: with them, ``compute`` drops the repeats that
        DDP's DistributedSampler pads with and returns dataset order, so metrics equal a single-process
        run."""
        if scores.ndim != 2 or scores.shape != labels.shape:
            raise ValueError(
                f"scores and labels must both be (B, C), got {tuple(scores.shape)} and {tuple(labels.shape)}"
            )
        # Stay on the module's device so DDP's all-gather (NCCL needs CUDA tensors) works; cast to save
        # memory.
        self.scores.append(scores.detach().float())
        self.labels.append(labels.detach().to(torch.int8))
        if indices is not None:
            self.indices.append(torch.as_tensor(indices, device=scores.device).long().view(-1))

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(scores float32, labels int8)`` concatenated over all updates (and ranks), on the CPU."""
        if isinstance(self.scores, list) and len(self.scores) == 0:
            return torch.empty(0, 0, dtype=torch.float32), torch.empty(0, 0, dtype=torch.int8)
        scores = dim_zero_cat(self.scores).float().cpu()
        labels = dim_zero_cat(self.labels).to(torch.int8).cpu()
        has_indices = not (isinstance(self.indices, list) and len(self.indices) == 0)
        if has_indices:
            indices = dim_zero_cat(self.indices).cpu()
            if len(indices) != len(scores):
                raise RuntimeError("indices were given for some batches only")
            unique, first = _first_occurrence(indices)
            scores, labels = scores[first], labels[first]
        return scores, labels


class RowCollector(Metric):
    """Per-sample rows of any width (image embeddings, for SPARC) over an epoch and across DDP ranks, returned
    in the order a :class:`ScoreCollector` fed the same batches returns its scores."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, rows: Tensor, indices: Tensor | None = None) -> None:
        if rows.ndim != 2:
            raise ValueError(f"rows must be (B, K), got {tuple(rows.shape)}")
        self.rows.append(rows.detach().float())
        if indices is not None:
            self.indices.append(torch.as_tensor(indices, device=rows.device).long().view(-1))

    def compute(self) -> Tensor:
        """(N, K) float32 on the CPU, repeats dropped and in dataset order when indices were given."""
        if isinstance(self.rows, list) and len(self.rows) == 0:
            return torch.empty(0, 0, dtype=torch.float32)
        rows = dim_zero_cat(self.rows).float().cpu()
        if not (isinstance(self.indices, list) and len(self.indices) == 0):
            indices = dim_zero_cat(self.indices).cpu()
            if len(indices) != len(rows):
                raise RuntimeError("indices were given for some batches only")
            rows = rows[_first_occurrence(indices)[1]]
        return rows


def _first_occurrence(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of ``indices`` and, for each, the position of its first occurrence."""
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return sorted_idx[keep], order[keep]
