"""The optimizer and the learning-rate schedule of the heads: a constant warm-up, then cosine
(TaI-DPT / Dassl)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from dbtr.utils.errors import ConfigError

log = logging.getLogger("dbtr")

OPTIMIZER_DEFAULTS = {"name": "adam", "lr": 2e-4, "weight_decay": 5e-4, "momentum": 0.9}
SCHEDULER_DEFAULTS = {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "interval": "step"}
SCHEDULER_INTERVALS = ("step", "epoch")


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up steps; a warm-up that would cover the whole run (``trainer.max_epochs=1`` with one warm-up
    epoch) is shortened to half the run, with a one-line notice, instead of failing after all the caching."""
    warmup = round(warmup_epochs * steps_per_epoch)
    if warmup >= total_steps:
        short = total_steps // 2
        log.warning(
            "model.scheduler.warmup_epochs=%s covers the whole run (%d steps, %d per epoch): warm-up "
            "shortened to %d steps (set model.scheduler.warmup_epochs=0 to skip it)",
            warmup_epochs,
            total_steps,
            steps_per_epoch,
            short,
        )
        return short
    return warmup


def dassl_cosine_factor(epoch: int, max_epochs: int, warmup_epochs: int, warmup_ratio: float) -> float:
    """Dassl's schedule as TaI-DPT ran it (``scheduler.interval: epoch``): the lr of ``epoch`` over the base
    lr. ``warmup_ratio`` (= WARMUP_CONS_LR / LR) for the first ``warmup_epochs``, then
    ``CosineAnnealingLR(T_max=MAX_EPOCH)`` started after the warm-up and stepped once per epoch,
    ``(1 + cos(pi (epoch - warmup) / max_epochs)) / 2``. The period is all ``max_epochs``, so the last epoch
    still runs at 2.4 % of the lr (20 epochs, 1 warm-up), where the per-step schedule reaches 0."""
    if epoch < warmup_epochs:
        return warmup_ratio
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max(1, max_epochs)))


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    cfg: dict[str, Any] | None = None,
    sched_cfg: dict[str, Any] | None = None,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
):
    """What ``configure_optimizers`` returns: the optimizer alone (constant lr) or with a schedule, stepped
    per optimizer step (``interval: step``: constant warm-up, then a cosine reaching 0 at the last step) or
    per epoch (``interval: epoch``: :func:`dassl_cosine_factor`)."""
    params = list(params)
    if not params:
        raise RuntimeError(
            "this head has no learnable residual (both residuals off): evaluate it with train=false"
        )
    cfg = {**OPTIMIZER_DEFAULTS, **(cfg or {})}
    sched = {**SCHEDULER_DEFAULTS, **(sched_cfg or {})}
    name = cfg["name"].lower()
    if name == "adam":
        opt = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    elif name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    elif name == "sgd":
        opt = torch.optim.SGD(
            params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=cfg["momentum"]
        )
    else:
        raise ConfigError(f"model.optimizer.name must be adam, adamw or sgd, got {cfg['name']!r}")
    if sched["name"] == "constant":
        return opt
    if sched["name"] != "cosine":
        raise ConfigError(f"model.scheduler.name must be cosine or constant, got {sched['name']!r}")
    if cfg["lr"] <= 0:
        raise ConfigError(f"model.optimizer.lr must be > 0, got {cfg['lr']}")
    if sched.get("interval", "step") not in SCHEDULER_INTERVALS:
        raise ConfigError(
            f"model.scheduler.interval must be one of {', '.join(SCHEDULER_INTERVALS)}, got "
            f"{sched.get('interval')!r}"
        )
    if total_steps is None or steps_per_epoch is None:
        raise ValueError("a cosine schedule needs total_steps and steps_per_epoch")
    ratio = sched["warmup_lr"] / cfg["lr"]
    if sched.get("interval") == "epoch":
        epochs = max(1, round(int(total_steps) / max(1, int(steps_per_epoch))))
        warm = int(sched["warmup_epochs"])
        if warm != sched["warmup_epochs"] or warm < 0:
            raise ConfigError(
                "model.scheduler.interval=epoch steps once per epoch: warmup_epochs must be a whole number "
                f">= 0, got {sched['warmup_epochs']}"
            )
        if warm and warm >= epochs:
            log.warning(
                "model.scheduler.warmup_epochs=%d covers the whole run (%d epochs): warm-up shortened to %d",
                warm,
                epochs,
                epochs // 2,
            )
            warm = epochs // 2
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda epoch: dassl_cosine_factor(epoch, epochs, warm, ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
    total = max(1, int(total_steps))
    warmup = warmup_steps(sched["warmup_epochs"], max(1, int(steps_per_epoch)), total)

    def factor(step: int) -> float:
        if step < warmup:  # Dassl's constant warm-up
            return ratio
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
