"""Atomic writes (dbtr.utils.io): usual permissions, and a failed write leaves nothing and names its
target."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from dbtr.utils import io
from dbtr.utils.io import (
    AtomicWriteError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_get_0666_minus_umask_like_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
        written = atomic_write_text(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(old)
    assert _mode(written) == 0o666 & ~umask == _mode(tmp_path / "plain.txt")


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic_write_json(path, {"a": 1})
    assert _mode(path) == 0o640 and path.read_text().startswith("{")


def test_a_missing_parent_folder_is_created(tmp_path):
    assert atomic_write_bytes(tmp_path / "a" / "b" / "c.png", b"png").read_bytes() == b"png"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("where", ["write", "replace"])
def test_disk_full_leaves_the_old_file_no_temporary_and_names_the_target(tmp_path, monkeypatch, where):
    path = tmp_path / "out" / "metrics.json"
    atomic_write_text(path, "old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "replace":
        monkeypatch.setattr(io.os, "replace", full)
    else:
        monkeypatch.setattr(io.os, "fsync", full)  # the data reaches the disk at fsync: where ENOSPC shows
    with pytest.raises(OSError) as info:
        atomic_write_text(path, "new content")
    err = info.value
    assert isinstance(err, AtomicWriteError) and err.errno == errno.ENOSPC and err.filename == str(path)
    assert str(err) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "old" and _leftovers(path.parent) == ["metrics.json"]


def test_an_unwritable_folder_names_the_target(tmp_path, monkeypatch):
    # tests may run as root, for whom chmod does not make a folder read-only: refuse the temporary file
    # instead
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    with pytest.raises(AtomicWriteError, match=f"cannot write {tmp_path / 'x.txt'}: Read-only file system"):
        atomic_write_text(tmp_path / "x.txt", "x")
    assert _leftovers(tmp_path) == []


def test_a_parent_that_is_a_file_names_the_target(tmp_path):
    (tmp_path / "plots").write_text("not a folder")
    with pytest.raises(AtomicWriteError, match="cannot write .*plots/heatmaps.png") as info:
        atomic_write_bytes(tmp_path / "plots" / "heatmaps.png", b"x")
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)


def test_a_failed_body_is_not_wrapped_and_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError), io.atomic_open(tmp_path / "x.bin") as fh:
        fh.write(b"half")
        raise ZeroDivisionError
    assert _leftovers(tmp_path) == []


def test_atomic_directory_keep_existing_keeps_the_first(tmp_path):
    target = tmp_path / "entry"
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "a").write_text("first")
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "first" and _leftovers(tmp_path) == ["entry"]
    with atomic_directory(target) as tmp:  # the default replaces
        (tmp / "a").write_text("third")
    assert (target / "a").read_text() == "third" and _leftovers(tmp_path) == ["entry"]
