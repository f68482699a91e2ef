"""Class text embeddings T0 from a template ensemble (the fixed base of the task residuals)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dbtr.text.names import prompt_name, validate_class_names
from dbtr.text.templates import get_templates


@torch.no_grad()
def build_class_embeddings(
    encoder,
    class_names: Sequence[str],
    templates: str | Sequence[str] = "imagenet",
    batch_size: int = 256,
    prompt_names: Mapping[str, str] | None = None,
) -> Tensor:
    """Return T0 (C, D): per class, the mean of the L2-normalised template embeddings, renormalised. Each
    class is written as :func:`~dbtr.text.names.prompt_name` gives it (``prompt_names`` first)."""
    names = validate_class_names(class_names)
    temps = get_templates(templates if isinstance(templates, str) else list(templates))
    prompts = [t.format(prompt_name(n, prompt_names)) for n in names for t in temps]
    emb = encoder.encode_texts(prompts, batch_size=batch_size, normalize=True)
    emb = emb.view(len(names), len(temps), -1).mean(1)
    return F.normalize(emb, dim=-1).float()
