"""NUS-WIDE from its release files and an image folder (the Flickr images are distributed separately).

    <root>/Concepts81.txt                                  the 81 concepts, label-column order
    <root>/ImageList/{Train,Test}Imagelist.txt, Imagelist.txt   "actor\\0001_2124494179.jpg" per line
    <root>/TrainTestLabels/Labels_<concept>_{Train,Test}.txt    one 0/1 per line, aligned with the list
    <root>/NUS_WID_Tags/TagList1k.txt, AllTags1k.txt       (seen/unseen only) 1k tags, 0/1 rows per image
    <image_root>/<category>/<file>.jpg                     the list's paths with "/" (default <root>/Flickr)

Many Flickr images are gone from the mirrors, so results depend on the exact list: missing files are counted
and reported, and the evaluated list can be frozen to a file and reused (``image_list``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dbtr.data.images import ImageRecords
from dbtr.utils.errors import ConfigError
from dbtr.utils.files import DataFormatError, read_text

NUS_SPLITS = ("Train", "Test")


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({what})\n{__doc__.split(chr(10) + chr(10))[1]}")
    return path


def normalize_entry(line: str) -> str:
    """``C:\\ImageData\\Flickr\\actor\\0001.jpg`` or ``actor\\0001.jpg`` -> ``actor/0001.jpg``."""
    path = line.strip().replace("\\", "/")
    return path.split("Flickr/", 1)[1] if "Flickr/" in path else path


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]


def read_concepts(root: Path) -> list[str]:
    return read_lines(_require(root / "Concepts81.txt", "the concept list"))


def read_binary_rows(path: Path, num_rows: int, num_cols: int) -> np.ndarray:
    """A whitespace-separated 0/1 text matrix, parsed without a Python loop; the bad line is named on
    error."""
    raw = np.frombuffer(_require(path, "a 0/1 label file").read_bytes(), dtype=np.uint8)
    if raw[:3].tobytes() == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark, as read_text drops it
        raw = raw[3:]
    digit = (raw == ord("0")) | (raw == ord("1"))
    allowed = digit | (raw == ord(" ")) | (raw == ord("\t")) | (raw == ord("\n")) | (raw == ord("\r"))
    if not allowed.all():
        bad = int(np.flatnonzero(~allowed)[0])
        line = int((raw[:bad] == ord("\n")).sum()) + 1
        raise DataFormatError(f"{path}:{line}: expected only 0/1 values, found {chr(raw[bad])!r}")
    ends = np.flatnonzero(raw == ord("\n"))
    if len(raw) and raw[-1] != ord("\n"):
        ends = np.append(ends, len(raw))
    per_line = np.diff(
        np.concatenate([[0], np.cumsum(digit)[ends - 1] if len(ends) else []]).astype(np.int64)
    )
    nonblank = per_line > 0
    if nonblank.sum() != num_rows:
        raise DataFormatError(
            f"{path}: {int(nonblank.sum())} rows, expected {num_rows} (one per listed image)"
        )
    wrong = np.flatnonzero(nonblank & (per_line != num_cols))
    if len(wrong):
        raise DataFormatError(
            f"{path}:{int(wrong[0]) + 1}: {int(per_line[wrong[0]])} values, expected {num_cols}"
        )
    return (raw[digit] == ord("1")).reshape(num_rows, num_cols)


def read_nuswide(
    root: str | os.PathLike,
    split: str = "Test",
    image_root: str | os.PathLike | None = None,
    include_unlabeled: bool = True,
) -> ImageRecords:
    """The 81-concept labels of ``split`` from ``TrainTestLabels`` (images with no concept kept unless
    asked)."""
    root = Path(root)
    split = _split_name(split)
    concepts = read_concepts(root)
    entries = [
        normalize_entry(x)
        for x in read_lines(_require(root / "ImageList" / f"{split}Imagelist.txt", "the image list"))
    ]
    labels = np.full((len(entries), len(concepts)), -1, np.int8)
    for k, concept in enumerate(concepts):
        path = root / "TrainTestLabels" / f"Labels_{concept}_{split}.txt"
        col = read_binary_rows(path, len(entries), 1)[:, 0]
        labels[col, k] = 1
    keep = np.arange(len(entries)) if include_unlabeled else np.flatnonzero((labels == 1).any(1))
    image_root = Path(image_root) if image_root is not None else root / "Flickr"
    return ImageRecords(image_root, [entries[i] for i in keep], labels[keep], concepts)


def read_tag_labels(root: str | os.PathLike, file_names: list[str]) -> tuple[list[str], np.ndarray]:
    """The 1k-tag names and the (N, 1000) {1, -1} tag labels of ``file_names`` (rows of ``AllTags1k.txt``)."""
    root = Path(root)
    tags = read_lines(_require(root / "NUS_WID_Tags" / "TagList1k.txt", "the 1k tag list"))
    everything = [
        normalize_entry(x)
        for x in read_lines(_require(root / "ImageList" / "Imagelist.txt", "the full image list"))
    ]
    position = {name: i for i, name in enumerate(everything)}
    missing = [n for n in file_names if n not in position]
    if missing:
        raise DataFormatError(
            f"{root / 'ImageList' / 'Imagelist.txt'}: {len(missing)} images of the split are not listed, "
            f"e.g. {missing[:3]}"
        )
    rows = read_binary_rows(root / "NUS_WID_Tags" / "AllTags1k.txt", len(everything), len(tags))
    picked = rows[[position[n] for n in file_names]]
    return tags, np.where(picked, 1, -1).astype(np.int8)


def _split_name(split: str) -> str:
    for name in NUS_SPLITS:
        if split.lower() == name.lower():
            return name
    raise ConfigError(f"NUS-WIDE split must be one of {NUS_SPLITS}, got {split!r}")
