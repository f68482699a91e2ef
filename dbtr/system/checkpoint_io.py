"""Checkpoints for resuming: a ``last.ckpt`` after every epoch, written atomically, loaded weights-only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint

from dbtr.utils.io import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, then ``os.replace``.

    A run killed while saving leaves the previous ``last.ckpt`` intact (plus a hidden ``.*.tmp``), never a
    truncated file that ``ckpt_path=last`` would read as complete. Loading defaults to ``weights_only=True``:
    dbtr checkpoints hold tensors and plain Python values only (the head's residuals, optimizer and loop
    state, hyper-parameters as dicts/lists/strings), so nothing needs unpickling.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote file systems: fsspec's transactional write
            return super().save_checkpoint(checkpoint, path)
        with atomic_open(Path(path), "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path, map_location=map_location, weights_only=True if weights_only is None else weights_only
        )


class LastEpochCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` at the end of every epoch, for ``ckpt_path=last``.

    Lightning's ``save_last=True`` only refreshes ``last.ckpt`` when the monitored checkpoint improves, so
    after a kill it would resume from the best epoch, not the latest one. This callback keeps the best-on-val
    ``ModelCheckpoint`` untouched and owns ``last.ckpt`` alone (the other must keep ``save_last`` off).
    """

    def __init__(self, dirpath: str):
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )

    @property
    def state_key(self) -> str:
        # distinct from a ModelCheckpoint that also has no monitor (no validation split),
        # or Lightning refuses both
        return type(self).__name__
