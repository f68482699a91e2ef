"""Class names: the checks every label space passes, and the text a class is prompted with."""

from __future__ import annotations

from collections.abc import Sequence

from dbtr.utils.errors import UserError


def validate_class_names(class_names: Sequence[str], source: str = "class list") -> list[str]:
    """Reject an empty list, empty names and duplicates, naming the offenders."""
    names = [str(n).strip() for n in class_names]
    if not names:
        raise UserError(f"{source}: no class names given")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise UserError(f"{source}: empty class name at position(s) {empty}")
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names):
        if n in seen:
            dups.append(f"{n!r} at positions {seen[n]} and {i}")
        seen.setdefault(n, i)
    if dups:
        raise UserError(f"{source}: duplicated class name(s): {'; '.join(dups)}")
    return names


# Label names that are not words: the text the class is prompted with (VOC's devkit names).
PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def prompt_name(name: str) -> str:
    return PROMPT_NAMES.get(name, name)
