"""Scoring images with a trained checkpoint (dbtr-predict, the notebook, plots): the command-line helpers.

Loading lives in :mod:`dbtr.checkpoint` (``dbtr.load_checkpoint``); ``load_model`` is its old name.
"""

from __future__ import annotations

import os
from pathlib import Path

from dbtr.checkpoint import (  # noqa: F401  (re-exported: the names dbtr.inference has always had)
    LoadedModel,
    load_checkpoint,
    new_class_rule,
    read_checkpoint,
    remap_class_rows,
)

load_model = load_checkpoint

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def parse_class_list(spec: str) -> list[str]:
    """``--classes``: a text file (one name per line) if such a file exists, else a comma-separated list."""
    from dbtr.data.labels import load_class_names
    from dbtr.zeroshot.classifier import validate_class_names

    path = Path(spec).expanduser()
    if path.is_file():
        return load_class_names(path)
    if path.suffix.lower() in (".txt", ".lst") or os.sep in spec:
        raise FileNotFoundError(f"class list file not found: {path} (or give the names comma-separated: 'dog,cat')")
    return validate_class_names(spec.split(","), source=f"class list {spec!r}")
