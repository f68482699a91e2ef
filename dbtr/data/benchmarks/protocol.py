"""Protocol data that must be identical across runs: seen/unseen class splits, the validation images held out
from the training split, partial-label masks, and frozen lists of evaluated images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dbtr.data.images import ImageRecords
from dbtr.utils.errors import ConfigError
from dbtr.utils.files import DataFormatError, load_json, read_text
from dbtr.utils.io import atomic_write_text

SPLIT_DIR = Path(__file__).resolve().parent / "splits"
BUILTIN_CLASS_SPLITS = ("coco2014_48_17", "nuswide_925_81")


@dataclass(frozen=True)
class ClassSplit:
    name: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    provenance: str

    def select(self, which: str) -> list[str]:
        if which == "seen":
            return list(self.seen)
        if which == "unseen":
            return list(self.unseen)
        if which == "all":
            return list(self.seen) + list(self.unseen)
        raise ConfigError(f"data.classes must be 'all', 'seen' or 'unseen', got {which!r}")

    def check_against(self, label_space: Sequence[str], source: str) -> None:
        """Fail at start-up unless seen and unseen are disjoint subsets of the dataset's label space."""
        both = sorted(set(self.seen) & set(self.unseen))
        if both:
            raise DataFormatError(
                f"class split {self.name}: {len(both)} classes are both seen and unseen: {both[:5]}"
            )
        known = set(label_space)
        unknown = [c for c in (*self.seen, *self.unseen) if c not in known]
        if unknown:
            raise DataFormatError(
                f"class split {self.name} names {len(unknown)} classes that {source} does not have: "
                f"{unknown[:5]}"
            )


def load_class_split(name_or_path: str | os.PathLike) -> ClassSplit:
    """A shipped split by name, or a JSON file ``{"seen": [...], "unseen": [...], "provenance": "..."}``."""
    path = (
        SPLIT_DIR / f"{name_or_path}.json"
        if str(name_or_path) in BUILTIN_CLASS_SPLITS
        else Path(name_or_path)
    )
    if not path.is_file() and not str(name_or_path).endswith(".json"):
        raise ConfigError(
            f"unknown class split {name_or_path!r}; shipped: {BUILTIN_CLASS_SPLITS} (or a JSON file)"
        )
    data = load_json(path, 'a class split {"seen": [...], "unseen": [...]}')
    for key in ("seen", "unseen"):
        names = data.get(key) if isinstance(data, dict) else None
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n.strip() for n in names)
        ):
            raise DataFormatError(f"{path}: {key!r} must be a non-empty list of class names")
        if len(set(names)) != len(names):
            raise DataFormatError(f"{path}: {key!r} repeats a class name")
    return ClassSplit(path.stem, tuple(data["seen"]), tuple(data["unseen"]), str(data.get("provenance", "")))


def holdout(num_items: int, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(num_items)`` into (train, val) sorted indices; ``size`` is a count or a fraction
    in (0, 1)."""
    n_val = int(round(size * num_items)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= n_val < num_items:
        raise ConfigError(f"data.val_size={size} leaves no training images out of {num_items}")
    perm = np.random.default_rng(seed).permutation(num_items)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def partial_mask(shape: tuple[int, int], proportion: float, seed: int) -> np.ndarray:
    """Which labels stay known: each independently with probability ``proportion`` (fixed seed)."""
    if not 0.0 < proportion <= 1.0:
        raise ConfigError(f"data.label_proportion must be in (0, 1], got {proportion}")
    return np.random.default_rng(seed).random(shape) < proportion


def apply_partial_labels(
    records: ImageRecords, proportion: float, seed: int, mask_file: str | os.PathLike | None = None
) -> tuple[ImageRecords, Path | None]:
    """Set unknown labels to 0. With ``mask_file``, an existing mask is loaded (and checked against the
    images, classes and proportion) so runs compare on identical labels; a missing one is written there
    first."""
    known = None
    path = Path(mask_file) if mask_file else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            stored = {k: z[k] for k in z.files}
        expect = {"file_names": records.file_names, "class_names": records.class_names}
        for key, value in expect.items():
            if key not in stored or list(stored[key]) != list(value):
                raise DataFormatError(
                    f"{path}: the partial-label mask was made for other {key.replace('_', ' ')} "
                    "(another split, hold-out or class set); delete it or set data.partial_file to a new "
                    "path to draw a new mask"
                )
        if not np.isclose(float(stored["proportion"]), proportion):
            raise DataFormatError(
                f"{path}: mask has label_proportion={float(stored['proportion'])}, run asks {proportion}"
            )
        known = stored["known"].astype(bool)
    if known is None:
        known = partial_mask(records.labels.shape, proportion, seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez_compressed(
                tmp,
                known=known,
                file_names=np.array(records.file_names),
                class_names=np.array(records.class_names),
                proportion=proportion,
                seed=seed,
            )
            os.replace(tmp, path)
    labels = np.where(known, records.labels, 0).astype(np.int8)
    out = replace(records, labels=labels)  # areas kept: the per-size mAPs count only the known positives
    return out, path


def write_image_list(path: str | os.PathLike, records: ImageRecords) -> Path:
    return atomic_write_text(path, "".join(f"{n}\n" for n in records.file_names))


def restrict_to_list(records: ImageRecords, list_file: str | os.PathLike) -> ImageRecords:
    """Evaluate exactly the images of a frozen list (one relative path per line), in its order."""
    path = Path(list_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"data.image_list: {path} not found (write one with dbtr-data: evaluated_<split>.txt)"
        )
    row = {n: i for i, n in enumerate(records.file_names)}
    missing_from_disk = set(records.missing) | set(records.skipped)
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name not in row:
            why = "is not on disk" if name in missing_from_disk else "is not in this split"
            raise DataFormatError(f"{path}:{lineno}: {name} {why}; the frozen list cannot be evaluated as is")
        rows.append(row[name])
    if len(set(rows)) != len(rows):
        raise DataFormatError(f"{path}: an image is listed twice")
    out = records.subset(rows)
    out.missing = []
    return out
