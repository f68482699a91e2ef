"""find_checkpoint: the newest checkpoint under a folder, skipping global-only models when heatmaps are
wanted."""

from __future__ import annotations

import os

import pytest
import torch

from dbtr.utils.runs import find_checkpoint


def _ckpt(path, use_local, mtime):
    path.parent.mkdir(parents=True)
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"head": {"use_local": use_local}}}, path
    )
    os.utime(path, (mtime, mtime))
    return path


def test_newest_checkpoint_with_a_local_branch(tmp_path):
    old_local = _ckpt(tmp_path / "train/runs/a/checkpoints/last.ckpt", True, 1_000)
    new_global = _ckpt(tmp_path / "train/multiruns/b/0/checkpoints/last.ckpt", False, 2_000)
    assert find_checkpoint(tmp_path) == old_local  # the newer one cannot draw heatmaps
    assert find_checkpoint(tmp_path, needs_local=False) == new_global
    newest = _ckpt(tmp_path / "train/runs/c/checkpoints/last.ckpt", True, 3_000)
    assert find_checkpoint(tmp_path) == newest


def test_nothing_usable_says_what_was_skipped(tmp_path):
    _ckpt(tmp_path / "runs/b/checkpoints/last.ckpt", False, 2_000)
    with pytest.raises(FileNotFoundError, match=r"1 found, all without a local branch"):
        find_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no last.ckpt under .*missing"):
        find_checkpoint(tmp_path / "missing", needs_local=False)
