"""Class names: the checks every label space passes, and the text a class is prompted with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def prompt_name(name: str, overrides: Mapping[str, str] | None = None) -> str:
    """The text class ``name`` is prompted with: ``overrides[name]`` if given (a model's ``prompt_names``,
    e.g. TaI-DPT's class names from its vocabulary), else the label name, VOC's devkit names written as
    words."""
    if overrides and name in overrides:
        return overrides[name]
    return PROMPT_NAMES.get(name, name)


def validate_prompt_names(prompt_names: Mapping[str, str] | None, source: str) -> dict[str, str] | None:
    """``{class: prompt text}`` with non-empty texts, or None; anything else is a UserError naming it."""
    if prompt_names is None:
        return None
    if not isinstance(prompt_names, Mapping):
        raise UserError(
            f"{source}: expected a mapping class -> prompt text, got {type(prompt_names).__name__}"
        )
    bad = [k for k, v in prompt_names.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise UserError(f"{source}: the prompt text of {bad[:5]} must be a non-empty string")
    return {str(k): str(v).strip() for k, v in prompt_names.items()}
