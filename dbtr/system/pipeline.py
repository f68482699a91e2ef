"""What dbtr-train and dbtr-eval share: the Trainer with its callbacks, data preparation, the run's
reports."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from dbtr.utils.hydra_utils import instantiate, instantiate_group, to_container
from dbtr.utils.io import atomic_write_json
from dbtr.utils.progress import quiet_trainer_args

log = logging.getLogger("dbtr")


def feature_caching(cfg: DictConfig, captions: bool = True):
    """The run's :class:`~dbtr.system.callbacks.FeatureCaching` from the top-level cache settings."""
    from dbtr.system.callbacks import FeatureCaching

    return FeatureCaching(
        captions=bool(cfg.get("cache_caption_features", False)) and captions,
        images=cfg.get("cache_image_features"),
        cache_dir=cfg.get("cache_dir") or None,
        output_dir=cfg.paths.output_dir,
    )


def build_trainer(cfg: DictConfig, extra_callbacks: list, has_val: bool = True) -> L.Trainer:
    """``cfg.trainer`` with the configured callbacks and loggers (plus ``extra_callbacks``); without a
    validation split the checkpoint keeps the last epoch (the test split is never used for selection)."""
    callbacks = instantiate_group(cfg.get("callbacks"))
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint) and cb.monitor and not has_val:
            log.warning(
                "no validation split: keeping the last epoch (the test split is never used for selection)"
            )
            cb.monitor = None
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # logger=none: Lightning's LearningRateMonitor refuses to run without a logger
        callbacks = [cb for cb in callbacks if not isinstance(cb, L.pytorch.callbacks.LearningRateMonitor)]
    callbacks, quiet_args = quiet_trainer_args([*extra_callbacks, *callbacks])
    no_val = {} if has_val else {"limit_val_batches": 0}
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **no_val, **quiet_args
    )
    for logger in trainer.loggers:  # the resolved config, as in .hydra/config.yaml
        logger.log_hyperparams(to_container(cfg))
    return trainer


def prepare_data_once(datamodule, trainer: L.Trainer, timeout_s: float = 3600.0) -> None:
    """Global rank 0 builds generated data; other ranks (started together under SLURM) wait for it."""
    if trainer.is_global_zero:
        datamodule.prepare_data()
        return
    is_built = getattr(datamodule, "is_built", None)
    deadline = time.monotonic() + timeout_s
    while is_built is not None and not is_built():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {trainer.global_rank}: data not built by rank 0 within {timeout_s:.0f} s"
            )
        time.sleep(2.0)


def write_data_report(output_dir: Path, datamodule) -> None:
    """``data_report.json``: what was evaluated per split, and every image dropped (missing, undecodable)."""
    report = datamodule.image_report()
    if report:
        atomic_write_json(Path(output_dir) / "data_report.json", report)
        dropped = {s: len(r["missing"]) + len(r["skipped"]) for s, r in report.items()}
        if any(dropped.values()):
            log.warning("images dropped from evaluation per split: %s (listed in data_report.json)", dropped)


def report_run(metrics: dict[str, Any], title: str, output_dir: Path) -> None:
    """The one console summary of a run: its test metrics table and the folder that holds the run."""
    from dbtr.utils.progress import run_folder_line
    from dbtr.utils.report import print_metrics_table

    if metrics:
        print_metrics_table(metrics, title=title)
    print(run_folder_line(output_dir), flush=True)
