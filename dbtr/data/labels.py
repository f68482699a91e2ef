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


# px^2 separating small / medium / large objects: COCO's 32^2 and 96^2 (COCOeval's area ranges)
COCO_AREA_THRESHOLDS = (32.0**2, 96.0**2)


def box_areas(boxes: Any, class_index: dict[str, int], where: str) -> np.ndarray:
    """(C,) float32 area of each class's largest non-difficult box, NaN for classes without one.

    ``boxes``: ``[{"label": name, "box": [x0, y0, x1, y1]}, ...]`` in pixels, optionally ``"area"`` (e.g.
    COCO's segment area, used instead of the box's) and ``"difficult": true`` (left out, as VOC does)."""
    out = np.full(len(class_index), np.nan, dtype=np.float32)
    if not isinstance(boxes, list):
        raise DataFormatError(f"{where}: boxes must be a list of {{'label', 'box'}} objects, got {boxes!r}")
    for i, b in enumerate(boxes):
        box = b.get("box") if isinstance(b, dict) else None
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or box[2] < box[0] or box[3] < box[1]:
            raise DataFormatError(
                f"{where}: boxes[{i}] must be {{'label': name, 'box': [x0, y0, x1, y1]}} with x0 <= x1 and "
                f"y0 <= y1, got {b!r}"
            )
        k = label_row([b.get("label")], class_index, f"{where}: boxes[{i}]")
        if b.get("difficult", False):
            continue
        area = b.get("area", (box[2] - box[0]) * (box[3] - box[1]))
        col = int(np.flatnonzero(k == 1)[0])
        out[col] = np.fmax(out[col], float(area))
    return out


def require_text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: missing or non-string field {key!r} (record keys: {sorted(record)})")
    if not value.strip():
        raise DataFormatError(f"{where}: field {key!r} is empty")
    return value
