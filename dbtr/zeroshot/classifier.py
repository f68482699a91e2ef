"""Class text embeddings T0 from a template ensemble (the fixed base of the task residuals)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dbtr.utils.errors import UserError
from dbtr.zeroshot.templates import get_templates


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


@torch.no_grad()
def build_class_embeddings(
    encoder, class_names: Sequence[str], templates: str | Sequence[str] = "imagenet", batch_size: int = 256
) -> Tensor:
    """Return T0 (C, D): per class, the mean of the L2-normalised template embeddings, renormalised."""
    names = validate_class_names(class_names)
    temps = get_templates(templates if isinstance(templates, str) else list(templates))
    prompts = [t.format(prompt_name(n)) for n in names for t in temps]
    emb = encoder.encode_texts(prompts, batch_size=batch_size, normalize=True)
    emb = emb.view(len(names), len(temps), -1).mean(1)
    return F.normalize(emb, dim=-1).float()
