"""LightningDataModule for text-only training and image evaluation on one label space."""

from __future__ import annotations

import os
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader

from dbtr.data.captions import CaptionCollate, CaptionDataset, CaptionFeatures, CaptionRecords, read_caption_jsonl
from dbtr.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    CachedImageDataset,
    ClipImageTransform,
    ImageDataset,
    ImageFeatures,
    ImageRecords,
    encode_image_features,
    read_image_jsonl,
)
from dbtr.data.labels import load_class_names
from dbtr.data.sampling import GlobalBatchSampler
from dbtr.utils.seeding import run_seed


class TextToImageDataModule(L.LightningDataModule):
    """Captions (JSON lines) for training; labelled image folders for validation and test.

    :param classes: class names, or a text file with one per line (the order defines the label columns).
    :param train_captions: ``{"text", "labels"}`` JSON-lines file (text-only training).
    :param corpus: instead of ``train_captions``, captions labelled by synonym matching (see
        :func:`dbtr.text.corpus.load_corpus`); without ``classes``, the vocabulary's classes are used.
    :param val_images / val_labels: held-out labelled images for model selection (never the test set).
    :param test_images / test_labels: the evaluation set, used only by the final test and ``dbtr-eval``.
    :param image_size: input resolution; ``None`` = the CLIP model's own (set by ``attach_encoder``).
    :param batch_size: captions per training step, over all devices; ``eval_batch_size``: images per step and device.
    """

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
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        super().__init__()
        if classes is None:
            if corpus is None:
                raise ValueError("data.classes is required (or a data.corpus whose vocabulary defines them)")
            from dbtr.text.corpus import resolve_vocabulary

            classes = resolve_vocabulary(corpus["vocabulary"]).class_names
        if corpus is not None and train_captions is not None:
            raise ValueError("give data.train_captions or data.corpus, not both")
        self.class_names = load_class_names(classes if isinstance(classes, (str, os.PathLike)) else list(classes))
        self.corpus, self.corpus_report = corpus, None
        self.train_captions = train_captions
        self.val_images, self.val_labels = val_images, val_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.global_batch_size = batch_size
        self.num_workers, self.mean, self.std = num_workers, tuple(mean), tuple(std)
        self.captions: CaptionRecords | None = None
        self.caption_features: CaptionFeatures | None = None
        self.val_records: ImageRecords | None = None
        self.test_records: ImageRecords | None = None
        self.image_features: dict[str, ImageFeatures] = {}
        self._per_device = False  # batch_size already divided among DDP processes
        self.collate = CaptionCollate()
        for a, b, what in ((val_images, val_labels, "val"), (test_images, test_labels, "test")):
            if (a is None) != (b is None):
                raise ValueError(f"data.{what}_images and data.{what}_labels must be given together")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def attach_encoder(self, encoder) -> None:
        """Take the tokenizer and, unless set, the input resolution from the CLIP encoder."""
        self.collate = CaptionCollate(encoder.tokenizer, encoder.max_length)
        if self.image_size is None:
            self.image_size = encoder.image_size

    def set_caption_features(self, features: CaptionFeatures) -> None:
        self.caption_features = features

    def cache_image_features(self, encoder, splits: Sequence[str] = ("val", "test")) -> None:
        """Encode the listed image splits once; their loaders then serve features instead of pixels."""
        for split in splits:
            records = {"val": self.val_records, "test": self.test_records}[split]
            if records is not None and split not in self.image_features:
                loader = DataLoader(ImageDataset(records, self._transform()), batch_size=self.eval_batch_size,
                                    num_workers=self.num_workers)
                self.image_features[split] = encode_image_features(encoder, loader)

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and not self._per_device:
            # data.batch_size is the global batch (TaI-DPT's 512); each of the `world` processes takes a share
            if self.batch_size % world:
                raise ValueError(f"data.batch_size={self.batch_size} is not divisible by the {world} processes")
            self.batch_size //= world
            self._per_device = True
        if stage in (None, "fit") and self.captions is None:
            if self.corpus is not None:
                from dbtr.text.corpus import load_corpus

                texts, labels, self.corpus_report = load_corpus(self.corpus, self.class_names)
                self.captions = CaptionRecords(texts, labels, self.corpus_report.dropped)
            elif self.train_captions is None:
                raise ValueError("training needs data.train_captions (a JSON-lines caption file) or data.corpus")
            else:
                self.captions = read_caption_jsonl(self.train_captions, self.class_names)
        if stage in (None, "fit", "validate") and self.val_records is None and self.val_images is not None:
            self.val_records = read_image_jsonl(self.val_images, self.val_labels, self.class_names)
        if stage in (None, "test") and self.test_records is None:
            if self.test_images is None:
                raise ValueError("testing needs data.test_images and data.test_labels")
            self.test_records = read_image_jsonl(self.test_images, self.test_labels, self.class_names)

    def _transform(self) -> ClipImageTransform:
        if self.image_size is None:
            raise RuntimeError("image_size is unknown: set data.image_size or call attach_encoder(encoder)")
        return ClipImageTransform(self.image_size, self.mean, self.std)

    def _image_loader(self, split: str, records: ImageRecords) -> DataLoader:
        if split in self.image_features:
            return DataLoader(CachedImageDataset(records, self.image_features[split]), batch_size=self.eval_batch_size)
        return DataLoader(
            ImageDataset(records, self._transform()),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        dataset = CaptionDataset(self.captions, self.caption_features)
        # Order from (seed, epoch), sliced per process: DDP steps see the single-process batches, resumes the same order
        sampler = GlobalBatchSampler(len(dataset), self.global_batch_size, world, rank, seed=run_seed())
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers if self.caption_features is None else 0,
            drop_last=False,
        )

    def val_dataloader(self):
        return [] if self.val_records is None else self._image_loader("val", self.val_records)

    def test_dataloader(self) -> DataLoader:
        return self._image_loader("test", self.test_records)
