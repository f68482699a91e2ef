"""Labelled image folders: a folder of images plus a JSON-lines file of labels, and CLIP preprocessing.

Labels file lines: ``{"file_name": "rel/path.jpg", "labels": [names], "difficult": [names]}``; ``difficult``
is optional. The label matrix is VOC-style: 1 present, 0 difficult only, -1 absent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from dbtr.data.labels import box_areas, label_row, require_text
from dbtr.utils.errors import ConfigError, UserError, choice_error
from dbtr.utils.files import DataFormatError, iter_jsonl

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# How files become RGB pixels (load_image): part of the image-feature cache key, so features cached before a
# change are rebuilt. 2: EXIF orientation applied, high-bit-depth modes scaled (were clipped to white).
DECODE_VERSION = 2
# How the resize and crop are computed (resized_size, crop_origin), also part of the cache key.
# 2: torchvision's arithmetic (long side truncated, crop offset rounded), was rounded / floored.
GEOMETRY_VERSION = 2


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(w, h)`` after torchvision's ``Resize(size)`` (OpenAI CLIP's and TaI-DPT's test transform): the
    short side becomes ``size``, the long one ``int(size * long / short)``, truncated (torchvision
    ``functional.resize``; e.g. 500 x 375 -> 298 x 224, not 299)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_origin(width: int, height: int, size: int) -> tuple[int, int]:
    """``(left, top)`` of torchvision's ``CenterCrop(size)`` on a ``width`` x ``height`` image:
    ``int(round((side - size) / 2))``, Python's round (half to even: a slack of 75 starts at 38, of 73 at
    36)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


class ImageDecodeError(UserError, OSError):
    """An image file exists but cannot be decoded (an OSError: callers that skip unreadable files catch
    it)."""


@dataclass
class ImageRecords:
    """Images of one split and their (N, C) int8 labels in {1, 0, -1}: present, difficult/unknown, absent."""

    root: Path
    file_names: list[str]
    labels: np.ndarray
    class_names: list[str] | None = None
    missing: list[str] = field(
        default_factory=list
    )  # listed but not on disk (dropped, on_missing_image=skip)
    skipped: list[str] = field(default_factory=list)  # on disk but undecodable (dropped, on_bad_image=skip)
    # (N, C) float32 area in px^2 of each class's largest instance, NaN where absent or unknown; None when the
    # annotations have no boxes. The per-size mAPs are computed from it.
    areas: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.file_names)

    def subset(self, rows: Sequence[int] | np.ndarray) -> ImageRecords:
        rows = np.asarray(rows, dtype=np.int64)
        areas = None if self.areas is None else self.areas[rows]
        return replace(
            self, file_names=[self.file_names[i] for i in rows], labels=self.labels[rows], areas=areas
        )

    def select_classes(self, names: Sequence[str]) -> ImageRecords:
        """Keep (and reorder) the label columns of ``names``; an unknown name is an error that lists it."""
        index = {n: i for i, n in enumerate(self.class_names or [])}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ConfigError(
                f"classes {unknown[:5]} (of {len(unknown)}) are not in this dataset's label space"
            )
        cols = [index[n] for n in names]
        areas = None if self.areas is None else self.areas[:, cols]
        return replace(self, labels=self.labels[:, cols], class_names=list(names), areas=areas)

    def drop_missing(
        self,
        on_missing: str = "error",
        layout: str = "",
        fix: str = (
            "set data.on_missing_image=skip to evaluate without them; they are then counted and listed"
        ),
    ) -> ImageRecords:
        """Check every listed file exists; ``skip`` drops and records the missing ones, ``error`` raises (with
        ``fix``: what to do, in terms of an option the caller's config has)."""
        if on_missing not in ("error", "skip"):
            raise choice_error("data.on_missing_image", on_missing, ("error", "skip"))
        ok = np.array([(self.root / n).is_file() for n in self.file_names], dtype=bool)
        if ok.all():
            return self
        missing = [n for n, good in zip(self.file_names, ok) if not good]
        if on_missing == "error":
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of {len(ok)} annotated images are not on disk under {self.root}: {shown}\n"
                f"{layout}\n({fix})"
            )
        out = self.subset(np.flatnonzero(ok))
        out.missing = self.missing + missing
        return out


def read_image_jsonl(
    root: str | os.PathLike, labels_file: str | os.PathLike, class_names: Sequence[str]
) -> ImageRecords:
    """Read a labels file and check that every listed image exists under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {root}\n"
            f"  expected layout: {root}/<file_name> for each line of {labels_file}"
        )
    index = {n: i for i, n in enumerate(class_names)}
    names, rows, seen, areas = [], [], {}, []
    for lineno, rec in iter_jsonl(labels_file):
        where = f"{labels_file}:{lineno}"
        name = require_text(rec, "file_name", where)
        if name in seen:
            raise DataFormatError(f"{where}: {name!r} is listed twice (first at line {seen[name]})")
        seen[name] = lineno
        row = label_row(rec.get("difficult"), index, where, value=0)
        rows.append(label_row(rec.get("labels"), index, where, value=1, row=row))
        names.append(name)
        if "boxes" in rec:
            areas.append(np.where(rows[-1] == 1, box_areas(rec["boxes"], index, where), np.nan))
        elif areas:
            raise DataFormatError(f"{where}: no 'boxes' although earlier lines have them (all or none)")
    if not names:
        raise DataFormatError(f"{labels_file}: no images listed")
    if areas and len(areas) != len(names):
        raise DataFormatError(f"{labels_file}: the first lines have no 'boxes', later ones do (all or none)")
    stacked = np.stack(areas).astype(np.float32) if areas else None
    records = ImageRecords(root, names, np.stack(rows), list(class_names), areas=stacked)
    return records.drop_missing(
        "error",
        layout=f"(listed in {labels_file})",
        fix=f"add the files, or remove their lines from {labels_file}",
    )


class ClipImageTransform:
    """CLIP test preprocessing as OpenAI's ``clip.load`` transform and TaI-DPT's (Dassl's ``resize``,
    ``center_crop``, ``normalize``) compute it with torchvision, here without torchvision: bicubic resize of
    the short side (:func:`resized_size`), centre crop (:func:`crop_origin`), CLIP mean/std.

    ``draft=True`` lets libjpeg decode large JPEGs at a reduced scale (still at least ``size`` on the short
    side) before the bicubic resize: several times faster on photos, but not bit-identical to the full decode,
    so it is off by default and part of the image-cache key.
    """

    def __init__(
        self,
        size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        draft: bool = False,
    ):
        self.size, self.draft = int(size), bool(draft)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def identity(self) -> str:
        return (
            f"size={self.size}|mean={self.mean.flatten().tolist()}|std={self.std.flatten().tolist()}"
            f"|draft={self.draft}|decode={DECODE_VERSION}|geometry={GEOMETRY_VERSION}"
        )

    def crop(self, image: Image.Image) -> Image.Image:
        """The RGB ``size`` x ``size`` view the model sees (heatmaps are drawn over it, patch for patch)."""
        image = to_rgb(image)
        nw, nh = resized_size(*image.size, self.size)
        if (nw, nh) != image.size:  # torchvision leaves an image whose short side is already `size` as it is
            image = image.resize((nw, nh), Image.BICUBIC)
        left, top = crop_origin(nw, nh, self.size)
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: Image.Image) -> Tensor:
        image = self.crop(image)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, whatever its mode.

    Pillow's own ``convert("RGB")`` is right for 8-bit modes (1, L, P, CMYK, YCbCr, LAB, HSV, ...) and
    drops alpha (RGBA, LA, PA, P with transparency), as CLIP's own preprocessing does. It is wrong for
    high-bit-depth modes: it clips them at 255, so a 16-bit greyscale PNG becomes white. Those are scaled to
    0..255 instead: I;16* (unsigned 16-bit) divided by 257; I (32-bit int) and F (float) as they are if every
    value lies in 0..255, divided by 257 if in 0..65535 (16-bit data, how Pillow opens some 16-bit TIFFs);
    F in 0..1 (normalised floats) times 255; anything else (negative or larger values) stretched linearly from
    its min..max.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_8bit(np.asarray(image), image.mode)).convert("RGB")
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the documented way (else Pillow warns), then alpha dropped as above
    return image.convert("RGB")


def _high_depth_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        a = a / 257.0
    elif lo >= 0 and hi <= 1 and mode == "F":
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _upright(image: Image.Image, path: Path) -> Image.Image:
    """Apply the EXIF orientation (phone photos store pixels sideways, with a tag saying how to turn them)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as err:  # noqa: BLE001 - a damaged EXIF block must not make the pixels unusable
        log.warning("%s: its EXIF orientation cannot be read (%s); using the image as stored", path, err)
        return image


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)``; every way opening or decoding it fails becomes ImageDecodeError naming the file.

    Over twice ``Image.MAX_IMAGE_PIXELS`` Pillow refuses the file (DecompressionBombError, not an OSError);
    between once and twice it only warns and the image is decoded (:func:`load_image` logs it, naming it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"cannot decode image {path}: {err} (Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"cannot decode image {path}: {err}") from None


def _require_area(path: Path, width: int, height: int) -> None:
    # a header of zero width or height would otherwise fail later, in the resize, without the file name
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"cannot decode image {path}: it has zero width or height ({width}x{height})")


def load_image(path: Path, draft_size: int | None = None) -> Image.Image:
    """The decoded image, upright (EXIF orientation applied) and RGB (:func:`to_rgb`): the one way dbtr reads
    an image. ImageDecodeError naming the file if it cannot be (see :func:`_opened`)."""
    with _opened(path) as im:
        if draft_size:
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        image = im.copy()
    _require_area(path, image.width, image.height)
    if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        log.warning(
            "%s: %dx%d pixels, over Pillow's decompression-bomb limit of %d (decoded, as Pillow does "
            "up to twice the limit)",
            path,
            image.width,
            image.height,
            Image.MAX_IMAGE_PIXELS,
        )
    return to_rgb(_upright(image, path))


def check_image_header(path: Path) -> None:
    """Read the header only: ImageDecodeError naming the file for what Pillow cannot identify, a zero width or
    height, or a size over twice the decompression-bomb limit. Cheap enough to run on every image of the
    evaluation splits before training; a file damaged after its header is only found by decoding it."""
    with _opened(path) as im:
        width, height = im.size
    _require_area(path, width, height)


BAD_IMAGE_HINT = "set data.on_bad_image=skip to leave undecodable images out (they are counted and listed)"


BAD_IMAGE_POLICIES = ("error", "skip")


class ImageDataset(Dataset):
    """Decoded, preprocessed images. ``on_bad_image="skip"`` turns an undecodable file into an item with
    ``ok=False`` (zero pixels) that the consumer drops and reports, instead of failing the whole pass."""

    def __init__(self, records: ImageRecords, transform: ClipImageTransform, on_bad_image: str = "error"):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise choice_error("data.on_bad_image", on_bad_image, BAD_IMAGE_POLICIES)
        self.records, self.transform, self.on_bad_image = records, transform, on_bad_image

    def __len__(self) -> int:
        return len(self.records.file_names)

    def __getitem__(self, i: int) -> dict:
        labels = torch.from_numpy(self.records.labels[i].astype(np.int64))
        try:
            image = load_image(
                self.records.root / self.records.file_names[i],
                self.transform.size if self.transform.draft else None,
            )
        except ImageDecodeError as err:
            if self.on_bad_image == "error":
                raise ImageDecodeError(f"{err}; {BAD_IMAGE_HINT}") from None
            size = self.transform.size
            return {"pixel_values": torch.zeros(3, size, size), "labels": labels, "index": i, "ok": False}
        return {"pixel_values": self.transform(image), "labels": labels, "index": i, "ok": True}


@dataclass
class ImageFeatures:
    """Normalised CLIP image features of a split (CLIP is frozen: computed once, reused every epoch and run).

    Arrays may be memory-mapped fp16 (the disk cache) or tensors; ``rows[i]`` is the feature row of image i of
    the (bad-image-filtered) records, so skipped images need no rewrite of the arrays.
    """

    image_embeds: Any  # (M, D)
    patch_embeds: Any  # (M, P, D)
    rows: np.ndarray | None = None
    patch_affinity: Any = None  # (M, P, P) when the encoder computes one (TagCLIP's DMAR), else None


@torch.no_grad()
def encode_image_features(
    encoder, loader, out: tuple[Any, Any] | None = None, progress: str | None = None
) -> tuple[ImageFeatures, np.ndarray]:
    """Run the frozen image tower once over ``loader`` (an ImageDataset in order).

    Returns the features and the boolean ``ok`` per image (False: undecodable, skipped). With ``out`` (two
    preallocated (N, D) / (N, P, D) arrays, e.g. memory maps, and a third (N, P, P) one for an encoder with a
    patch affinity) rows are written in place as they come, so a large split never has to fit in memory.
    """
    from dbtr.utils.progress import track

    n = len(loader.dataset)
    ok = np.zeros(n, dtype=bool)
    glob, dense, affinity = [], [], []
    batches = loader if progress is None else track(loader, f"encoding {n} {progress}", total=len(loader))
    if True:
        for batch in batches:
            good = batch["ok"].numpy().astype(bool) if "ok" in batch else np.ones(len(batch["index"]), bool)
            idx = batch["index"].numpy()
            ok[idx] = good
            if good.any():
                emb = encoder.encode_image(batch["pixel_values"][torch.from_numpy(good)].to(encoder.device))
                arrays = [emb.image_embeds, emb.patch_embeds]
                if emb.patch_affinity is not None:
                    arrays.append(emb.patch_affinity)
                if out is None:
                    for kept, array in zip((glob, dense, affinity), arrays):
                        kept.append(array.to("cpu", torch.float32))
                else:
                    for target, array in zip(out, arrays):
                        target[idx[good]] = array.to("cpu", torch.float32).numpy().astype(target.dtype)
    if out is not None:
        return ImageFeatures(out[0], out[1], np.flatnonzero(ok), out[2] if len(out) > 2 else None), ok
    if not glob:
        raise ImageDecodeError(f"none of the {n} images could be decoded")
    return ImageFeatures(
        torch.cat(glob), torch.cat(dense), None, torch.cat(affinity) if affinity else None
    ), ok


def _as_float_tensor(x) -> Tensor:
    return x.float() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))


class CachedImageDataset(Dataset):
    def __init__(self, records: ImageRecords, features: ImageFeatures):
        rows = features.rows if features.rows is not None else np.arange(len(features.image_embeds))
        if len(rows) != len(records.file_names):
            raise ValueError(f"{len(rows)} cached image features for {len(records.file_names)} images")
        self.records, self.features, self.rows = records, features, rows

    def __len__(self) -> int:
        return len(self.records.file_names)

    def __getitem__(self, i: int) -> dict:
        r = int(self.rows[i])
        item = {
            "image_embeds": _as_float_tensor(self.features.image_embeds[r]),
            "patch_embeds": _as_float_tensor(self.features.patch_embeds[r]),
            "labels": torch.from_numpy(self.records.labels[i].astype(np.int64)),
            "index": i,
        }
        if self.features.patch_affinity is not None:
            item["patch_affinity"] = _as_float_tensor(self.features.patch_affinity[r])
        return item


def describe(records: ImageRecords) -> dict:
    """Per-class counts and the drop lists (the ``dataset_stats.json`` body)."""
    return {
        "num_items": len(records),
        "classes": list(records.class_names or []),
        "positives": (records.labels == 1).sum(0).astype(int).tolist(),
        "difficult": (records.labels == 0).sum(0).astype(int).tolist(),
        "images_without_positive": int((~(records.labels == 1).any(1)).sum()),
        "missing_images": len(records.missing),
        "skipped": list(records.skipped),
        "missing": list(records.missing),
    }
