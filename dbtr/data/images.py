"""Labelled image folders: a folder of images plus a JSON-lines file of labels, and CLIP preprocessing.

Labels file lines: ``{"file_name": "rel/path.jpg", "labels": [names], "difficult": [names]}``; ``difficult``
is optional. The label matrix is VOC-style: 1 present, 0 difficult only, -1 absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from dbtr.data.labels import DataFormatError, iter_jsonl, label_row, require_text

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(OSError):
    """An image file exists but cannot be decoded."""


@dataclass
class ImageRecords:
    root: Path
    file_names: list[str]
    labels: np.ndarray  # (N, C) int8 in {1, 0, -1}


def read_image_jsonl(root: str | os.PathLike, labels_file: str | os.PathLike, class_names: Sequence[str]) -> ImageRecords:
    """Read a labels file and check that every listed image exists under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {root}\n  expected layout: {root}/<file_name> for each line of {labels_file}"
        )
    index = {n: i for i, n in enumerate(class_names)}
    names, rows, seen = [], [], {}
    for lineno, rec in iter_jsonl(labels_file):
        where = f"{labels_file}:{lineno}"
        name = require_text(rec, "file_name", where)
        if name in seen:
            raise DataFormatError(f"{where}: {name!r} is listed twice (first at line {seen[name]})")
        seen[name] = lineno
        row = label_row(rec.get("difficult"), index, where, value=0)
        rows.append(label_row(rec.get("labels"), index, where, value=1, row=row))
        names.append(name)
    if not names:
        raise DataFormatError(f"{labels_file}: no images listed")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{labels_file}: {len(missing)} listed image(s) not found under {root}: {shown}")
    return ImageRecords(root, names, np.stack(rows))


class ClipImageTransform:
    """CLIP test preprocessing: bicubic resize of the short side, centre crop, CLIP mean/std (no torchvision)."""

    def __init__(self, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageDecodeError(f"cannot decode image {path}: {err}") from None


class ImageDataset(Dataset):
    def __init__(self, records: ImageRecords, transform: ClipImageTransform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records.file_names)

    def __getitem__(self, i: int) -> dict:
        image = load_image(self.records.root / self.records.file_names[i])
        return {
            "pixel_values": self.transform(image),
            "labels": torch.from_numpy(self.records.labels[i].astype(np.int64)),
            "index": i,
        }


@dataclass
class ImageFeatures:
    """Normalised CLIP image features of a split (CLIP is frozen: computed once, reused every epoch/run)."""

    image_embeds: Tensor  # (N, D)
    patch_embeds: Tensor  # (N, P, D)


@torch.no_grad()
def encode_image_features(encoder, loader, dtype=torch.float32) -> ImageFeatures:
    """Run the frozen image tower once over ``loader`` (in its order) and keep global + dense features."""
    from dbtr.utils.progress import track

    glob, dense = [], []
    for batch in track(loader, f"encoding {len(loader.dataset)} images", total=len(loader)):
        out = encoder.encode_image(batch["pixel_values"])
        glob.append(out.image_embeds.to("cpu", dtype))
        dense.append(out.patch_embeds.to("cpu", dtype))
    return ImageFeatures(torch.cat(glob), torch.cat(dense))


class CachedImageDataset(Dataset):
    def __init__(self, records: ImageRecords, features: ImageFeatures):
        if len(features.image_embeds) != len(records.file_names):
            raise ValueError(f"{len(features.image_embeds)} cached image features for {len(records.file_names)} images")
        self.records, self.features = records, features

    def __len__(self) -> int:
        return len(self.records.file_names)

    def __getitem__(self, i: int) -> dict:
        return {
            "image_embeds": self.features.image_embeds[i],
            "patch_embeds": self.features.patch_embeds[i],
            "labels": torch.from_numpy(self.records.labels[i].astype(np.int64)),
            "index": i,
        }
