"""Label spaces and label records read from JSON-lines files, with errors that name file and line.

Also the one reader of user text files (:func:`read_text`, :func:`iter_lines`): UTF-8 with or without a
byte-order mark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dbtr.utils.errors import UserError
from dbtr.zeroshot.classifier import validate_class_names


class DataFormatError(UserError):
    """A data file does not have the expected content; the message names the file and line."""


def _not_utf8(path: Path, line: int, byte: int) -> DataFormatError:
    return DataFormatError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}): save the file as UTF-8 (in most "
                           "editors: Save As, encoding UTF-8) and run again")


def read_text(path: str | os.PathLike) -> str:
    """The whole text of a user file: UTF-8, a leading byte-order mark dropped (Windows editors write one, and
    it would otherwise stick to the first class name or key); not UTF-8 is an error naming the file and line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.object[: err.start].count(b"\n") + 1, err.object[err.start]) from None


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line of a user text file, streamed, decoded as :func:`read_text` does."""
    path = Path(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, lineno, err.object[err.start]) from None


def load_class_names(classes: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names from a list, or from a text file with one name per line (blank lines and # comments skipped)."""
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"class list file not found: {path} (expected one class name per line)")
        names = [ln.strip() for ln in read_text(path).splitlines()]
        return validate_class_names([n for n in names if n and not n.startswith("#")], source=str(path))
    return validate_class_names(list(classes))


def load_json(path: str | os.PathLike, expected: str, error: type[ValueError] | None = None):
    """Parse a whole JSON file; a missing file or malformed JSON raises an error naming the file (and line)."""
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
            raise DataFormatError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); each line "
                                  "must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def signed_row(num_classes: int, positives: Any = ()) -> np.ndarray:
    """A {1, -1} int8 label row: 1 at the ``positives`` indices, -1 elsewhere."""
    row = np.full(num_classes, -1, dtype=np.int8)
    row[list(positives)] = 1
    return row


def label_row(
    names: Any, class_index: dict[str, int], where: str, value: int = 1, row: np.ndarray | None = None
) -> np.ndarray:
    """Set ``row[class] = value`` for each class name in ``names``; unknown names raise with ``where``."""
    if row is None:
        row = signed_row(len(class_index))
    if names is None:
        return row
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise DataFormatError(f"{where}: labels must be a list of class names, got {names!r}")
    for name in names:
        if name not in class_index:
            known = ", ".join(list(class_index)[:8]) + (", ..." if len(class_index) > 8 else "")
            raise DataFormatError(f"{where}: unknown class {name!r} (the label space has {len(class_index)} classes: {known})")
        row[class_index[name]] = value
    return row


def require_text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: missing or non-string field {key!r} (record keys: {sorted(record)})")
    if not value.strip():
        raise DataFormatError(f"{where}: field {key!r} is empty")
    return value
