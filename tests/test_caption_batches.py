"""Caption batches gathered in one go from the ragged cache: the same captions, order and tensors per step as
the per-item path they replaced (single process and every DDP slice); inconsistent caches are refused."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dbtr.data.captions import CaptionCollate, CaptionDataset, CaptionFeatures, CaptionRecords
from dbtr.data.datamodule import TextToImageDataModule
from dbtr.data.feature_cache import (
    CacheDamaged,
    cached_caption_features,
    load_caption_features,
    save_caption_features,
)
from dbtr.utils.seeding import derive_seed


def _corpus(n: int, classes: int = 6, dim: int = 8, seed: int = 0) -> tuple[CaptionRecords, CaptionFeatures]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = np.where(rng.random((n, classes)) < 0.3, 1, -1).astype(np.int8)
    feats = CaptionFeatures(
        rng.standard_normal((n, dim)).astype(np.float16),
        rng.standard_normal((int(offsets[-1]), dim)).astype(np.float16),
        offsets,
    )
    return CaptionRecords([f"caption {i}" for i in range(n)], labels), feats


# ---- the per-item path as it was: a flat per-process index list, one dict per caption, padded in the collate
def _old_indices(n, global_batch, world, rank, seed, epoch):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("captions", seed, epoch)))
    mine = []
    for start in range(0, n, global_batch):
        batch = order[start : start + global_batch]
        if len(batch) < world:
            batch = torch.cat([batch, order[torch.arange(world - len(batch)) % n]])
        mine.extend(batch.tensor_split(world)[rank].tolist())
    return mine


def _old_item(records, feats, i):
    tokens = feats.token_embeds[feats.offsets[i] : feats.offsets[i + 1]]
    return {
        "labels": torch.from_numpy(records.labels[i].astype(np.int64)),
        "text_embeds": torch.from_numpy(np.array(feats.text_embeds[i])),
        "token_embeds": torch.from_numpy(np.array(tokens)),
    }


def _old_collate(items):
    length = max(len(it["token_embeds"]) for it in items)
    padded = torch.zeros(len(items), length, items[0]["token_embeds"].shape[-1], dtype=torch.float16)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for j, it in enumerate(items):
        padded[j, : len(it["token_embeds"])] = it["token_embeds"]
        mask[j, : len(it["token_embeds"])] = True
    return {
        "labels": torch.stack([it["labels"] for it in items]),
        "text_embeds": torch.stack([it["text_embeds"] for it in items]),
        "token_embeds": padded,
        "attention_mask": mask,
    }


def _old_batches(records, feats, global_batch, world, rank, seed, epoch):
    idx = _old_indices(len(records.texts), global_batch, world, rank, seed, epoch)
    per = global_batch // world
    return [
        _old_collate([_old_item(records, feats, i) for i in idx[s : s + per]])
        for s in range(0, len(idx), per)
    ]


def _datamodule(records, feats, global_batch, world, rank):
    dm = TextToImageDataModule(
        classes=[f"c{i}" for i in range(records.labels.shape[1])], batch_size=global_batch
    )
    dm.captions = records
    dm.set_caption_features(feats)
    dm.trainer = SimpleNamespace(
        world_size=world, global_rank=rank, strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )
    return dm


@pytest.mark.parametrize(
    "n, global_batch, world", [(103, 16, 1), (103, 16, 2), (97, 8, 4), (5, 4, 2), (64, 64, 4)]
)
def test_gathered_batches_equal_the_per_item_path(n, global_batch, world, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    records, feats = _corpus(n)
    for rank in range(world):
        loader = _datamodule(records, feats, global_batch, world, rank).train_dataloader()
        for epoch in (0, 3):
            loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
            got = list(loader)
            want = _old_batches(records, feats, global_batch, world, rank, 7, epoch)
            assert len(got) == len(want) == len(loader)
            for a, b in zip(got, want):
                assert a.keys() == b.keys()
                for key in b:
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_memory_mapped_cache_gathers_like_in_memory_arrays(encoder, tmp_path):
    texts = [
        "a dog on a sofa",
        "two cats",
        "a red bus near a very long row of parked cars and a bicycle",
        "sky",
    ]
    feats, status = cached_caption_features(encoder, texts, tmp_path)
    assert status == "built" and isinstance(feats.token_embeds, np.memmap)
    in_memory = CaptionFeatures(
        np.array(feats.text_embeds), np.array(feats.token_embeds), np.array(feats.offsets)
    )
    index = torch.tensor([2, 0, 3])
    got, want = feats.gather(index), in_memory.gather(index)
    assert all(torch.equal(got[k], want[k]) for k in want)
    lengths = np.diff(feats.offsets)[index.numpy()]
    assert (
        got["attention_mask"].sum(1).tolist() == lengths.tolist()
        and got["token_embeds"].shape[1] == lengths.max()
    )


def test_raw_text_batches_are_tokenised_as_a_whole():
    records, _ = _corpus(10)
    batch = CaptionDataset(records)[torch.tensor([4, 1])]
    assert batch["text"] == ["caption 4", "caption 1"] and batch["labels"].dtype == torch.int64
    with pytest.raises(RuntimeError, match="need a tokenizer"):
        CaptionCollate()(batch)


class _Unchecked:
    """Arrays written as a cache entry without the consistency check (a writer bug, an edited file)."""

    def __init__(self, feats, offsets):
        self.text_embeds, self.token_embeds, self.offsets = feats.text_embeds, feats.token_embeds, offsets

    def __len__(self):
        return len(self.offsets) - 1


@pytest.mark.parametrize("bad", ["beyond the tokens", "short of the tokens", "decreasing"])
def test_offsets_that_disagree_with_the_tokens_are_refused(tmp_path, bad):
    _, feats = _corpus(6)
    offsets = feats.offsets.copy()
    if bad == "beyond the tokens":
        offsets[-1] += 5
    elif bad == "short of the tokens":
        offsets[-1] -= 1
    else:
        offsets[2], offsets[3] = offsets[3], offsets[2]
    with pytest.raises(ValueError, match="inconsistent caption features"):
        CaptionFeatures(feats.text_embeds, feats.token_embeds, offsets)
    folder = tmp_path / "captions-x"
    save_caption_features(folder, _Unchecked(feats, offsets), "x")  # checksums match: only the check can tell
    with pytest.raises(CacheDamaged, match="offsets"):
        load_caption_features(folder, "x")


def test_an_inconsistent_cache_entry_is_rebuilt_with_one_warning(encoder, tmp_path, caplog):
    texts = ["a dog", "a cat on a mat", "bus"]
    feats, _ = cached_caption_features(encoder, texts, tmp_path)
    folder = next(tmp_path.glob("captions-*"))
    key = json.loads((folder / "meta.json").read_text())["key"]
    offsets = np.array(feats.offsets)
    offsets[1:] += 3  # points past the end of the token array
    wrong = _Unchecked(
        CaptionFeatures(np.array(feats.text_embeds), np.array(feats.token_embeds), np.array(feats.offsets)),
        offsets,
    )
    shutil.rmtree(folder)
    save_caption_features(folder, wrong, key)
    with caplog.at_level(logging.WARNING):
        again, status = cached_caption_features(encoder, texts, tmp_path)
    assert status == "rebuilt" and np.array_equal(again.offsets, feats.offsets)
    assert sum("unusable" in r.getMessage() and "offsets" in r.getMessage() for r in caplog.records) == 1


def test_features_held_as_tensors_gather_the_same_batches():
    """The path taken when the features live on the accelerator (here: CPU tensors)."""
    records, feats = _corpus(40)
    index = torch.tensor([5, 39, 0, 17, 17])
    want = CaptionDataset(records, feats)[index]
    got = CaptionDataset(records, feats.to("cpu"))[index]
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def test_features_move_to_the_accelerator_only_when_they_fit(monkeypatch, caplog):
    """Checked against the device's free memory (faked here: no GPU in the tests); too big = host memory and a
    one-line notice, never an out-of-memory error halfway through an epoch."""
    from dbtr.data import captions

    _, feats = _corpus(30)
    moved = []
    monkeypatch.setattr(CaptionFeatures, "to", lambda self, device: moved.append(str(device)) or "on device")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(captions.torch.cuda, "mem_get_info", lambda device: (feats.nbytes, 10 * feats.nbytes))
    with caplog.at_level(logging.WARNING):
        assert captions.features_on_device(feats, cuda) is feats
    assert not moved and sum("stay in host memory" in r.getMessage() for r in caplog.records) == 1
    _, roomy = _corpus(30)
    monkeypatch.setattr(
        captions.torch.cuda, "mem_get_info", lambda device: (100 * feats.nbytes, 100 * feats.nbytes)
    )
    assert captions.features_on_device(roomy, cuda) == "on device"
    assert captions.features_on_device(roomy, cuda) == "on device" and moved == ["cuda:0"]  # moved once
    assert captions.features_on_device(roomy, torch.device("cpu")) is roomy
