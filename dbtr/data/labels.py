"""Label spaces and label records read from JSON-lines files, with errors that name file and line."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbtr.text.names import validate_class_names
from dbtr.utils.files import DataFormatError, read_text


def load_class_names(classes: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names from a list, or from a text file with one name per line (blank lines and # comments
    skipped)."""
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"class list file not found: {path} (expected one class name per line)")
        names = [ln.strip() for ln in read_text(path).splitlines()]
        return validate_class_names([n for n in names if n and not n.startswith("#")], source=str(path))
    return validate_class_names(list(classes))


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
            raise DataFormatError(
                f"{where}: unknown class {name!r} (the label space has {len(class_index)} classes: {known})"
            )
        row[class_index[name]] = value
    return row


def require_text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: missing or non-string field {key!r} (record keys: {sorted(record)})")
    if not value.strip():
        raise DataFormatError(f"{where}: field {key!r} is empty")
    return value
