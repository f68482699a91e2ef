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

from dbtr.system.pipeline import (
    build_trainer,
    feature_caching,
    prepare_data_once,
    report_run,
    write_data_report,
)
from dbtr.system.run_record import RunRecord
from dbtr.utils.hydra_utils import CONFIG_DIR, instantiate, run_identity, task_wrapper, to_container
from dbtr.utils.progress import set_quiet

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


def train(cfg: DictConfig, identity: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Instantiate, fit (unless training-free), test the selected weights; write ``metrics.json``.

    ``identity``: ``{"choices", "overrides"}`` of the run for callers outside a Hydra app (the toy-world
    demo); default Hydra's. Returns ``(test metrics, objects)``. Feature caching and T0 happen in Lightning's
    setup hooks (:class:`~dbtr.system.callbacks.FeatureCaching`, ``DbtrLitModule.setup``).
    """
    set_quiet(cfg.get("quiet", False))
    output_dir = Path(cfg.paths.output_dir)
    resume = _resolve_resume(cfg.get("ckpt_path"), output_dir) if cfg.train else None  # fail before any work
    L.seed_everything(cfg.seed, workers=True)
    timings: dict[str, float] = {}

    datamodule = instantiate(cfg.data)
    caching = feature_caching(cfg)
    trainer = build_trainer(cfg, [caching], has_val=datamodule.has_val)
    t0 = time.perf_counter()
    prepare_data_once(datamodule, trainer)  # generated datasets (the toy world) are built on first use
    timings["prepare_data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # what the data says of its classes beyond their names: subsets (seen / unseen) and, with
    # data.corpus.prompt_names=vocabulary, the text each class is prompted with
    extra = {"class_subsets": datamodule.class_subsets} if datamodule.class_subsets else {}
    if datamodule.prompt_names:
        extra["prompt_names"] = datamodule.prompt_names
    model = instantiate(cfg.model, class_names=datamodule.class_names, **extra)
    datamodule.attach_encoder(model.encoder)
    identity = {"choices": {}, "overrides": [], **(identity or run_identity())}
    model.run_info = {"task_name": cfg.task_name, "seed": cfg.seed, **identity}  # saved in every checkpoint
    timings["load_model_s"] = time.perf_counter() - t0
    if resume:  # safe loading, and the same classes and CLIP, before Lightning restores anything
        from dbtr.system.checkpoint import check_continues, read_checkpoint

        check_continues(read_checkpoint(resume), model.class_names, model.encoder, resume, "ckpt_path")

    best_ckpt, selection = None, {}
    if cfg.train and not model.head.trainable:
        log.info("model has no learnable residual (training-free baseline): skipping fit")
    elif cfg.train:
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
        t0 = time.perf_counter()
        # the selected weights, restored by Lightning into this model (same CLIP, classes, T0 and caches)
        trainer.test(model, datamodule=datamodule, ckpt_path=best_ckpt, verbose=False)
        timings["test_s"] = time.perf_counter() - t0
        metrics.update(model.results.get("test", {}))
    timings.update(caching.timings)
    if trainer.is_global_zero:
        write_data_report(output_dir, datamodule)
        RunRecord(
            kind="train",
            task_name=cfg.task_name,
            config=to_container(cfg),
            seed=cfg.seed,
            tags=list(cfg.tags),
            class_names=datamodule.class_names,
            test=metrics,
            checkpoint=best_ckpt,
            selection=selection,
            val_last_epoch=val_last,
            timings=timings,
            evaluation=dict(model.eval_cfg),
            **identity,  # choices + overrides: what dbtr-results groups by
        ).write(output_dir)
    return metrics, {
        "model": model,
        "datamodule": datamodule,
        "trainer": trainer,
        "selection": selection,
        "val_last": val_last,
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    """Returns the selection metric (``optimized_metric``, default the best val/mAP) for sweepers such as
    Optuna."""
    from dbtr.utils.objective import optimized_value

    metrics, objects = task_wrapper(train)(cfg)
    if objects["trainer"].is_global_zero:
        report_run(metrics, f"{cfg.task_name}: test metrics (%)", Path(cfg.paths.output_dir))
    return optimized_value(cfg.get("optimized_metric"), metrics, objects["selection"], objects["val_last"])


if __name__ == "__main__":
    main()
