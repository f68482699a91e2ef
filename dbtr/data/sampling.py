"""Caption order for training: one shuffle per epoch, each global batch split across the DDP processes.

With ``data.batch_size`` the global batch, step ``k`` of a run on W processes sees exactly the captions of
step ``k`` of a single-process run with the same seed: process ``r`` takes the ``r``-th slice of that global
batch. DDP averages the per-process mean losses, so (with equal slices) the gradients equal the
single-process ones up to float rounding. Torch's DistributedSampler instead deals captions round-robin over
the whole epoch, which gives other batches than one process would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from dbtr.utils.seeding import derive_seed


class GlobalBatchSampler(DistributedSampler):
    """Shuffles ``range(num_items)`` from ``(seed, epoch)`` and yields this process's slice of every global
    batch, one index tensor (int64) per step: the dataset gathers the whole batch at once (``batch_size=None``
    loader).

    A subclass of DistributedSampler so Lightning keeps it under DDP (it only swaps in its own sampler when
    none is distributed) and calls ``set_epoch`` before every epoch, including the first one after a resume.
    Every process yields ``ceil(num_items / global_batch_size)`` batches of ``global_batch_size / W`` (the
    last may be smaller); a last global batch with fewer items than processes is padded from the epoch's start
    so every process takes the same number of steps. ``drop_last`` leaves the last incomplete global batch
    out instead, as torch's ``DataLoader(drop_last=True)`` does in TaI-DPT, if there is a full batch at all.
    """

    def __init__(
        self,
        num_items: int,
        global_batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if num_items <= 0:
            raise ValueError("there are no training captions to sample from")
        if global_batch_size <= 0 or global_batch_size % num_replicas:
            raise ValueError(
                f"data.batch_size={global_batch_size} (the global batch) must be a positive multiple of the "
                f"{num_replicas} processes"
            )
        super().__init__(range(num_items), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_items, self.global_batch_size = num_items, global_batch_size
        # TaI-DPT (Dassl) drops the last batch only when there is a full one: drop_last=len(data) >= batch
        self.drop_last = bool(drop_last) and num_items >= global_batch_size

    def batches(self) -> list[Tensor]:
        """This process's index tensor of every step of the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed("captions", self.seed, self.epoch))
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        mine = []
        for start in range(0, len(self) * self.global_batch_size, self.global_batch_size):
            batch = order[start : start + self.global_batch_size]
            if len(batch) < self.num_replicas:
                batch = torch.cat(
                    [batch, order[torch.arange(self.num_replicas - len(batch)) % self.num_items]]
                )
            mine.append(batch.tensor_split(self.num_replicas)[self.rank])
        return mine

    def __iter__(self) -> Iterator[Tensor]:
        # lazily: Lightning may create the loader's iterator before it calls set_epoch (on a resume), so the
        # epoch's order is drawn at the first batch, not when iter() is called
        yield from self.batches()

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // self.global_batch_size
        return -(-self.num_items // self.global_batch_size)
