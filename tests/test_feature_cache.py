"""The on-disk feature caches (captions and images): hits, keys, damage detection, atomic and concurrent
writes."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import time

import numpy as np
import pytest
import torch

from dbtr.data.captions import encode_caption_features
from dbtr.data.feature_cache import (
    cached_caption_features,
    cached_image_features,
    caption_cache_key,
    image_cache_key,
    save_caption_features,
)
from dbtr.utils.io import remove_stale_temporaries

TEXTS = ["a red square", "a blue ball and a green box", "two purple blocks"]


def _folder(root, prefix="captions-"):
    (folder,) = [p for p in root.iterdir() if p.name.startswith(prefix)]
    return folder


def _image_loader(demo_dir, encoder, root=None):
    from torch.utils.data import DataLoader

    from dbtr.data.images import ClipImageTransform, ImageDataset, read_image_jsonl

    classes = (demo_dir / "classes.txt").read_text().split()
    records = read_image_jsonl(root or demo_dir / "images", demo_dir / "val.jsonl", classes)
    return DataLoader(ImageDataset(records, ClipImageTransform(encoder.image_size)), batch_size=8)


def test_build_then_hit_returns_the_same_memory_mapped_features(encoder, tmp_path):
    _, status = cached_caption_features(encoder, TEXTS, tmp_path)
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


# Every way an entry can be damaged: the array files, and a meta.json that is valid JSON but not what we
# wrote.
def _truncate(folder, array):
    path = folder / f"{array}.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(folder, array):
    path = folder / f"{array}.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_meta(change):
    def damage(folder, array):
        path = folder / "meta.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()), array)))

    return damage


def _drop(key):
    return lambda meta, array: {k: v for k, v in meta.items() if k != key}


DAMAGE = {
    "truncated array": _truncate,
    "flipped byte": _flip,
    "array missing": lambda folder, array: (folder / f"{array}.npy").unlink(),
    "meta.json missing": lambda folder, array: (folder / "meta.json").unlink(),
    "meta.json not JSON": lambda folder, array: (folder / "meta.json").write_text("{not json"),
    "meta.json a list": _edit_meta(lambda meta, array: [meta]),
    "meta.json null": _edit_meta(lambda meta, array: None),
    "no checksums": _edit_meta(_drop("checksums")),
    "checksums a list": _edit_meta(
        lambda meta, array: {**meta, "checksums": list(meta["checksums"].values())}
    ),
    "one checksum missing": _edit_meta(
        lambda meta, array: {**meta, "checksums": {k: v for k, v in meta["checksums"].items() if k != array}}
    ),
    "checksum a number": _edit_meta(
        lambda meta, array: {**meta, "checksums": {**meta["checksums"], array: 3}}
    ),
    "size missing": _edit_meta(_drop("embed_dim")),
    "size a string": _edit_meta(lambda meta, array: {**meta, "embed_dim": str(meta["embed_dim"])}),
    "size wrong": _edit_meta(lambda meta, array: {**meta, "embed_dim": meta["embed_dim"] + 1}),
    "no key": _edit_meta(_drop("key")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_caption_cache_is_rebuilt_with_one_warning(encoder, tmp_path, caplog, damage):
    cached_caption_features(encoder, TEXTS, tmp_path)
    DAMAGE[damage](_folder(tmp_path), "token_embeds")
    with caplog.at_level(logging.WARNING):
        feats, status = cached_caption_features(encoder, TEXTS, tmp_path)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert status == "rebuilt" and len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    np.testing.assert_array_equal(
        np.asarray(feats.token_embeds), encode_caption_features(encoder, TEXTS).token_embeds
    )
    assert cached_caption_features(encoder, TEXTS, tmp_path)[1] == "hit"  # the rebuilt entry is sound
    assert [p.name for p in tmp_path.iterdir()] == [_folder(tmp_path).name]  # nothing left beside it


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_image_cache_is_rebuilt_with_one_warning(encoder, demo_dir, tmp_path, caplog, damage):
    loader = _image_loader(demo_dir, encoder)
    feats, ok, status = cached_image_features(encoder, loader, tmp_path)
    assert status == "built" and ok.all()
    expected = np.asarray(feats.patch_embeds).copy()
    DAMAGE[damage](_folder(tmp_path, "images-"), "patch_embeds")
    with caplog.at_level(logging.WARNING):
        feats, ok, status = cached_image_features(encoder, loader, tmp_path)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert status == "rebuilt" and len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    np.testing.assert_array_equal(np.asarray(feats.patch_embeds), expected)
    assert cached_image_features(encoder, loader, tmp_path)[2] == "hit"


def test_an_image_replaced_by_another_of_the_same_size_is_a_new_key(encoder, demo_dir, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(demo_dir / "images", root)
    loader = _image_loader(demo_dir, encoder, root)
    _, _, status = cached_image_features(encoder, loader, tmp_path / "cache")
    assert status == "built"
    key = image_cache_key(encoder, loader.dataset.records, loader.dataset.transform)
    first, other = (root / n for n in loader.dataset.records.file_names[:2])
    data = bytearray(
        first.read_bytes()
    )  # same size, other pixels: swap in the other image's bytes if they fit
    swapped = (
        other.read_bytes() if other.stat().st_size == len(data) else bytes(data[:-1] + bytes([data[-1] ^ 1]))
    )
    stat = first.stat()
    first.write_bytes(swapped)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # written a second later
    assert first.stat().st_size == stat.st_size
    assert image_cache_key(encoder, loader.dataset.records, loader.dataset.transform) != key
    _, _, status = cached_image_features(encoder, loader, tmp_path / "cache")
    assert status == "built"  # not a stale "hit"


def test_interrupted_write_leaves_no_cache(encoder, tmp_path, monkeypatch):
    feats = encode_caption_features(encoder, TEXTS)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_caption_features(tmp_path / "captions-x", feats, "x")
    assert list(tmp_path.iterdir()) == []


def _publish_after(folder, features, key, barrier, delay):
    barrier.wait()
    time.sleep(delay)
    features.text_embeds += delay  # tell the two entries apart (real ones are equal)
    save_caption_features(folder, features, key)


def test_two_jobs_publishing_the_same_entry_keep_the_first_and_never_show_a_half_one(encoder, tmp_path):
    feats = encode_caption_features(encoder, TEXTS)
    key, folder = "k" * 40, tmp_path / "captions-k"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    jobs = [ctx.Process(target=_publish_after, args=(folder, feats, key, barrier, d)) for d in (0.0, 0.5)]
    for job in jobs:
        job.start()
    barrier.wait()
    seen = set()
    while any(job.is_alive() for job in jobs):  # a reader polling meanwhile: absent, or complete
        if folder.exists():
            seen.add(tuple(sorted(p.name for p in folder.iterdir())))
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    complete = ("meta.json", "offsets.npy", "text_embeds.npy", "token_embeds.npy")
    assert seen <= {complete}
    assert tuple(sorted(p.name for p in folder.iterdir())) == complete
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # the loser's temporary folder is gone
    from dbtr.data.feature_cache import load_caption_features

    kept = load_caption_features(folder, key)
    np.testing.assert_array_equal(
        np.asarray(kept.text_embeds), feats.text_embeds
    )  # the first one, not replaced


def test_temporary_folders_of_killed_runs_are_removed_on_the_next_start(encoder, tmp_path):
    from dbtr.utils.io import _HOST

    proc = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()  # a process that has exited: its pid is (almost surely) free now
    dead = tmp_path / f".captions-abc.{_HOST}.{proc.pid}.x1y2.tmp"
    alive = tmp_path / f".captions-abc.{_HOST}.{os.getppid()}.x1y3.tmp"  # held by a live process
    remote_old = tmp_path / ".captions-abc.otherhost.1.x1y4.tmp"
    remote_new = tmp_path / ".captions-abc.otherhost.2.x1y5.tmp"
    for d in (dead, alive, remote_old, remote_new):
        d.mkdir()
        (d / "text_embeds.npy").write_bytes(b"partial")
    os.utime(remote_old, (time.time() - 3 * 86400,) * 2)
    cached_caption_features(encoder, TEXTS, tmp_path)
    left = {p.name for p in tmp_path.iterdir()}
    assert dead.name not in left and remote_old.name not in left
    assert {alive.name, remote_new.name} <= left
    assert remove_stale_temporaries(tmp_path) == []
