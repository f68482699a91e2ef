"""The one reader of user text files: UTF-8 with or without a byte-order mark, errors that name file and line.

Every class list, caption file, label JSON-lines file, vocabulary and image list is read through
:func:`read_text` / :func:`iter_lines` (or :func:`iter_jsonl` / :func:`load_json` on top of them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbtr.utils.errors import UserError


class DataFormatError(UserError):
    """A data file does not have the expected content; the message names the file and line."""


def _not_utf8(path: Path, line: int, byte: int) -> DataFormatError:
    return DataFormatError(
        f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}): save the file as UTF-8 (in most "
        "editors: Save As, encoding UTF-8) and run again"
    )


def read_text(path: str | os.PathLike) -> str:
    """The whole text of a user file: UTF-8, a leading byte-order mark dropped (Windows editors write one, and
    it would otherwise stick to the first class name or key); not UTF-8 is an error naming the file and
    line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.object[: err.start].count(b"\n") + 1, err.object[err.start]) from None


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line of a user text file, streamed, decoded as :func:`read_text`
    does."""
    path = Path(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, lineno, err.object[err.start]) from None


def load_json(path: str | os.PathLike, expected: str, error: type[ValueError] | None = None):
    """Parse a whole JSON file; a missing file or malformed JSON raises an error naming the file (and
    line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path} (expected {expected})")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise (error or DataFormatError)(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; malformed JSON raises with file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON-lines file not found: {path}")
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); each line "
                "must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record
