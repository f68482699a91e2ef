"""One LightningDataModule per benchmark: captions (or partially labelled images) for training, a validation
split held out from the training images for model selection, and the native test split for the final
numbers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dbtr.data.benchmarks.coco import COCO_SPLITS, read_coco2014
from dbtr.data.benchmarks.coco import LAYOUT as COCO_LAYOUT
from dbtr.data.benchmarks.nuswide import NUS_SPLITS, read_nuswide, read_tag_labels
from dbtr.data.benchmarks.protocol import (
    ClassSplit,
    apply_partial_labels,
    holdout,
    load_class_split,
    restrict_to_list,
)
from dbtr.data.benchmarks.voc import LAYOUT as VOC_LAYOUT
from dbtr.data.benchmarks.voc import VOC_CLASSES, VOC_SPLITS, read_voc2007
from dbtr.data.datamodule import TextToImageDataModule
from dbtr.data.images import ImageRecords
from dbtr.utils.errors import ConfigError, choice_error
from dbtr.utils.files import DataFormatError

log = logging.getLogger(__name__)


class BenchmarkDataModule(TextToImageDataModule):
    """A dataset read from its native layout.

    :param root: the dataset folder (see each subclass for its layout; errors show the expected one).
    :param split: the evaluation split (the test split; ``dbtr-data`` inspects this one).
    :param train_split: the training images: the validation split is held out from them, and the partial-label
        setting trains on the rest.
    :param val_size: images held out for validation (a count, or a fraction < 1); 0 = no validation.
    :param val_seed: the hold-out seed (fixed: every run selects on the same images).
    :param classes: ``all`` | ``seen`` | ``unseen`` (the last two need ``class_split``).
    :param class_split: a shipped seen/unseen split (``coco2014_48_17``, ``nuswide_925_81``) or a JSON file.
    :param label_proportion: partial labels on the training images: each label known with this probability.
    :param partial_seed / partial_file: the mask seed, and the file it is saved to and reloaded from.
    :param image_list: a frozen list of test images (one relative path per line) to evaluate exactly.
    :param on_missing_image: ``error`` | ``skip`` for annotated images that are not on disk (skips are
        counted).
    :param train_on: ``captions`` (text-only training, the zero-shot protocol) or ``images``: the training
        images with their (partial) labels (partial-label and seen/unseen protocols).
    :param train_classes: ``all`` | ``seen``: with ``seen``, labels of the other classes are unknown (0) in
        training.
    Remaining keyword arguments go to :class:`TextToImageDataModule` (captions/corpus, image size,
    batches...).
    """

    name = "benchmark"
    splits: tuple[str, ...] = ()  # the dataset's native split names (empty: not checked)
    default_split = "test"
    default_train_split = "train"
    layout = ""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        train_split: str | None = None,
        val_size: int | float = 0,
        val_seed: int = 0,
        classes: str = "all",
        class_split: str | None = None,
        label_proportion: float = 1.0,
        partial_seed: int = 0,
        partial_file: str | None = None,
        image_list: str | None = None,
        on_missing_image: str = "error",
        train_on: str = "captions",
        train_classes: str = "all",
        **kwargs,
    ):
        if train_on not in ("captions", "images"):
            raise choice_error("data.train_on", train_on, ("captions", "images"))
        if train_classes not in ("all", "seen"):
            raise choice_error("data.train_classes", train_classes, ("all", "seen"))
        if train_classes == "seen" and class_split is None:
            raise ConfigError("data.train_classes=seen needs data.class_split")
        self.train_on, self.train_classes = train_on, train_classes
        if not isinstance(classes, str) or classes not in ("all", "seen", "unseen"):
            raise choice_error("data.classes", classes, ("all", "seen", "unseen"))
        if classes != "all" and class_split is None:
            raise ConfigError(
                f"data.classes={classes} needs data.class_split (e.g. {self.name}'s seen/unseen split)"
            )
        if on_missing_image not in ("error", "skip"):
            raise choice_error("data.on_missing_image", on_missing_image, ("error", "skip"))
        self.root = Path(root)
        self.split = self._check_split("data.split", split or self.default_split)
        self.train_split = self._check_split("data.train_split", train_split or self.default_train_split)
        self.val_size, self.val_seed = val_size, int(val_seed)
        self.which_classes = classes
        self.class_split: ClassSplit | None = load_class_split(class_split) if class_split else None
        self.label_proportion, self.partial_seed, self.partial_file = (
            float(label_proportion),
            int(partial_seed),
            partial_file,
        )
        self.image_list, self.on_missing_image = image_list, on_missing_image
        space = self.label_space()
        if self.class_split is not None:
            # fails at start-up, before any image is read, if the split does not partition our label space
            self.class_split.check_against(space, f"{self.name}'s label space")
            names = self.class_split.select(classes)
        else:
            names = space
        super().__init__(classes=names, **kwargs)
        self.train_records: ImageRecords | None = None

    def _check_split(self, key: str, value: str) -> str:
        """A split name of this dataset (case-insensitive, returned as the dataset spells it), checked at
        start-up so that a wrong one is refused with the allowed names before anything is read."""
        if not self.splits:
            return value
        match = next((s for s in self.splits if s.lower() == str(value).lower()), None)
        if match is None:
            raise choice_error(key, value, self.splits)
        return match

    # -------------------------------------------------------------- subclass hooks
    def label_space(self) -> list[str]:
        """Every class the dataset can label, in its standard order."""
        raise NotImplementedError

    def read_native(self, split: str) -> ImageRecords:
        """All images of a native split with labels over ``label_space()``."""
        raise NotImplementedError

    # -------------------------------------------------------------- records
    @property
    def has_val(self) -> bool:
        return bool(self.val_size)

    @property
    def image_splits(self) -> tuple[str, ...]:
        return ("train", "val", "test") if self.train_on == "images" else ("val", "test")

    @property
    def class_subsets(self) -> dict[str, list[str]]:
        if self.class_split is None:
            return {}
        present = set(self.class_names)
        return {k: [c for c in self.class_split.select(k) if c in present] for k in ("seen", "unseen")}

    @property
    def seen_classes(self) -> list[str] | None:
        return list(self.class_split.seen) if self.class_split else None

    @property
    def unseen_classes(self) -> list[str] | None:
        return list(self.class_split.unseen) if self.class_split else None

    def load_split(self, split: str) -> ImageRecords:
        """A native split restricted to this module's classes, with missing images handled."""
        records = self.read_native(split)
        return records.select_classes(self.class_names).drop_missing(self.on_missing_image, self.layout)

    def _holdout(self) -> tuple[ImageRecords, ImageRecords | None]:
        records = self.load_split(self.train_split)
        train_rows, val_rows = holdout(len(records), self.val_size, self.val_seed)
        return records.subset(train_rows), (records.subset(val_rows) if len(val_rows) else None)

    def read_images(self, split: str) -> ImageRecords | None:
        if split == "val":
            return self._holdout()[1] if self.has_val else None
        records = self.load_split(self.split)
        if self.image_list:
            records = restrict_to_list(records, self.image_list)
        if records.missing:
            log.warning(
                "%s %s: %d annotated images are not on disk and are not evaluated (see data_report.json)",
                self.name,
                self.split,
                len(records.missing),
            )
        return records

    def train_images(self) -> ImageRecords:
        """The training images minus the validation hold-out, with partial labels applied (unknown = 0) and,
        with ``train_classes=seen``, every label outside the seen classes unknown."""
        if self.train_records is None:
            records = self._holdout()[0]
            if self.label_proportion < 1.0:
                records, path = apply_partial_labels(
                    records, self.label_proportion, self.partial_seed, self.partial_file
                )
                log.info(
                    "partial labels: p=%.2f, %.1f%% of labels known (mask %s)",
                    self.label_proportion,
                    100.0 * (records.labels != 0).mean(),
                    path or "not saved: set data.partial_file",
                )
            if self.train_classes == "seen":
                seen = set(self.class_split.seen)
                records.labels[:, [i for i, c in enumerate(self.class_names) if c not in seen]] = 0
            self.train_records = records
        return self.train_records

    def setup(self, stage: str | None = None) -> None:
        if self.train_on == "images" and stage in (None, "fit"):
            self.train_images()
            super().setup("validate")
            if stage is None:
                super().setup("test")
            return
        super().setup(stage)

    def train_dataloader(self):
        if self.train_on == "captions":
            return super().train_dataloader()
        return self._image_loader("train", batch_size=self.batch_size, shuffle=True)


class VOC2007DataModule(BenchmarkDataModule):
    """PASCAL VOC2007 (``VOCdevkit/VOC2007``): test on ``test`` (4,952 images), hold validation out of
    ``trainval``."""

    name, default_split, default_train_split, layout = "voc2007", "test", "trainval", VOC_LAYOUT
    splits = VOC_SPLITS

    def label_space(self) -> list[str]:
        return list(VOC_CLASSES)

    def read_native(self, split: str) -> ImageRecords:
        return read_voc2007(self.root, split)


class Coco2014DataModule(BenchmarkDataModule):
    """MS-COCO 2014: test on ``val2014``, hold validation out of ``train2014``.

    :param include_unlabeled: evaluate images without any annotation (TaI-DPT: yes, 40,504 images;
        DualCoOp/ASL: no, 40,137). They are negatives for every class.
    """

    name, default_split, default_train_split, layout = "coco2014", "val2014", "train2014", COCO_LAYOUT
    splits = COCO_SPLITS

    def __init__(self, root, include_unlabeled: bool = True, **kwargs):
        self.include_unlabeled = bool(include_unlabeled)
        super().__init__(root, **kwargs)

    def label_space(self) -> list[str]:
        from dbtr.text.synonyms import builtin_vocabulary

        return builtin_vocabulary("coco2014").class_names  # the 80 category names in id order

    def read_native(self, split: str) -> ImageRecords:
        records = read_coco2014(self.root, split, self.include_unlabeled)
        if records.class_names != self.label_space():
            raise DataFormatError(
                f"{self.root}/annotations/instances_{split}.json: its categories are not the 80 "
                f"COCO classes in id order (first: {records.class_names[:3]})"
            )
        return records


class NusWideDataModule(BenchmarkDataModule):
    """NUS-WIDE: test on ``Test`` (official list), hold validation out of ``Train``.

    Without a class split the label space is the 81 concepts. With ``class_split=nuswide_925_81`` it is the
    925 seen tags (labels from ``AllTags1k.txt``) followed by the 81 concepts as unseen classes (GZSL: all
    1,006).

    :param image_root: where the Flickr images are (default ``<root>/Flickr``).
    :param include_unlabeled: evaluate images with none of the classes (the official list keeps them).
    """

    name, default_split, default_train_split = "nuswide", "Test", "Train"
    splits = NUS_SPLITS

    def __init__(
        self,
        root,
        image_root: str | None = None,
        include_unlabeled: bool = True,
        on_missing_image: str = "skip",
        **kwargs,
    ):
        from dbtr.data.benchmarks import nuswide

        self.image_root, self.include_unlabeled = image_root, bool(include_unlabeled)
        self.layout = nuswide.__doc__
        super().__init__(root, on_missing_image=on_missing_image, **kwargs)

    def label_space(self) -> list[str]:
        from dbtr.text.synonyms import builtin_vocabulary

        concepts = builtin_vocabulary("nuswide").class_names
        if self.class_split is not None and set(self.class_split.unseen) == set(concepts):
            return list(self.class_split.seen) + concepts
        return concepts

    def read_native(self, split: str) -> ImageRecords:
        import numpy as np

        records = read_nuswide(self.root, split, self.image_root, include_unlabeled=True)
        concepts = self.label_space()[-81:]
        if records.class_names != concepts:
            raise DataFormatError(
                f"{self.root}/Concepts81.txt: expected the 81 NUS-WIDE concepts in the standard "
                f"order, got {records.class_names[:3]}... ({len(records.class_names)})"
            )
        labels, names = records.labels, records.class_names
        if len(self.label_space()) > len(concepts):
            tags, tag_labels = read_tag_labels(self.root, records.file_names)
            col = {t: i for i, t in enumerate(tags)}
            seen = self.label_space()[: -len(concepts)]
            absent = [t for t in seen if t not in col]
            if absent:
                raise DataFormatError(
                    f"{self.root}/NUS_WID_Tags/TagList1k.txt lacks seen tags of the split: {absent[:5]}"
                )
            labels = np.concatenate([tag_labels[:, [col[t] for t in seen]], labels], axis=1)
            names = seen + names
        records = ImageRecords(records.root, records.file_names, labels, names)
        if not self.include_unlabeled:
            records = records.subset(
                np.flatnonzero((labels[:, [names.index(c) for c in self.class_names]] == 1).any(1))
            )
        return records
