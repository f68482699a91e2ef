"""Lightning callbacks of dbtr: the test-time plots, saved as PNG and sent to wandb when it is a logger."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch

from dbtr.utils.errors import ConfigError

log = logging.getLogger("dbtr")


class EvalPlots(L.Callback):
    """After a test run: per-class AP, precision-recall curves and local-attention heatmaps.

    PNG files go to ``dirpath`` whatever the logger (so nothing needs wandb to be seen); a wandb logger also
    gets them as images, plus the per-class AP as a ``wandb.Table``.

    :param dirpath: output folder (``<run>/plots``).
    :param num_images: test images drawn in ``heatmaps.png`` (the first ones of the split).
    :param top_k: classes per image in the heatmaps (the best-scored ones). Where the labels file has
        ``boxes`` (the toy world), the true boxes are drawn on the image and on the panel of their class.
    """

    def __init__(self, dirpath: str, num_images: int = 4, top_k: int = 3):
        self.dirpath, self.num_images, self.top_k = Path(dirpath), int(num_images), int(top_k)

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or "test" not in pl_module.eval_scores:
            return
        from dbtr.metrics import average_precision_per_class, precision_recall_curves
        from dbtr.system.viz import per_class_ap_figure, pr_curves_figure, save_figure

        scores, labels = pl_module.eval_scores["test"]
        names, difficult = pl_module.class_names, pl_module.eval_cfg["difficult"]
        ap = average_precision_per_class(scores, labels, difficult=difficult)
        paths = {
            "per_class_ap": save_figure(
                per_class_ap_figure(names, ap, title="test per-class AP"), self.dirpath / "per_class_ap.png"
            ),
            "pr_curves": save_figure(
                pr_curves_figure(names, precision_recall_curves(scores, labels, difficult)),
                self.dirpath / "pr_curves.png",
            ),
        }
        heatmaps = self._heatmaps(trainer, pl_module)
        if heatmaps is not None:
            paths["heatmaps"] = heatmaps
        log.info("plots written to %s", self.dirpath)
        self._to_wandb(trainer, names, ap, paths)

    @torch.no_grad()
    def _heatmaps(self, trainer: L.Trainer, pl_module) -> Path | None:
        from dbtr.data.images import ClipImageTransform, load_image
        from dbtr.system.lit_module import attention_grid
        from dbtr.system.viz import crop_boxes, heatmap_figure, read_boxes, save_figure, top_panels

        dm = trainer.datamodule
        records = getattr(dm, "test_records", None)
        if not pl_module.head.use_local or records is None or self.num_images <= 0:
            return None
        transform = ClipImageTransform(dm.image_size, dm.mean, dm.std)
        files = records.file_names[: self.num_images]
        images = [load_image(records.root / f) for f in files]
        labels_file = getattr(dm, "test_labels", None)
        boxes = read_boxes(labels_file, files) if labels_file and str(labels_file).endswith(".jsonl") else {}
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module(torch.stack([transform(im) for im in images]).to(pl_module.device))
        pl_module.train(was_training)
        scores, attention = (
            out.logits.float().cpu().numpy(),
            attention_grid(out.local_attention).cpu().numpy(),
        )
        k = min(self.top_k, len(pl_module.class_names))
        names, rows = pl_module.class_names, []
        for i, (file, image) in enumerate(zip(files, images)):
            true = np.flatnonzero(records.labels[i] == 1).tolist()
            shown = crop_boxes(boxes.get(file, []), image.size, transform.size, names)
            rows.append(
                (
                    transform.crop(image),
                    top_panels(names, scores[i], attention[i], k, marks=true, boxes=shown),
                    shown,
                )
            )
        title = f"local-branch attention, top-{k} classes (✓ = true label" + (
            "; boxes: true objects)" if boxes else ")"
        )
        return save_figure(
            heatmap_figure(rows, title=title, class_names=names), self.dirpath / "heatmaps.png"
        )

    @staticmethod
    def _to_wandb(trainer: L.Trainer, names, ap: np.ndarray, paths: dict[str, Path]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[n, None if math.isnan(a) else round(100.0 * float(a), 4)] for n, a in zip(names, ap)]
                logger.log_table("test/per_class_AP", columns=["class", "AP"], data=rows)
                for key, path in paths.items():
                    logger.log_image(f"plots/{key}", [str(path)])


class FeatureCaching(L.Callback):
    """What the frozen CLIP sees, encoded once per run in the ``setup`` hook (after the datamodule's own
    setup, on the device Lightning runs on): the training captions at ``fit`` (with their corpus report and
    truncation count) and the image splits of each stage. dbtr-train and dbtr-eval add it themselves, whatever
    ``callbacks=`` says.

    :param captions: encode the training captions once (steps then run no text-encoder forward).
    :param images: ``false`` | ``memory`` (or true) | ``disk`` (fingerprinted fp16 cache under ``cache_dir``).
    :param cache_dir: the on-disk cache folder (captions, and images with ``images=disk``); None = memory
        only.
    :param output_dir: where ``corpus_report.json`` goes (a corpus-built caption set).
    """

    def __init__(
        self,
        captions: bool = True,
        images: bool | str | None = False,
        cache_dir: str | None = None,
        output_dir: str | None = None,
    ):
        if images not in (True, False, None, "memory", "disk"):
            raise ConfigError(f"cache_image_features must be false, memory (or true) or disk, got {images!r}")
        if images == "disk" and not cache_dir:
            raise ConfigError("cache_image_features=disk needs cache_dir (a folder for the feature cache)")
        self.captions, self.images, self.cache_dir = bool(captions), images, cache_dir
        self.output_dir = Path(output_dir) if output_dir else None
        self.timings: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        import time

        dm, encoder = trainer.datamodule, pl_module.encoder
        dm.attach_encoder(encoder)
        encoder.to(trainer.strategy.root_device)  # T0 (the module's setup, next) is built there too
        if stage == "fit" and dm.train_on == "captions":
            self._captions(trainer, dm, encoder)
        if self.images:
            t0 = time.perf_counter()
            status = dm.cache_image_features(
                encoder, cache_dir=self.cache_dir if self.images == "disk" else None
            )
            if status:
                log.info("image features: %s", status)
                self.timings["cache_images_s"] = (
                    self.timings.get("cache_images_s", 0.0) + time.perf_counter() - t0
                )

    def _captions(self, trainer: L.Trainer, dm, encoder) -> None:
        import time

        from dbtr.data.captions import encode_caption_features
        from dbtr.data.corpus import count_truncated, report_table
        from dbtr.data.feature_cache import cached_caption_features
        from dbtr.utils.io import atomic_write_json
        from dbtr.utils.progress import is_quiet

        texts = dm.captions.texts
        truncated = count_truncated(encoder.tokenizer, texts, encoder.max_length)
        if truncated:
            log.warning(
                "%d of %d captions exceed %d tokens and are truncated",
                truncated,
                len(texts),
                encoder.max_length,
            )
        self.timings["captions_truncated"] = truncated
        if dm.corpus_report is not None and trainer.is_global_zero:
            dm.corpus_report.truncated = truncated
            if self.output_dir is not None:
                atomic_write_json(self.output_dir / "corpus_report.json", dm.corpus_report.as_dict())
            if not is_quiet():
                from rich.console import Console

                Console().print(report_table(dm.corpus_report))
        if self.captions and dm.caption_features is None:
            t0 = time.perf_counter()
            if self.cache_dir:
                feats, status = cached_caption_features(encoder, texts, Path(self.cache_dir))
                log.info("caption features: %s (%d captions) in %s", status, len(texts), self.cache_dir)
            else:
                feats = encode_caption_features(encoder, texts, progress=True)
            dm.set_caption_features(feats)
            self.timings["cache_captions_s"] = time.perf_counter() - t0
