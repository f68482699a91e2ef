"""LightningDataModule for text-only training and image evaluation on one label space."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from dbtr.data.captions import (
    CaptionCollate,
    CaptionDataset,
    CaptionFeatures,
    CaptionRecords,
    features_on_device,
    read_caption_jsonl,
)
from dbtr.data.images import (
    BAD_IMAGE_HINT,
    BAD_IMAGE_POLICIES,
    CLIP_MEAN,
    CLIP_STD,
    CachedImageDataset,
    ClipImageTransform,
    ImageDataset,
    ImageDecodeError,
    ImageFeatures,
    ImageRecords,
    check_image_header,
    encode_image_features,
    read_image_jsonl,
)
from dbtr.data.labels import COCO_AREA_THRESHOLDS, load_class_names
from dbtr.data.sampling import GlobalBatchSampler
from dbtr.utils.errors import ConfigError, choice_error
from dbtr.utils.seeding import run_seed

log = logging.getLogger(__name__)


class TextToImageDataModule(L.LightningDataModule):
    """Captions (JSON lines) for training; labelled image folders for validation and test.

    :param classes: class names, or a text file with one per line (the order defines the label columns).
    :param train_captions: ``{"text", "labels"}`` JSON-lines file (text-only training).
    :param corpus: instead of ``train_captions``, captions labelled by synonym matching (see
        :func:`dbtr.data.corpus.load_corpus`); without ``classes``, the vocabulary's classes are used.
    :param val_images / val_labels: held-out labelled images for model selection (never the test set).
    :param test_images / test_labels: the evaluation set, used only by the final test and ``dbtr-eval``.
    :param image_size: input resolution; ``None`` = the CLIP model's own (set by ``attach_encoder``).
    :param mean / std: image normalisation; ``None`` (both) = the CLIP model's own, set by ``attach_encoder``
        (CLIP's; SigLIP's 0.5, 0.5).
    :param batch_size: captions per training step, over all devices; ``eval_batch_size``: images per step and
        device.
    :param drop_last: leave out each epoch's last, incomplete caption batch (TaI-DPT's loader does, when
        there is at least one full batch).
    :param on_bad_image: ``error`` stops at an undecodable image (naming it); ``skip`` drops it from
        evaluation, and it is counted and listed in ``image_report()`` (written to the run folder as
        ``data_report.json``).
    :param fast_decode: JPEG draft-mode decoding (see :class:`ClipImageTransform`); off = exact CLIP
        preprocessing.
    :param size_thresholds: box areas (px^2) separating small / medium / large objects for the per-size mAPs
        (``test/mAP_small`` ...), reported when the labels carry boxes; default COCO's 32^2 and 96^2.
    """

    #: what ``fit`` trains on: ``captions`` (text-only, the zero-shot protocol) or ``images`` (labelled
    #: images; benchmark datamodules, ``data.train_on=images``). Decides what is encoded and cached before
    #: fitting.
    train_on: Literal["captions", "images"] = "captions"

    def __init__(
        self,
        classes: str | Sequence[str] | None = None,
        train_captions: str | None = None,
        corpus: dict | None = None,
        val_images: str | None = None,
        val_labels: str | None = None,
        test_images: str | None = None,
        test_labels: str | None = None,
        image_size: int | None = None,
        batch_size: int = 512,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        on_bad_image: str = "error",
        fast_decode: bool = False,
        size_thresholds: Sequence[float] = COCO_AREA_THRESHOLDS,
        drop_last: bool = False,
    ):
        super().__init__()
        if classes is None:
            if corpus is None:
                raise ConfigError("data.classes is required (or a data.corpus whose vocabulary defines them)")
            from dbtr.data.corpus import resolve_vocabulary

            classes = resolve_vocabulary(corpus["vocabulary"]).class_names
        if corpus is not None and train_captions is not None:
            raise ConfigError("give data.train_captions or data.corpus, not both")
        self.class_names = load_class_names(
            classes if isinstance(classes, (str, os.PathLike)) else list(classes)
        )
        #: ``{class: prompt text}`` for the model (``data.corpus.prompt_names=vocabulary``), else None
        self.prompt_names: dict[str, str] | None = None
        if corpus is not None:
            from dbtr.data.corpus import corpus_prompt_names

            self.prompt_names = corpus_prompt_names(corpus, self.class_names)
        self.drop_last = bool(drop_last)
        self.corpus, self.corpus_report = corpus, None
        self.train_captions = train_captions
        self.val_images, self.val_labels = val_images, val_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.global_batch_size = batch_size
        # None = the image tower's own normalisation (CLIP's; SigLIP's 0.5), taken by attach_encoder
        self._own_normalisation = mean is None and std is None
        self.num_workers = num_workers
        self.mean = tuple(CLIP_MEAN if mean is None else mean)
        self.std = tuple(CLIP_STD if std is None else std)
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise choice_error("data.on_bad_image", on_bad_image, BAD_IMAGE_POLICIES)
        self.on_bad_image, self.fast_decode = on_bad_image, bool(fast_decode)
        self.size_thresholds = tuple(float(t) for t in size_thresholds)
        if len(self.size_thresholds) != 2 or not 0 < self.size_thresholds[0] < self.size_thresholds[1]:
            raise ConfigError(
                f"data.size_thresholds must be two areas in px^2, small/medium < medium/large, got "
                f"{list(size_thresholds)}"
            )
        self._scanned: set[str] = set()
        self._headers_checked: set[str] = set()
        self.captions: CaptionRecords | None = None
        self.caption_features: CaptionFeatures | None = None
        self.val_records: ImageRecords | None = None
        self.test_records: ImageRecords | None = None
        self.image_features: dict[str, ImageFeatures] = {}
        self._per_device = False  # batch_size already divided among DDP processes
        self.collate = CaptionCollate()
        for a, b, what in ((val_images, val_labels, "val"), (test_images, test_labels, "test")):
            if (a is None) != (b is None):
                raise ConfigError(f"data.{what}_images and data.{what}_labels must be given together")

    def object_areas(self, split: str) -> tuple[np.ndarray, tuple[float, float]] | None:
        """``(areas (N, C), size_thresholds)`` of a split whose labels carry boxes, else None."""
        records = self._records(split)
        if records is None or records.areas is None:
            return None
        return records.areas, self.size_thresholds

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_val(self) -> bool:
        """Whether a labelled validation split exists for model selection (never the test split)."""
        return self.val_images is not None

    def read_images(self, split: str) -> ImageRecords | None:
        """The labelled images of ``val`` or ``test`` (subclasses read native dataset layouts)."""
        images, labels = {
            "val": (self.val_images, self.val_labels),
            "test": (self.test_images, self.test_labels),
        }[split]
        return None if images is None else read_image_jsonl(images, labels, self.class_names)

    @property
    def class_subsets(self) -> dict[str, list[str]]:
        """Named subsets of the classes that the test also reports on (e.g. seen / unseen)."""
        return {}

    @property
    def image_splits(self) -> tuple[str, ...]:
        """The splits served as images (their features can be cached)."""
        return ("val", "test")

    def _records(self, split: str) -> ImageRecords | None:
        return getattr(self, f"{split}_records", None)

    def _set_records(self, split: str, records: ImageRecords) -> None:
        setattr(self, f"{split}_records", records)

    def image_report(self) -> dict:
        """Per evaluated split: counts per class and the images dropped (missing on disk, undecodable)."""
        from dbtr.data.images import describe

        return {
            split: describe(rec) for split in ("val", "test") if (rec := self._records(split)) is not None
        }

    def attach_encoder(self, encoder) -> None:
        """Take the tokenizer and, unless set, the input size and normalisation from the CLIP encoder."""
        self.collate = CaptionCollate(encoder.tokenizer, encoder.max_length)
        if self.image_size is None:
            self.image_size = encoder.image_size
        # a backbone trained with another normalisation than CLIP's says so (SigLIP: image_mean / image_std)
        if self._own_normalisation and getattr(encoder, "image_mean", None) is not None:
            self.mean, self.std = tuple(encoder.image_mean), tuple(encoder.image_std)

    def set_caption_features(self, features: CaptionFeatures) -> None:
        self.caption_features = features

    def cache_image_features(
        self, encoder, splits: Sequence[str] | None = None, cache_dir: str | None = None
    ) -> dict[str, str]:
        """Encode the listed image splits once; their loaders then serve features instead of pixels.

        With ``cache_dir`` the features go to the fingerprinted on-disk cache (fp16, memory-mapped) and later
        runs on the same model, preprocessing and images read them back; without it they stay in memory
        (fp32). Returns the cache status per split (hit / built / rebuilt / memory).
        """
        from dbtr.data.feature_cache import cached_image_features

        status = {}
        for split in splits or self.image_splits:
            records = self._records(split)
            if records is None or split in self.image_features:
                continue
            loader = self._pixel_loader(records)
            if cache_dir:
                feats, ok, status[split] = cached_image_features(
                    encoder, loader, cache_dir, progress=f"{split} images"
                )
            else:
                feats, ok = encode_image_features(encoder, loader, progress=f"{split} images")
                status[split] = "memory"
            self._set_records(split, self._drop_bad(records, ok))
            self.image_features[split] = feats
            self._scanned.add(split)
        return status

    def _pixel_loader(
        self, records: ImageRecords, scan: bool = False, batch_size: int | None = None, shuffle: bool = False
    ) -> DataLoader:
        return DataLoader(
            ImageDataset(records, self._transform(), "skip" if scan else self.on_bad_image),
            batch_size=batch_size or self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and not scan,
        )

    def _drop_bad(self, records: ImageRecords, ok: np.ndarray) -> ImageRecords:
        if ok.all():
            return records
        bad = [n for n, good in zip(records.file_names, ok) if not good]
        log.warning(
            "%d of %d images cannot be decoded and are skipped (listed in data_report.json): %s",
            len(bad),
            len(ok),
            ", ".join(bad[:3]),
        )
        out = records.subset(np.flatnonzero(ok))
        out.skipped = records.skipped + bad
        return out

    def scan_images(self, split: str) -> None:
        """Decode every image of ``split`` once: undecodable ones are dropped (on_bad_image=skip) or raise."""
        records = self._records(split)
        if records is None or split in self._scanned:
            return
        ok = np.zeros(len(records), dtype=bool)
        for batch in self._pixel_loader(records, scan=self.on_bad_image == "skip"):
            ok[batch["index"].numpy()] = batch["ok"].numpy().astype(bool)
        self._set_records(split, self._drop_bad(records, ok))
        self._scanned.add(split)

    def check_image_headers(self, splits: Sequence[str] = ("val", "test")) -> None:
        """Open every image of ``splits`` without decoding it, so that an unreadable file (not an image, zero
        size, over the decompression-bomb limit) stops the run before training, not after it;
        on_bad_image=skip drops and counts it instead. Splits already decoded (scanned, cached) are not
        checked again."""
        for split in splits:
            records = self._records(split)
            if records is None or split in self._scanned or split in self._headers_checked:
                continue
            ok = np.ones(len(records), dtype=bool)
            for i, name in enumerate(records.file_names):
                try:
                    check_image_header(records.root / name)
                except ImageDecodeError as err:
                    if self.on_bad_image == "error":
                        raise ImageDecodeError(f"{err}; {BAD_IMAGE_HINT}") from None
                    ok[i] = False
            self._set_records(split, self._drop_bad(records, ok))
            self._headers_checked.add(split)

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and not self._per_device:
            # data.batch_size is the global batch (TaI-DPT's 512); each of the `world` processes takes a share
            if self.batch_size % world:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} is not divisible by the {world} processes"
                )
            self.batch_size //= world
            self._per_device = True
        if stage in (None, "fit"):
            self.load_captions()
        if stage in (None, "fit", "validate") and self.val_records is None and self.has_val:
            self.val_records = self.read_images("val")
        if stage in (None, "fit") and self.trainer is not None:
            # Lightning is about to train: read the test split too and check the header of every evaluation
            # image, so a bad test image or labels file stops the run now, not after training (a setup("fit")
            # outside a Trainer, e.g. dbtr-data's caption statistics, reads no images)
            if self.test_records is None:
                self.test_records = self.read_images("test")
            self.check_image_headers()
        if stage in (None, "test") and self.test_records is None:
            self.test_records = self.read_images("test")
            if self.test_records is None:
                raise ConfigError("testing needs data.test_images and data.test_labels")

    @property
    def has_captions(self) -> bool:
        return self.corpus is not None or self.train_captions is not None

    def load_captions(self) -> CaptionRecords:
        """The training captions with their labels (read once)."""
        if self.captions is None:
            if self.corpus is not None:
                from dbtr.data.corpus import load_corpus

                texts, labels, self.corpus_report = load_corpus(self.corpus, self.class_names)
                self.captions = CaptionRecords(texts, labels, self.corpus_report.dropped)
            elif self.train_captions is None:
                raise ConfigError(
                    "training needs data.train_captions (a JSON-lines caption file) or data.corpus"
                )
            else:
                self.captions = read_caption_jsonl(self.train_captions, self.class_names)
        return self.captions

    def _transform(self) -> ClipImageTransform:
        if self.image_size is None:
            raise RuntimeError("image_size is unknown: set data.image_size or call attach_encoder(encoder)")
        return ClipImageTransform(self.image_size, self.mean, self.std, draft=self.fast_decode)

    def _image_loader(self, split: str, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        batch_size = batch_size or self.eval_batch_size
        if split in self.image_features:
            return DataLoader(
                CachedImageDataset(self._records(split), self.image_features[split]),
                batch_size=batch_size,
                shuffle=shuffle,
            )
        if self.on_bad_image == "skip":
            self.scan_images(split)  # so every evaluated image is decodable and the skips are known up front
        return self._pixel_loader(self._records(split), batch_size=batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        )
        features = self.caption_features
        if features is not None and self.trainer is not None:
            features = features_on_device(features, self.trainer.strategy.root_device)
        dataset = CaptionDataset(self.captions, features)
        # Order from (seed, epoch), sliced per process: DDP steps see the single-process batches, resumes the
        # same order. The sampler yields each step's index tensor and the dataset gathers the batch in one go.
        sampler = GlobalBatchSampler(
            len(dataset), self.global_batch_size, world, rank, seed=run_seed(), drop_last=self.drop_last
        )
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers if self.caption_features is None else 0,
        )

    def val_dataloader(self):
        return [] if self.val_records is None else self._image_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._image_loader("test")
