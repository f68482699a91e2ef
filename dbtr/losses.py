"""Multi-label training losses with a known-label mask.

Every loss takes ``logits`` (B, C), ``targets`` (B, C) in {0, 1} and an optional boolean ``known`` (B, C)
(True = the label is known). Unknown entries are removed with ``torch.where`` rather than a multiply, so
they contribute exactly nothing and receive exactly zero gradient even when their logits are extreme.
Losses are computed in float32 whatever the logits' dtype (bf16 ranking margins are too coarse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dbtr.utils.errors import ConfigError

__all__ = ["LOSSES", "asymmetric_loss", "bce_loss", "get_loss", "ranking_loss", "split_labels"]


def split_labels(labels: Tensor | np.ndarray, signed: bool | None = None) -> tuple[Tensor, Tensor]:
    """Map a label matrix to ``(targets in {0., 1.}, known bool)``.

    ``{1, 0, -1}`` labels (1 positive, -1 negative, 0 unknown) -> targets ``labels == 1``, known
    ``labels != 0``. ``{0, 1}`` labels -> everything known. By default a matrix is read as signed iff it holds
    a -1; pass ``signed`` to force the reading (a small batch of signed labels may by chance hold no -1).
    """
    y = torch.as_tensor(labels)
    if y.dtype == torch.bool:
        y = y.to(torch.int8)
    bad = torch.unique(y[(y != -1) & (y != 0) & (y != 1)])
    if bad.numel():
        raise ValueError(f"labels must be in {{-1, 0, 1}}; found bad value(s): {bad[:10].tolist()}")
    if signed is None:
        signed = bool((y == -1).any())
    if signed:
        return (y == 1).float(), y != 0
    if (y == -1).any():
        raise ValueError("signed=False but the labels contain -1")
    return y.float(), torch.ones_like(y, dtype=torch.bool)


def _prepare(logits: Tensor, targets: Tensor, known: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    if known is None:
        known = torch.ones_like(logits, dtype=torch.bool)
    elif known.shape != logits.shape:
        raise ValueError(
            f"known shape {tuple(known.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    z = logits.float()
    return z, targets.to(device=z.device, dtype=z.dtype), known.to(device=z.device, dtype=torch.bool)


def ranking_loss(logits: Tensor, targets: Tensor, known: Tensor | None = None, margin: float = 1.0) -> Tensor:
    """TaI-DPT ranking loss: per sample ``sum_{i pos, j neg} max(0, margin - z_i + z_j)``, mean over the
    batch.

    Samples without any (known positive, known negative) pair add 0 but still count in the mean.
    Computed without the (B, C, C) pair tensor: with the negatives sorted, positive i's hinges sum to
    ``S_i - n_i (z_i - margin)``, where n_i negatives (sum S_i) lie above ``z_i - margin`` (a suffix sum found
    by binary search), in float64 so the subtraction loses nothing against the per-pair sum.
    """
    z, y, k = _prepare(logits, targets, known)
    pos = k & (y > 0.5)
    neg = k & (y <= 0.5)
    z64 = z.double()
    ranked = torch.where(neg, z64, float("-inf")).sort(dim=1).values  # non-negatives first, as -inf
    values = torch.where(torch.isfinite(ranked), ranked, torch.zeros((), dtype=z64.dtype, device=z.device))
    suffix = F.pad(values.flip(1).cumsum(1).flip(1), (0, 1))  # suffix[b, r] = sum of ranked[b, r:]
    threshold = z64 - margin
    first = torch.searchsorted(ranked.detach(), threshold.detach(), right=True)  # first negative > threshold
    per_pos = suffix.gather(1, first) - (z.shape[1] - first) * threshold
    return torch.where(pos, per_pos, torch.zeros_like(per_pos)).sum(1).mean().to(z.dtype)


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    known: Tensor | None = None,
    gamma_neg: float = 2.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-8,
) -> Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021), summed per sample and averaged over the batch.

    Negatives use the shifted probability ``p_m = max(p - clip, 0)``, which hard-thresholds very easy
    negatives; the focusing weights keep their gradient (the paper's default).
    """
    z, y, k = _prepare(logits, targets, known)
    p = torch.sigmoid(z)
    p_neg = (p - clip).clamp(min=0) if clip is not None and clip > 0 else p
    loss_pos = (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=eps))
    loss_neg = p_neg.pow(gamma_neg) * torch.log((1 - p_neg).clamp(min=eps))
    per_entry = y * loss_pos + (1 - y) * loss_neg
    per_entry = torch.where(k, per_entry, torch.zeros_like(per_entry))
    return -per_entry.sum() / z.shape[0]


def bce_loss(logits: Tensor, targets: Tensor, known: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits, averaged over the known entries (0, still on the graph, if none)."""
    z, y, k = _prepare(logits, targets, known)
    per_entry = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    per_entry = torch.where(k, per_entry, torch.zeros_like(per_entry))
    return per_entry.sum() / k.sum().clamp(min=1)


LOSSES: dict[str, Callable[..., Tensor]] = {"ranking": ranking_loss, "asl": asymmetric_loss, "bce": bce_loss}


def get_loss(name: str) -> Callable[..., Any]:
    """Look a loss up by name (``ranking`` | ``asl`` | ``bce``)."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}") from None
