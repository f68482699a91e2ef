"""Evaluate a trained checkpoint on a dataset's test split.

    dbtr-eval ckpt_path=logs/train/runs/<run>/checkpoints/epoch_004.ckpt     # the checkpoint train.py tested
    dbtr-eval ckpt_path=... experiment=toyworld                                # an experiment's data (and CLIP)
    dbtr-eval ckpt_path=... data=jsonl data.test_images=... clip=vit_b16 clip.name_or_path=/weights/clip-b16

The checkpoint's class list must equal the data's, its residuals must sit on the same CLIP weights (a hash
of the projections) and the image preprocessing must match training; ``allow_mismatch=true`` turns the last
two into warnings, for deliberate transfer experiments.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from dbtr.train import image_cache_dir, write_data_report, write_metrics
from dbtr.utils.progress import is_quiet, quiet_trainer_args, set_quiet
from dbtr.utils.report import print_metrics_table
from dbtr.utils.hydra_utils import CONFIG_DIR, instantiate, instantiate_group, run_identity, task_wrapper, to_container

log = logging.getLogger("dbtr")


def check_class_names(checkpoint_names: list[str], data_names: list[str], ckpt_path: str) -> None:
    from dbtr.models.lit_module import CheckpointMismatchError

    if list(checkpoint_names) == list(data_names):
        return
    only_ckpt = [n for n in checkpoint_names if n not in data_names]
    only_data = [n for n in data_names if n not in checkpoint_names]
    detail = f"only in checkpoint: {only_ckpt[:10]}; only in data: {only_data[:10]}"
    if not only_ckpt and not only_data:
        detail = "same names in a different order (label columns would be misaligned)"
    raise CheckpointMismatchError(
        f"{ckpt_path} was trained on {len(checkpoint_names)} classes, the data has {len(data_names)}: {detail}"
    )


def check_training_conditions(meta: dict, model, datamodule, ckpt_path: str, allow: bool) -> None:
    """Same CLIP weights and the same preprocessing as in training, or a clear error (a warning if ``allow``)."""
    from dbtr.models.lit_module import CheckpointMismatchError

    problems = []
    trained_on = meta.get("clip_fingerprint")
    if trained_on and trained_on != model.encoder.fingerprint():
        problems.append(
            f"the CLIP at {model.hparams.clip['name_or_path']!r} is not the one the residuals were trained on "
            f"(projection hash {model.encoder.fingerprint()} != {trained_on})"
        )
    prep = meta.get("preprocessing")
    if prep:
        now = {"image_size": int(datamodule.image_size), "mean": list(datamodule.mean), "std": list(datamodule.std)}
        diff = {k: (prep[k], now[k]) for k in prep if [prep[k]] != [now[k]] and not _close(prep[k], now[k])}
        if diff:
            problems.append(f"image preprocessing differs from training (trained, now): {diff}")
    if problems:
        message = f"{ckpt_path}: " + "; ".join(problems)
        if not allow:
            raise CheckpointMismatchError(message + ". Pass allow_mismatch=true to evaluate anyway.")
        log.warning(message)


def _close(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b))
    return False


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from dbtr.inference import read_checkpoint
    from dbtr.models.lit_module import DbtrLitModule

    set_quiet(cfg.get("quiet", False))
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = str(cfg.ckpt_path)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {ckpt_path}")
    hparams = read_checkpoint(ckpt_path)["hyper_parameters"]  # refuses non-dbtr and unsafe files in one line
    datamodule = instantiate(cfg.data)
    check_class_names(hparams["class_names"], datamodule.class_names, ckpt_path)
    overrides: dict[str, Any] = {}
    clip_over = {k: v for k, v in to_container(cfg.clip).items() if v is not None} if cfg.get("clip") else {}
    if clip_over:
        overrides["clip"] = {**hparams["clip"], **clip_over}
    eval_over = {k: v for k, v in to_container(cfg.evaluation).items() if v is not None}
    if eval_over:
        overrides["evaluation"] = {**(hparams.get("evaluation") or {}), **eval_over}
    model = DbtrLitModule.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
    datamodule.attach_encoder(model.encoder)
    check_training_conditions(
        torch.load(ckpt_path, map_location="cpu", weights_only=True).get("dbtr") or {}, model, datamodule, ckpt_path,
        bool(cfg.get("allow_mismatch", False)),
    )
    callbacks, quiet_args = quiet_trainer_args(instantiate_group(cfg.get("callbacks")))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False,
                                     **quiet_args)
    if cfg.get("cache_image_features"):
        cache_dir = image_cache_dir(cfg)
        datamodule.setup("test")
        model.encoder.to(trainer.strategy.root_device)
        log.info("image features: %s", datamodule.cache_image_features(model.encoder, ("test",), cache_dir=cache_dir))
    trainer.test(model, datamodule=datamodule, verbose=not is_quiet())
    metrics = model.results.get("test", {})
    if trainer.is_global_zero:
        write_data_report(Path(cfg.paths.output_dir), datamodule)
        print_metrics_table(metrics, title=f"{cfg.task_name}: test metrics (%)")
        write_metrics(
            Path(cfg.paths.output_dir),
            {
                "task_name": cfg.task_name,
                "checkpoint": ckpt_path,
                "class_names": datamodule.class_names,
                "test": metrics,
                "config": to_container(cfg),
                **run_identity(),  # choices + overrides: what dbtr-results groups and labels runs by
            },
        )
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = task_wrapper(evaluate)(cfg)
    return metrics.get("test/mAP")


if __name__ == "__main__":
    main()
