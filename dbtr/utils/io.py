"""Atomic file and folder writes: a killed run never leaves a half-written file that reads as complete.

Files get the permissions an ordinary ``open(path, "w")`` gives (``0666 & ~umask``, or the mode of the file
they replace), not ``tempfile``'s owner-only 0600. A write that fails (disk full, read-only folder) leaves the
target as it was, removes its temporary file and raises :class:`AtomicWriteError`, an ``OSError`` that names
the target path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class AtomicWriteError(OSError):
    """Writing ``filename`` failed; ``errno`` / ``strerror`` are those of the failing call."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def _umask() -> int:
    try:  # Linux: read it without touching the process-wide value (os.umask can only set-and-return)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)  # replacing a file keeps its mode, as open(path, "w") does
    return 0o666 & ~_umask()


def _write_error(err: OSError, path: Path) -> AtomicWriteError:
    return AtomicWriteError(err.errno or errno.EIO, err.strerror or str(err), str(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success fsync it and rename it over ``path``.

    The sibling lives in the same folder (a rename is atomic only within one file system); if the body raises,
    or the process dies, ``path`` keeps its previous content and only a hidden ``.<name>.*.tmp`` can remain.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes only, got mode {mode!r}")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            os.fchmod(fh.fileno(), _new_file_mode(path))
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, AtomicWriteError):
            raise _write_error(err, path) from err
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary sibling, fsync, then rename over ``path``."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------------- folders
# Temporary folders are named .<name>.<host>.<pid>.<random>.tmp: a later run can tell one left by a killed
# process (same host, pid gone) from one another job is still filling (see remove_stale_temporaries).
_HOST = socket.gethostname().replace(".", "_") or "host"


def _temporary_dir(path: Path) -> Path:
    return Path(
        tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
    )


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` in one rename.

    If the body raises, the temporary folder is removed and any existing ``path`` is left untouched. An
    existing ``path`` is replaced, unless ``keep_existing``: then the first complete folder wins
    (rename-if-absent, for caches that two jobs may fill at once) and this one is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_dir(path)
    try:
        yield tmp
        if keep_existing:
            try:  # a rename onto a non-empty folder fails: the check and the publication are one system call
                os.rename(tmp, path)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists():
            old = _temporary_dir(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard_directory(path: str | os.PathLike) -> None:
    """Remove ``path`` so that no reader ever sees it half-deleted: renamed away first, then deleted."""
    path = Path(path)
    trash = _temporary_dir(path)
    try:
        os.replace(path, trash)  # onto the fresh empty folder: atomic
    except FileNotFoundError:
        pass  # already gone (another job discarded it)
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(folder: str | os.PathLike, max_age_s: float = 24 * 3600) -> list[Path]:
    """Delete the temporary folders of :func:`atomic_directory` that a killed run left in ``folder``.

    One made on this host is stale when its process is gone; one from another host (a shared file system) only
    when untouched for ``max_age_s``, since its process cannot be asked. Returns the folders removed.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.glob(".*.tmp"):
        parts = entry.name.rsplit(".", 4)  # [.<name>, host, pid, random, tmp]
        if len(parts) != 5 or not parts[2].isdigit() or not entry.is_dir():
            continue
        host, pid = parts[1], int(parts[2])
        try:
            age = time.time() - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        stale = not _pid_alive(pid) if host == _HOST else age > max_age_s
        if stale and pid != os.getpid():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
