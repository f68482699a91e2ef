"""On-disk caches of frozen-CLIP features: encode once, reuse in every later run and sweep point.

Captions, per (text tower, tokenizer, corpus, max length), in ``<root>/captions-<key>/``:
    text_embeds.npy (N, D) fp16 | token_embeds.npy (T, D) fp16, real tokens only | offsets.npy (N+1,) int64
Images, per (image tower, dense mode, preprocessing, image list with file sizes and modification times), in
``<root>/images-<key>/``:
    image_embeds.npy (N, D) fp16 | patch_embeds.npy (N, P, D) fp16 | ok.npy (N,) bool (False: undecodable)
    | patch_affinity.npy (N, P, P) fp16, only for an encoder with a patch affinity (``clip.dense=tagclip``)
Each folder has a meta.json (format version, the full key, shapes, a BLAKE2 checksum per array) and is
published in one rename once complete; when two jobs build the same entry at once the first rename wins.
Arrays are memory-mapped on read. An entry whose meta.json is malformed, or whose arrays do not match it (a
truncated copy, a flipped byte), is reported in one warning line and rebuilt; another key never reads it at
all. Temporary folders of killed runs are removed by the next run. Both caches share one load-or-rebuild path
(``_load_or_build``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dbtr.data.captions import CaptionFeatures, encode_caption_features, offsets_problem
from dbtr.utils.io import atomic_directory, atomic_write_json, discard_directory, remove_stale_temporaries

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_ARRAYS = ("text_embeds", "token_embeds", "offsets")


def _hash_tensor(h, tensor) -> None:
    h.update(tensor.detach().to("cpu").float().contiguous().numpy().tobytes())


def text_tower_identity(encoder) -> str:
    """What the caption features depend on: text config, tokenizer, and weights of the text path."""
    h = hashlib.blake2b(digest_size=16)
    strings, tensors = encoder.tower_identity("text")
    for text in strings:
        h.update(text.encode())
    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):  # set on the backend by each call: not an identity
            spec.pop(transient, None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(encoder.tokenizer).encode())
    for tensor in tensors:
        _hash_tensor(h, tensor)
    return h.hexdigest()


def caption_cache_key(encoder, texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(
        f"v{CACHE_VERSION}|{text_tower_identity(encoder)}|max_length={encoder.max_length}|n={len(texts)}".encode()
    )
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_captions(tmp: Path, features: CaptionFeatures) -> dict:
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(features, name)))
    return {
        "num_captions": len(features),
        "embed_dim": int(features.text_embeds.shape[1]),
        "num_tokens": int(features.token_embeds.shape[0]),
    }


def save_caption_features(folder: Path, features: CaptionFeatures, key: str) -> None:
    _publish(folder, key, _CAPTIONS, lambda tmp: _write_captions(tmp, features))


class CacheDamaged(ValueError):
    """A cache entry that exists but cannot be used (truncated, corrupted, malformed meta.json, foreign
    key)."""


@dataclass(frozen=True)
class _Kind:
    """What one cache kind stores: its arrays, the integer sizes its meta.json records, and their shapes."""

    name: str
    arrays: tuple[str, ...]
    sizes: tuple[str, ...]
    shapes: Callable[[dict], dict[str, tuple[int, ...]]]
    check: Callable[[dict], str | None] = lambda arrays: None  # what is inconsistent between the arrays


_CAPTIONS = _Kind(
    "caption",
    _ARRAYS,
    ("num_captions", "embed_dim", "num_tokens"),
    lambda m: {
        "text_embeds": (m["num_captions"], m["embed_dim"]),
        "token_embeds": (m["num_tokens"], m["embed_dim"]),
        "offsets": (m["num_captions"] + 1,),
    },
    lambda a: offsets_problem(np.asarray(a["offsets"]), len(a["text_embeds"]), len(a["token_embeds"])),
)


def _read_meta(folder: Path, key: str, kind: _Kind) -> dict:
    """meta.json, checked field by field: any other content is a damaged entry, never a KeyError later."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheDamaged(f"meta.json is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CacheDamaged(f"meta.json holds a {type(meta).__name__}, not an object")
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        raise CacheDamaged("cache key or version differs from the requested one")
    bad = [
        f
        for f in kind.sizes
        if not isinstance(meta.get(f), int) or isinstance(meta.get(f), bool) or meta[f] < 0
    ]
    if bad:
        raise CacheDamaged(f"meta.json lacks valid sizes {bad}")
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or not all(isinstance(sums.get(n), str) for n in kind.arrays):
        raise CacheDamaged(f"meta.json lacks a checksum for each of {list(kind.arrays)}")
    return meta


def _load_entry(folder: Path, key: str, kind: _Kind, verify: bool = True) -> dict | None:
    """The memory-mapped arrays of a cache entry, None when absent; ``CacheDamaged`` when unusable."""
    if not folder.exists():
        return None
    if not (folder / "meta.json").is_file():
        raise CacheDamaged("meta.json is missing")
    meta = _read_meta(folder, key, kind)
    arrays, shapes = {}, kind.shapes(meta)
    for name in kind.arrays:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise CacheDamaged(f"{path.name} is missing")
        if verify and _checksum(path) != meta["checksums"][name]:
            raise CacheDamaged(f"{path.name} does not match its checksum (truncated or corrupted)")
        try:
            arrays[name] = np.load(path, mmap_mode="r")
        except ValueError as err:  # a header numpy cannot parse
            raise CacheDamaged(f"{path.name} is not a readable array ({err})") from None
        if arrays[name].shape != shapes[name]:
            raise CacheDamaged(f"{path.name} has shape {arrays[name].shape}, meta.json says {shapes[name]}")
    problem = kind.check(arrays)
    if problem:
        raise CacheDamaged(problem)
    return arrays


def _publish(folder: Path, key: str, kind: _Kind, fill: Callable[[Path], dict]) -> None:
    """Build an entry in a temporary folder (``fill`` writes the arrays and returns the sizes) and publish it
    in one rename. If another job published the same entry meanwhile, the first one stays and this one is
    dropped: both are complete and equal, and a reader never sees a half entry."""
    with atomic_directory(folder, keep_existing=True) as tmp:
        meta = {"version": CACHE_VERSION, "key": key, **fill(tmp)}
        meta["checksums"] = {name: _checksum(tmp / f"{name}.npy") for name in kind.arrays}
        atomic_write_json(tmp / "meta.json", meta)


def _load_or_build(folder: Path, key: str, kind: _Kind, fill: Callable[[Path], dict]) -> tuple[dict, str]:
    """The one load-or-rebuild path of every cache: ``(arrays, status)``, status hit / built / rebuilt.

    A damaged entry gets a one-line warning, is moved out of the way and rebuilt; temporary folders that a
    killed run left behind are removed first.
    """
    remove_stale_temporaries(folder.parent)
    status = "built"
    try:
        arrays = _load_entry(folder, key, kind)
        if arrays is not None:
            return arrays, "hit"
    except (CacheDamaged, OSError) as err:
        log.warning("%s feature cache %s is unusable (%s): rebuilding it", kind.name, folder, err)
        discard_directory(folder)
        status = "rebuilt"
    _publish(folder, key, kind, fill)
    arrays = _load_entry(folder, key, kind, verify=False)
    if arrays is None:  # removed again between our rename and this read: another job's rebuild is under way
        raise CacheDamaged(f"{folder} vanished right after it was written (another job is rebuilding it?)")
    return arrays, status


def load_caption_features(folder: Path, key: str, verify: bool = True) -> CaptionFeatures | None:
    """The cached features, or None when absent; raises ``CacheDamaged`` when present but damaged or
    foreign."""
    arrays = _load_entry(folder, key, _CAPTIONS, verify)
    return None if arrays is None else CaptionFeatures(**arrays)


def cached_caption_features(
    encoder, texts: Sequence[str], root: str | os.PathLike, batch_size: int = 256
) -> tuple[CaptionFeatures, str]:
    """Features of ``texts`` from ``root`` (status "hit"), or encoded and stored ("built" / "rebuilt")."""
    key = caption_cache_key(encoder, texts)

    def fill(tmp: Path) -> dict:
        return _write_captions(
            tmp, encode_caption_features(encoder, texts, batch_size=batch_size, progress=True)
        )

    arrays, status = _load_or_build(Path(root) / f"captions-{key[:24]}", key, _CAPTIONS, fill)
    return CaptionFeatures(**arrays), status


# ---------------------------------------------------------------------------------------------------- images
IMAGE_ARRAYS = ("image_embeds", "patch_embeds", "ok")


def image_tower_identity(encoder) -> str:
    """What image features depend on: the vision config and weights, the projection and the dense mode."""
    h = hashlib.blake2b(digest_size=16)
    strings, tensors = encoder.tower_identity("image")
    for text in strings:
        h.update(text.encode())
    for tensor in tensors:
        _hash_tensor(h, tensor)
    return h.hexdigest()


def image_cache_key(encoder, records, transform) -> str:
    """Model x preprocessing x image list. Files are identified by relative name, size and modification time
    (cheap to stat for 100k images, unlike hashing their content): a file replaced by another one, even of the
    same size, is a new key. A copy of the dataset that does not keep modification times (``cp`` without
    ``-p``; ``rsync -a`` keeps them) is therefore encoded once more."""
    h = hashlib.blake2b(digest_size=20)
    h.update(
        f"v{CACHE_VERSION}|{image_tower_identity(encoder)}|{transform.identity()}|n={len(records)}".encode()
    )
    for name in records.file_names:
        st = (records.root / name).stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


_IMAGES = _Kind(
    "image",
    IMAGE_ARRAYS,
    ("num_images", "embed_dim", "num_patches"),
    lambda m: {
        "image_embeds": (m["num_images"], m["embed_dim"]),
        "patch_embeds": (m["num_images"], m["num_patches"], m["embed_dim"]),
        "ok": (m["num_images"],),
    },
)


# the same entries plus TagCLIP's patch affinity (its encoder's dense mode is part of the key)
_IMAGES_WITH_AFFINITY = _Kind(
    "image",
    (*IMAGE_ARRAYS, "patch_affinity"),
    _IMAGES.sizes,
    lambda m: {
        **_IMAGES.shapes(m),
        "patch_affinity": (m["num_images"], m["num_patches"], m["num_patches"]),
    },
)


def _image_features(arrays: dict):
    from dbtr.data.images import ImageFeatures

    ok = np.asarray(arrays["ok"], dtype=bool)
    features = ImageFeatures(
        arrays["image_embeds"], arrays["patch_embeds"], np.flatnonzero(ok), arrays.get("patch_affinity")
    )
    return features, ok


def load_image_features(folder: Path, key: str, verify: bool = True):
    """``(ImageFeatures, ok)`` from ``folder``, or None when absent; ``CacheDamaged`` when damaged or
    foreign."""
    arrays = _load_entry(folder, key, _IMAGES, verify)
    return None if arrays is None else _image_features(arrays)


def cached_image_features(encoder, loader, root: str | os.PathLike, progress: str | None = None):
    """Features of ``loader.dataset`` (an ImageDataset) from ``root`` or encoded there:
    ``(features, ok, status)``.

    The arrays are written straight into memory maps inside the temporary folder, so a 40k-image split never
    sits in RAM, and a run killed half-way leaves no folder that reads as complete.
    """
    from numpy.lib.format import open_memmap

    from dbtr.data.images import encode_image_features

    records, transform = loader.dataset.records, loader.dataset.transform
    key = image_cache_key(encoder, records, transform)
    affinity = getattr(encoder, "has_patch_affinity", False)

    def fill(tmp: Path) -> dict:
        dim = encoder.embed_dim
        side = transform.size // encoder.dense_stride
        n = len(records)
        out = (
            open_memmap(tmp / "image_embeds.npy", "w+", np.float16, (n, dim)),
            open_memmap(tmp / "patch_embeds.npy", "w+", np.float16, (n, side * side, dim)),
        )
        if affinity:
            p = side * side
            out = (*out, open_memmap(tmp / "patch_affinity.npy", "w+", np.float16, (n, p, p)))
        _, ok = encode_image_features(encoder, loader, out=out, progress=progress)
        for arr in out:
            arr.flush()
        del out
        np.save(tmp / "ok.npy", ok)
        return {
            "num_images": n,
            "embed_dim": dim,
            "num_patches": side * side,
            "root": str(records.root),
            "transform": transform.identity(),
            "dense": encoder.dense,
        }

    kind = _IMAGES_WITH_AFFINITY if affinity else _IMAGES
    arrays, status = _load_or_build(Path(root) / f"images-{key[:24]}", key, kind, fill)
    return (*_image_features(arrays), status)
