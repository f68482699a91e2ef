"""Evaluate a trained checkpoint on a dataset's test split.

    dbtr-eval ckpt_path=logs/train/runs/<run>/checkpoints/epoch_004.ckpt   # the checkpoint train.py tested
    dbtr-eval ckpt_path=... experiment=toyworld                              # an experiment's data (and CLIP)
    dbtr-eval ckpt_path=... data=jsonl data.test_images=... clip=vit_b16 clip.name_or_path=/weights/clip-b16

The checkpoint's class list must equal the data's, its residuals must sit on the same CLIP weights (a hash
of the projections) and the image preprocessing must match training (checks of
:mod:`dbtr.system.checkpoint`); ``allow_mismatch=true`` turns the last two into warnings, for deliberate
transfer experiments. Metric conventions are ``model.evaluation.*`` (null = as stored in the checkpoint), the
same path as in training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from dbtr.system.pipeline import build_trainer, feature_caching, report_run, write_data_report
from dbtr.system.run_record import RunRecord
from dbtr.utils.errors import ConfigError
from dbtr.utils.hydra_utils import (
    CONFIG_DIR,
    instantiate,
    override_key,
    run_identity,
    task_wrapper,
    to_container,
)
from dbtr.utils.progress import set_quiet

log = logging.getLogger("dbtr")


def refuse_model_overrides(overrides: list[str]) -> None:
    """A trained checkpoint's model is what it stored: only ``model.evaluation.*`` (how it is scored) can
    change. Anything else would be recorded as applied while the checkpoint's value is used."""
    bad = [
        o
        for o in overrides
        if (key := override_key(o)) == "model"
        or (key.startswith("model.") and not key.startswith("model.evaluation"))
    ]
    if bad:
        raise ConfigError(
            f"dbtr-eval cannot apply {', '.join(bad)}: the model's settings are stored in the checkpoint "
            "and always come from it. Only model.evaluation.* (difficult, top_k, f1_at, val_subset) "
            "change how it is scored; to change the model, train it with dbtr-train."
        )


def clip_overrides(clip: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The CLIP settings that replace the checkpoint's: where the weights are (``clip.name_or_path``, from any
    config: it is machine-specific and checked by fingerprint), and the rest only when set on the command line
    (``clip=<group>`` or ``clip.<field>=``). An experiment's clip group must not silently change, say, the
    dense mode the checkpoint was trained and selected with."""
    keys = {override_key(o) for o in overrides}
    if "clip" in keys:
        return dict(clip)
    return {k: v for k, v in clip.items() if k == "name_or_path" or f"clip.{k}" in keys}


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the checkpoint (:func:`dbtr.load_checkpoint`), check it against the data, test; write
    ``metrics.json``."""
    from dbtr.system.checkpoint import Preprocessing, check_class_names, check_preprocessing, load_checkpoint

    set_quiet(cfg.get("quiet", False))
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = str(cfg.ckpt_path)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {ckpt_path}")
    overrides = run_identity().get("overrides", [])
    refuse_model_overrides(overrides)
    datamodule = instantiate(cfg.data)
    allow = bool(cfg.get("allow_mismatch", False))
    clip_over = clip_overrides(to_container(cfg.clip) if cfg.get("clip") else {}, overrides)
    eval_over = to_container(cfg.model.evaluation) if cfg.get("model") and cfg.model.get("evaluation") else {}
    loaded = load_checkpoint(ckpt_path, clip=clip_over, allow_mismatch=allow, evaluation=eval_over)
    check_class_names(loaded.trained_classes, datamodule.class_names, ckpt_path)
    model = loaded.model.train(False)
    datamodule.attach_encoder(model.encoder)
    check_preprocessing(loaded.preprocessing, Preprocessing.of(datamodule), ckpt_path, allow)
    caching = feature_caching(cfg, captions=False)
    trainer = build_trainer(cfg, [caching])
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = model.results.get("test", {})
    if trainer.is_global_zero:
        write_data_report(Path(cfg.paths.output_dir), datamodule)
        RunRecord(
            kind="eval",
            task_name=cfg.task_name,
            config={**to_container(cfg), "clip": dict(model.hparams.clip)},
            seed=cfg.seed,
            tags=list(cfg.tags),
            class_names=datamodule.class_names,
            test=metrics,
            checkpoint=ckpt_path,
            timings=caching.timings,
            evaluation=dict(model.eval_cfg),
            source=loaded.meta.get("run"),
            **{"choices": {}, "overrides": [], **run_identity()},
        ).write(Path(cfg.paths.output_dir))
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics, objects = task_wrapper(evaluate)(cfg)
    if objects["trainer"].is_global_zero:
        report_run(metrics, f"{cfg.task_name}: test metrics (%)", Path(cfg.paths.output_dir))
    return metrics.get("test/mAP")


if __name__ == "__main__":
    main()
