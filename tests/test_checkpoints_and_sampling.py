"""Atomic, weights-only checkpoint files; the caption sampler that makes DDP steps equal single-process
steps."""

from __future__ import annotations

import os

import pytest
import torch

from dbtr.data.sampling import GlobalBatchSampler
from dbtr.system.checkpoint_io import AtomicCheckpointIO


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # fails half-way through torch.save, after bytes were written


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "epoch": 2, "bad": _Unpicklable()}, path)
    assert io.load_checkpoint(path)["epoch"] == 1  # the old file, complete
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left behind


def test_checkpoints_load_weights_only(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "x.ckpt"
    io.save_checkpoint({"obj": _Plain()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        io.load_checkpoint(path)  # an arbitrary pickled object is refused


class _Plain:
    pass


def _batches(sampler: GlobalBatchSampler, per_device: int) -> list[list[int]]:
    batches = [b.tolist() for b in sampler]
    assert len(batches) == len(sampler) and all(len(b) <= per_device for b in batches)
    return batches


@pytest.mark.parametrize("n, batch, world", [(96, 64, 2), (100, 32, 4), (65, 64, 2), (97, 8, 4), (5, 4, 2)])
def test_processes_split_each_single_process_batch(n, batch, world):
    """Step k on W processes sees exactly the captions of step k on one process (same seed and epoch)."""
    single = GlobalBatchSampler(n, batch, seed=3)
    single.set_epoch(2)
    want = _batches(single, batch)
    shards = []
    for rank in range(world):
        s = GlobalBatchSampler(n, batch, world, rank, seed=3)
        s.set_epoch(2)
        shards.append(_batches(s, batch // world))
    assert {len(b) for b in shards} == {len(want)}  # every process takes the same number of steps
    for k, batch_k in enumerate(want):
        union = sorted(i for shard in shards for i in shard[k])
        if len(batch_k) >= world:
            assert union == sorted(batch_k)
        else:  # a last batch smaller than the process count is padded with items from the epoch's start
            assert set(batch_k) <= set(union) and len(union) == world
    assert sorted(i for b in want for i in b) == list(range(n))


def test_order_depends_on_seed_and_epoch_only():
    a, b, c = (GlobalBatchSampler(50, 10, seed=s) for s in (1, 1, 2))
    flat = lambda s: torch.cat(list(s)).tolist()  # noqa: E731
    assert flat(a) == flat(b) and flat(a) != flat(c)
    a.set_epoch(1)
    assert flat(a) != flat(b) and sorted(flat(a)) == list(range(50))


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        GlobalBatchSampler(10, 8, num_replicas=3)


def test_epoch_set_after_iter_still_orders_that_epoch():
    """On a resume Lightning may create the loader's iterator before set_epoch: the order is drawn lazily."""
    s, want = GlobalBatchSampler(40, 8, seed=2), GlobalBatchSampler(40, 8, seed=2)
    want.set_epoch(3)
    batches = iter(s)
    s.set_epoch(3)
    assert [b.tolist() for b in batches] == [b.tolist() for b in want]


@pytest.mark.parametrize("n, batch, world", [(96, 64, 1), (100, 32, 4), (97, 8, 2)])
def test_drop_last_leaves_out_the_incomplete_batch_and_keeps_the_rest(n, batch, world):
    """TaI-DPT's caption loader drops the last incomplete batch: the full batches are as without it."""
    for rank in range(world):
        keep, drop = (GlobalBatchSampler(n, batch, world, rank, seed=5, drop_last=d) for d in (False, True))
        for s in (keep, drop):
            s.set_epoch(1)
        full = [b.tolist() for b in keep][: n // batch]
        assert [b.tolist() for b in drop] == full and len(drop) == n // batch == len(keep) - 1
        assert all(len(b) == batch // world for b in full)


def test_drop_last_keeps_a_single_incomplete_batch():
    """As Dassl's loader (drop_last = len(data) >= batch): fewer captions than a batch still train."""
    s = GlobalBatchSampler(5, 8, seed=0, drop_last=True)
    assert len(s) == 1 and sorted(next(iter(s)).tolist()) == list(range(5))
