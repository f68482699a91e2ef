"""On-disk cache of caption features: encode once per (text tower, tokenizer, corpus, max length), reuse.

Layout of ``<root>/captions-<key>/`` (written atomically: a folder appears only once complete):
    text_embeds.npy (N, D) fp16 | token_embeds.npy (T, D) fp16, real tokens only | offsets.npy (N+1,) int64
    meta.json: format version, the full key, shapes, and a BLAKE2 checksum per array.
Arrays are memory-mapped on read. A cache whose sizes or checksums do not match its meta.json (a truncated
copy, a flipped byte) is reported with a warning and rebuilt; another key never reads it at all.
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
                "checksums": {}}
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(features, name)))
            meta["checksums"][name] = _checksum(tmp / f"{name}.npy")
        atomic_write_json(tmp / "meta.json", meta)


def load_caption_features(folder: Path, key: str, verify: bool = True) -> CaptionFeatures | None:
    """The cached features, or None when absent; raises ``ValueError`` when present but damaged or foreign."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{folder}: cache key or version differs from the requested one")
    arrays = {}
    for name in _ARRAYS:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise ValueError(f"{path} is missing")
        if verify and _checksum(path) != meta["checksums"][name]:
            raise ValueError(f"{path} does not match its checksum (truncated or corrupted)")
        arrays[name] = np.load(path, mmap_mode="r")
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
