"""Train the dual-branch heads on captions only, select on held-out images, test on the test split.

    dbtr-train                                   # the demo data and model (run `dbtr-demo` first)
    dbtr-train model=taskres_global seed=2       # a baseline, another seed
    dbtr-train -m model=dbtr,dual_noattn seed=1,2,3
    dbtr-train experiment=voc2007_captions clip.name_or_path=/weights/clip-b16 paths.data_dir=/data

Writes ``<run dir>/metrics.json`` (final numbers), ``.hydra/config.yaml`` and ``checkpoints/``.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from dbtr.utils.hydra_utils import CONFIG_DIR, instantiate, instantiate_group, run_identity, task_wrapper, to_container
from dbtr.utils.errors import ConfigError
from dbtr.utils.io import atomic_write_json
from dbtr.utils.progress import is_quiet, quiet_trainer_args, set_quiet
from dbtr.utils.report import print_metrics_table

log = logging.getLogger("dbtr")
# CLIP is frozen in eval mode on purpose; Lightning's reminder about eval-mode modules is noise here.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def _resolve_resume(ckpt_path: str | None, output_dir: Path) -> str | None:
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last but {last} does not exist: pass hydra.run.dir=<the run folder to resume> "
                "(a run writes checkpoints/last.ckpt after each epoch)"
            )
        return str(last)
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file (or pass ckpt_path=last)")
    return ckpt_path


def write_metrics(output_dir: Path, payload: dict[str, Any]) -> Path:
    path = atomic_write_json(output_dir / "metrics.json", payload)
    log.info("wrote %s", path)
    return path


def image_cache_dir(cfg: DictConfig) -> str | None:
    """Where image features are cached: a folder for ``cache_image_features=disk``, None for memory."""
    mode = cfg.get("cache_image_features")
    if mode not in (True, False, None, "memory", "disk"):
        raise ConfigError(f"cache_image_features must be false, memory (or true) or disk, got {mode!r}")
    if mode == "disk":
        if not cfg.get("cache_dir"):
            raise ConfigError("cache_image_features=disk needs cache_dir (a folder for the feature cache)")
        return str(cfg.cache_dir)
    return None


def write_data_report(output_dir: Path, datamodule) -> None:
    """``data_report.json``: what was evaluated per split, and every image dropped (missing, undecodable)."""
    report = datamodule.image_report()
    if report:
        atomic_write_json(output_dir / "data_report.json", report)
        dropped = {s: len(r["missing"]) + len(r["skipped"]) for s, r in report.items()}
        if any(dropped.values()):
            log.warning("images dropped from evaluation per split: %s (listed in data_report.json)", dropped)


def prepare_data_once(datamodule, trainer: L.Trainer, timeout_s: float = 3600.0) -> None:
    """Global rank 0 builds generated data; other ranks (started together under SLURM) wait for it."""
    if trainer.is_global_zero:
        datamodule.prepare_data()
        return
    is_built = getattr(datamodule, "is_built", None)
    deadline = time.monotonic() + timeout_s
    while is_built is not None and not is_built():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {trainer.global_rank}: data not built by rank 0 within {timeout_s:.0f} s")
        time.sleep(2.0)


def prepare_captions(cfg: DictConfig, datamodule, model, is_global_zero: bool, output_dir: Path,
                     timings: dict[str, float]) -> None:
    """Read (or build) the training captions, report them, and attach their cached text features."""
    from rich.console import Console

    from dbtr.data.captions import encode_caption_features
    from dbtr.data.feature_cache import cached_caption_features
    from dbtr.text.corpus import count_truncated, report_table

    datamodule.setup("fit")
    texts, encoder = datamodule.captions.texts, model.encoder
    truncated = count_truncated(encoder.tokenizer, texts, encoder.max_length)
    if truncated:
        log.warning("%d of %d captions exceed %d tokens and are truncated", truncated, len(texts), encoder.max_length)
    timings["captions_truncated"] = truncated
    if datamodule.corpus_report is not None and is_global_zero:
        datamodule.corpus_report.truncated = truncated
        atomic_write_json(output_dir / "corpus_report.json", datamodule.corpus_report.as_dict())
        if not is_quiet():
            Console().print(report_table(datamodule.corpus_report))
    if cfg.cache_caption_features:
        t0 = time.perf_counter()
        if cfg.get("cache_dir"):
            feats, status = cached_caption_features(encoder, texts, Path(cfg.cache_dir))
            log.info("caption features: %s (%d captions) in %s", status, len(texts), cfg.cache_dir)
        else:
            feats = encode_caption_features(encoder, texts, progress=True)
        datamodule.set_caption_features(feats)
        timings["cache_captions_s"] = time.perf_counter() - t0


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (unless training-free), test, and return ``(metrics, objects)``."""
    from dbtr.models.lit_module import DbtrLitModule

    set_quiet(cfg.get("quiet", False))
    timings: dict[str, float] = {}
    output_dir = Path(cfg.paths.output_dir)
    resume = _resolve_resume(cfg.get("ckpt_path"), output_dir) if cfg.train else None  # fail before any work
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    callbacks = instantiate_group(cfg.get("callbacks"))
    has_val = datamodule.has_val
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint) and cb.monitor and not has_val:
            log.warning("no validation split: keeping the last epoch (the test split is never used for selection)")
            cb.monitor = None
    no_val = {} if has_val else {"limit_val_batches": 0}
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # logger=none: Lightning's LearningRateMonitor refuses to run without a logger
        callbacks = [cb for cb in callbacks if not isinstance(cb, L.pytorch.callbacks.LearningRateMonitor)]
    callbacks, quiet_args = quiet_trainer_args(callbacks)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **no_val, **quiet_args)
    for logger in trainer.loggers:  # the resolved config, as in .hydra/config.yaml
        logger.log_hyperparams(to_container(cfg))

    t0 = time.perf_counter()
    prepare_data_once(datamodule, trainer)  # generated datasets (the toy world) are built on first use
    timings["prepare_data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subsets = {"class_subsets": datamodule.class_subsets} if datamodule.class_subsets else {}
    model: DbtrLitModule = instantiate(cfg.model, class_names=datamodule.class_names, **subsets)
    datamodule.attach_encoder(model.encoder)
    # Caches and T0 are built before fit: run the frozen CLIP on the accelerator Lightning will use.
    model.encoder.to(trainer.strategy.root_device)
    model.ensure_class_embeddings()
    timings["load_model_s"] = time.perf_counter() - t0

    if cfg.get("cache_image_features"):
        t0 = time.perf_counter()
        datamodule.setup("fit" if getattr(datamodule, "train_on", "captions") == "images" else "validate")
        if cfg.test:
            datamodule.setup("test")
        cache_dir = image_cache_dir(cfg)
        status = datamodule.cache_image_features(model.encoder, cache_dir=cache_dir)
        log.info("image features: %s", status)
        timings["cache_images_s"] = time.perf_counter() - t0

    best_ckpt, selection = None, {}
    if cfg.train and not model.head.trainable:
        log.info("model has no learnable residual (training-free baseline): skipping fit")
    elif cfg.train:
        if getattr(datamodule, "train_on", "captions") == "captions":
            prepare_captions(cfg, datamodule, model, trainer.is_global_zero, output_dir, timings)
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
        timings["fit_s"] = time.perf_counter() - t0
        callback = trainer.checkpoint_callback
        best_ckpt = (callback.best_model_path or None) if callback else None
        if callback is not None and callback.best_model_score is not None:
            selection = {"monitor": callback.monitor, "best_score": float(callback.best_model_score)}
    val_last = dict(model.results.get("val", {}))

    metrics: dict[str, Any] = {}
    if cfg.test:
        if best_ckpt:
            log.info("testing checkpoint %s", best_ckpt)
            class_embeds = model.head.class_embeds.clone()
            model = DbtrLitModule.load_from_checkpoint(best_ckpt, map_location="cpu", weights_only=True,
                                                       encoder=model.encoder)
            model.head.set_class_embeddings(class_embeds)  # same CLIP, classes and templates: no need to rebuild T0
        t0 = time.perf_counter()
        trainer.test(model, datamodule=datamodule, verbose=not is_quiet())
        timings["test_s"] = time.perf_counter() - t0
        metrics.update(model.results.get("test", {}))
        if trainer.is_global_zero:
            print_metrics_table(metrics, title=f"{cfg.task_name}: test metrics (%)")
    if trainer.is_global_zero:
        write_data_report(output_dir, datamodule)
        write_metrics(
            output_dir,
            {
                "task_name": cfg.task_name,
                "tags": list(cfg.tags),
                "seed": cfg.seed,
                "class_names": datamodule.class_names,
                "checkpoint": best_ckpt,
                "selection": selection,
                "val_last_epoch": val_last,
                "test": metrics,
                "timings": timings,
                "config": to_container(cfg),
                **run_identity(),  # choices + overrides: what dbtr-results groups and labels runs by
            },
        )
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer, "selection": selection,
                     "val_last": val_last}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    """Returns the selection metric (``optimized_metric``, default the best val/mAP) for sweepers such as Optuna."""
    from dbtr.utils.objective import optimized_value

    metrics, objects = task_wrapper(train)(cfg)
    return optimized_value(cfg.get("optimized_metric"), metrics, objects["selection"], objects["val_last"])


if __name__ == "__main__":
    main()
