"""Finding trained checkpoints on disk (for notebooks and scripts that take "the newest run" by default)."""

from __future__ import annotations

import os
from pathlib import Path


def has_local_branch(ckpt: str | os.PathLike) -> bool:
    """Whether the checkpoint's head has the local (patch-level) branch, i.e. has attention maps to draw."""
    import torch

    state = torch.load(
        ckpt, map_location="cpu", weights_only=True, mmap=True
    )  # mmap: the weights stay unread
    head = (state.get("hyper_parameters") or {}).get("head") or {}
    return bool(head.get("use_local", True))  # DualBranchHead's default


def find_checkpoint(root: str | os.PathLike, needs_local: bool = True, name: str = "last.ckpt") -> Path:
    """The newest ``name`` under ``root`` (recursively; e.g. ``logs``), skipping, with ``needs_local``, those
    whose model has no local branch (global-only sweep points cannot show heatmaps).

    Raises ``FileNotFoundError`` saying what was searched and what was skipped.
    """
    root = Path(root)
    found = (
        sorted(root.rglob(name), key=lambda p: p.stat().st_mtime_ns, reverse=True) if root.is_dir() else []
    )
    skipped = 0
    for ckpt in found:
        if not needs_local or has_local_branch(ckpt):
            return ckpt
        skipped += 1
    what = f"{name} with a local branch" if needs_local else name
    why = f" ({skipped} found, all without a local branch: head.use_local=false)" if skipped else ""
    raise FileNotFoundError(
        f"no {what} under {root}{why}: train one, e.g. `dbtr-train experiment=toyworld`, "
        "or give the checkpoint's path"
    )
