"""The on-disk caption feature cache: hits, keys, damage detection, atomic writes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dbtr.data.captions import encode_caption_features
from dbtr.data.feature_cache import caption_cache_key, cached_caption_features, save_caption_features

TEXTS = ["a red square", "a blue ball and a green box", "two purple blocks"]


def _folder(root):
    (folder,) = [p for p in root.iterdir() if p.name.startswith("captions-")]
    return folder


def test_build_then_hit_returns_the_same_memory_mapped_features(encoder, tmp_path):
    feats, status = cached_caption_features(encoder, TEXTS, tmp_path)
    assert status == "built"
    again, status = cached_caption_features(encoder, TEXTS, tmp_path)
    assert status == "hit" and isinstance(again.token_embeds, np.memmap)
    fresh = encode_caption_features(encoder, TEXTS)
    np.testing.assert_array_equal(np.asarray(again.token_embeds), fresh.token_embeds)
    np.testing.assert_array_equal(np.asarray(again.offsets), fresh.offsets)
    # ragged fp16 storage: bytes per caption well under a dense 77 x D float32 layout
    per_caption = (again.token_embeds.nbytes + again.text_embeds.nbytes + again.offsets.nbytes) / len(TEXTS)
    assert per_caption < 0.25 * 77 * encoder.embed_dim * 4


def test_key_changes_with_corpus_tokenizer_length_and_weights(encoder):
    base = caption_cache_key(encoder, TEXTS)
    assert caption_cache_key(encoder, TEXTS[:2]) != base
    assert caption_cache_key(encoder, [TEXTS[1], TEXTS[0], TEXTS[2]]) != base
    length = encoder.max_length
    encoder.max_length = length - 1
    assert caption_cache_key(encoder, TEXTS) != base
    encoder.max_length = length
    with torch.no_grad():
        encoder.model.text_projection.weight[0, 0] += 1e-3
    assert caption_cache_key(encoder, TEXTS) != base


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(encoder, tmp_path, caplog, damage):
    cached_caption_features(encoder, TEXTS, tmp_path)
    path = _folder(tmp_path) / "token_embeds.npy"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        feats, status = cached_caption_features(encoder, TEXTS, tmp_path)
    assert status == "rebuilt" and "unusable" in caplog.text
    np.testing.assert_array_equal(np.asarray(feats.token_embeds), encode_caption_features(encoder, TEXTS).token_embeds)


def test_interrupted_write_leaves_no_cache(encoder, tmp_path, monkeypatch):
    feats = encode_caption_features(encoder, TEXTS)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_caption_features(tmp_path / "captions-x", feats, "x")
    assert list(tmp_path.iterdir()) == []
