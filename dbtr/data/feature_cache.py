"""On-disk caches of frozen-CLIP features: encode once, reuse in every later run and sweep point.

Captions, per (text tower, tokenizer, corpus, max length), in ``<root>/captions-<key>/``:
    text_embeds.npy (N, D) fp16 | token_embeds.npy (T, D) fp16, real tokens only | offsets.npy (N+1,) int64
Images, per (image tower, dense mode, preprocessing, image list with file sizes), in ``<root>/images-<key>/``:
    image_embeds.npy (N, D) fp16 | patch_embeds.npy (N, P, D) fp16 | ok.npy (N,) bool (False: undecodable)
Each folder has a meta.json (format version, the full key, shapes, a BLAKE2 checksum per array) and is written
atomically: it appears only once complete. Arrays are memory-mapped on read. A cache whose sizes or checksums do
not match its meta.json (a truncated copy, a flipped byte) is reported with a warning and rebuilt; another key
never reads it at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from dbtr.data.captions import CaptionFeatures, encode_caption_features
from dbtr.utils.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_ARRAYS = ("text_embeds", "token_embeds", "offsets")


def _hash_tensor(h, tensor) -> None:
    h.update(tensor.detach().to("cpu").float().contiguous().numpy().tobytes())


def text_tower_identity(encoder) -> str:
    """What the caption features depend on: text config, tokenizer, and weights of the text path."""
    h = hashlib.blake2b(digest_size=16)
    h.update(encoder.model.config.text_config.to_json_string(use_diff=False).encode())
    h.update(str(encoder.model.config.projection_dim).encode())
    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):  # set on the backend by each call: not an identity
            spec.pop(transient, None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(encoder.tokenizer).encode())
    tm = encoder.model.text_model
    for tensor in (tm.embeddings.token_embedding.weight, tm.final_layer_norm.weight, encoder.model.text_projection.weight,
                   tm.encoder.layers[0].self_attn.q_proj.weight, tm.encoder.layers[-1].mlp.fc2.weight):
        _hash_tensor(h, tensor)
    return h.hexdigest()


def caption_cache_key(encoder, texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{CACHE_VERSION}|{text_tower_identity(encoder)}|max_length={encoder.max_length}|n={len(texts)}".encode())
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


def save_caption_features(folder: Path, features: CaptionFeatures, key: str) -> None:
    with atomic_directory(folder) as tmp:
        meta = {"version": CACHE_VERSION, "key": key, "num_captions": len(features),
                "embed_dim": int(features.text_embeds.shape[1]), "num_tokens": int(features.token_embeds.shape[0]),
                }
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(features, name)))
        _write_checksums(tmp, _ARRAYS, meta)


def _load_arrays(folder: Path, key: str, names: Sequence[str], verify: bool) -> tuple[dict, dict] | None:
    """``(meta, memory-mapped arrays)`` of a cache folder, None when absent; ``ValueError`` when damaged or foreign."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{folder}: cache key or version differs from the requested one")
    arrays = {}
    for name in names:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise ValueError(f"{path} is missing")
        if verify and _checksum(path) != meta["checksums"][name]:
            raise ValueError(f"{path} does not match its checksum (truncated or corrupted)")
        arrays[name] = np.load(path, mmap_mode="r")
    return meta, arrays


def load_caption_features(folder: Path, key: str, verify: bool = True) -> CaptionFeatures | None:
    """The cached features, or None when absent; raises ``ValueError`` when present but damaged or foreign."""
    found = _load_arrays(folder, key, _ARRAYS, verify)
    if found is None:
        return None
    meta, arrays = found
    feats = CaptionFeatures(**arrays)
    n, d, t = meta["num_captions"], meta["embed_dim"], meta["num_tokens"]
    if feats.text_embeds.shape != (n, d) or feats.token_embeds.shape != (t, d) or feats.offsets.shape != (n + 1,):
        raise ValueError(f"{folder}: array shapes do not match meta.json")
    return feats


def cached_caption_features(
    encoder, texts: Sequence[str], root: str | os.PathLike, batch_size: int = 256
) -> tuple[CaptionFeatures, str]:
    """Features of ``texts`` from ``root`` (status "hit"), or encoded and stored ("built" / "rebuilt")."""
    key = caption_cache_key(encoder, texts)
    folder = Path(root) / f"captions-{key[:24]}"
    status = "built"
    try:
        feats = load_caption_features(folder, key)
        if feats is not None:
            return feats, "hit"
    except (ValueError, OSError, json.JSONDecodeError) as err:
        log.warning("caption feature cache %s is unusable (%s): rebuilding it", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        status = "rebuilt"
    feats = encode_caption_features(encoder, texts, batch_size=batch_size, progress=True)
    save_caption_features(folder, feats, key)
    return load_caption_features(folder, key, verify=False), status


# ---------------------------------------------------------------------------------------------------- images
IMAGE_ARRAYS = ("image_embeds", "patch_embeds", "ok")


def image_tower_identity(encoder) -> str:
    """What image features depend on: the vision config and weights, the projection and the dense mode."""
    h = hashlib.blake2b(digest_size=16)
    h.update(encoder.model.config.vision_config.to_json_string(use_diff=False).encode())
    h.update(f"proj={encoder.model.config.projection_dim}|dense={encoder.dense}".encode())
    vm = encoder.model.vision_model
    for tensor in (vm.embeddings.patch_embedding.weight, vm.embeddings.position_embedding.weight,
                   vm.encoder.layers[0].self_attn.q_proj.weight, vm.encoder.layers[-1].mlp.fc2.weight,
                   vm.post_layernorm.weight, encoder.model.visual_projection.weight):
        _hash_tensor(h, tensor)
    return h.hexdigest()


def image_cache_key(encoder, records, transform) -> str:
    """Model x preprocessing x image list. Files are identified by relative name and size (cheap to stat for
    100k images, and stable when a dataset is copied elsewhere); a replaced file of a new size is a new key."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{CACHE_VERSION}|{image_tower_identity(encoder)}|{transform.identity()}|n={len(records)}".encode())
    for name in records.file_names:
        h.update(f"{name}\0{(records.root / name).stat().st_size}\0".encode())
    return h.hexdigest()


def _write_checksums(tmp: Path, names: Sequence[str], meta: dict) -> None:
    meta["checksums"] = {name: _checksum(tmp / f"{name}.npy") for name in names}
    atomic_write_json(tmp / "meta.json", meta)


def load_image_features(folder: Path, key: str, verify: bool = True):
    """``(ImageFeatures, ok)`` from ``folder``, or None when absent; ``ValueError`` when damaged or foreign."""
    from dbtr.data.images import ImageFeatures

    found = _load_arrays(folder, key, IMAGE_ARRAYS, verify)
    if found is None:
        return None
    meta, arrays = found
    n = meta["num_images"]
    if arrays["image_embeds"].shape != (n, meta["embed_dim"]) or arrays["patch_embeds"].shape != (n, meta["num_patches"], meta["embed_dim"]) or arrays["ok"].shape != (n,):
        raise ValueError(f"{folder}: array shapes do not match meta.json")
    ok = np.asarray(arrays["ok"], dtype=bool)
    return ImageFeatures(arrays["image_embeds"], arrays["patch_embeds"], np.flatnonzero(ok)), ok


def cached_image_features(encoder, loader, root: str | os.PathLike, progress: str | None = None):
    """Features of ``loader.dataset`` (an ImageDataset) from ``root`` or encoded there: ``(features, ok, status)``.

    The arrays are written straight into memory maps inside the temporary folder, so a 40k-image split never
    sits in RAM, and a run killed half-way leaves no folder that reads as complete.
    """
    from numpy.lib.format import open_memmap

    records, transform = loader.dataset.records, loader.dataset.transform
    key = image_cache_key(encoder, records, transform)
    folder = Path(root) / f"images-{key[:24]}"
    status = "built"
    try:
        found = load_image_features(folder, key)
        if found is not None:
            return (*found, "hit")
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
        log.warning("image feature cache %s is unusable (%s): rebuilding it", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        status = "rebuilt"
    from dbtr.data.images import encode_image_features

    dim = encoder.embed_dim
    side = transform.size // int(encoder.model.config.vision_config.patch_size)
    n = len(records)
    with atomic_directory(folder) as tmp:
        out = (open_memmap(tmp / "image_embeds.npy", "w+", np.float16, (n, dim)),
               open_memmap(tmp / "patch_embeds.npy", "w+", np.float16, (n, side * side, dim)))
        _, ok = encode_image_features(encoder, loader, out=out, progress=progress)
        for arr in out:
            arr.flush()
        del out
        np.save(tmp / "ok.npy", ok)
        _write_checksums(tmp, IMAGE_ARRAYS, {"version": CACHE_VERSION, "key": key, "num_images": n, "embed_dim": dim,
                                             "num_patches": side * side, "root": str(records.root),
                                             "transform": transform.identity(), "dense": encoder.dense})
    feats, ok = load_image_features(folder, key, verify=False)
    return feats, ok, status
