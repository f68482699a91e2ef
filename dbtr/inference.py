"""Load a trained checkpoint safely and score images with it (dbtr-predict, the notebook, plots).

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain Python values only, no code
runs while loading (dbtr checkpoints hold nothing else: residuals, hyper-parameters, Lightning's loop state).

The vocabulary can be replaced at inference (open vocabulary): a class the model was trained on keeps what it
learned, and a new name is scored the way the model scores any class without training labels
(:func:`new_class_rule`): a zero residual (plain template embedding T0) for free residuals, ``g(T0)`` with a
residual generator, the learned shared contexts with TaI-DPT prompts. Class-specific prompt contexts exist only
for trained names, so a vocabulary with new names is refused for them.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor

from dbtr.data.images import CLIP_MEAN, CLIP_STD, ClipImageTransform
from dbtr.utils.errors import UserError

log = logging.getLogger("dbtr")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, loaded without unpickling arbitrary objects; clear errors for non-dbtr files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path} (a dbtr-train run keeps them in <run>/checkpoints/)")
    if not zipfile.is_zipfile(path):  # torch.save (and so Lightning) writes zip archives
        raise UserError(f"{path}: not a readable PyTorch checkpoint (not the zip archive torch.save writes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long; its "GLOBAL x.Y" (unsupported or blocked) names the offending object
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        held = f"the object {found.group(1)}" if found else "objects other than tensors and plain values"
        raise UserError(f"{path}: refused by safe loading (weights_only=True): it holds {held}, and dbtr "
                        "checkpoints hold only tensors and plain values (pass a .ckpt written by dbtr-train)") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "class_names" not in hp or "state_dict" not in ckpt:
        raise UserError(f"{path}: not a dbtr checkpoint (no hyper_parameters.class_names / state_dict); "
                        "pass a .ckpt written by dbtr-train")
    return ckpt


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


def remap_class_rows(state_dict: dict[str, Tensor], trained: Sequence[str], names: Sequence[str]) -> dict[str, Tensor]:
    """Per-class rows (free residuals, class-specific prompt contexts) reordered to ``names``: a trained name
    keeps its row, a new name gets zeros (callers refuse new names where a zero row means nothing)."""
    index = {n: i for i, n in enumerate(trained)}
    out = {}
    for key, value in state_dict.items():
        per_class = (key.endswith(".residual") and value.ndim == 2) or (key.startswith("head.prompts.ctx_")
                                                                         and value.ndim == 3)
        if per_class and value.shape[0] == len(trained):
            new = value.new_zeros(len(names), *value.shape[1:])
            for i, name in enumerate(names):
                if name in index:
                    new[i] = value[index[name]]
            value = new
        out[key] = value
    return out


def new_class_rule(hp: dict[str, Any]) -> str | None:
    """How a checkpoint's model scores a class name it has no training labels for; None: it cannot."""
    prompts = hp.get("prompts")
    if prompts:
        # class-specific contexts exist for trained names only
        return None if prompts.get("class_specific") else "the learned prompt contexts (shared by all classes)"
    if (hp.get("head") or {}).get("residual_generator"):
        return "the residual generator g(T0)"
    return "a zero residual (plain zero-shot T0)"


@dataclass
class LoadedModel:
    """A checkpoint's model ready for inference, with the preprocessing it was trained with."""

    model: Any  # DbtrLitModule
    transform: ClipImageTransform
    checkpoint: str
    clip: str
    trained_classes: list[str]
    new_classes: list[str] = field(default_factory=list)  # names not trained on, scored by ``new_class_rule``
    new_class_rule: str = ""

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def device(self) -> torch.device:
        return self.model.head.class_embeds.device

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor | None]:
        """``(scores (B, C), attention (B, C, g, g) or None)`` on the CPU, from one forward pass."""
        from dbtr.models.lit_module import attention_grid

        pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
        out = self.model(pixels)
        attention = None if out.local_attention is None else attention_grid(out.local_attention).cpu()
        return out.logits.float().cpu(), attention


def load_model(
    ckpt_path: str | os.PathLike,
    clip: str | None = None,
    classes: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    allow_mismatch: bool = False,
) -> LoadedModel:
    """Rebuild the model of a checkpoint (safe loading) for inference.

    :param clip: CLIP folder or hub id; default the ``clip.name_or_path`` stored in the checkpoint.
    :param classes: replace the vocabulary (see module docstring); default the trained classes.
    :param allow_mismatch: warn instead of failing when the CLIP weights are not the ones trained on.
    """
    from dbtr.models.lit_module import CheckpointMismatchError, DbtrLitModule, residual_columns
    from dbtr.zeroshot.classifier import validate_class_names

    ckpt = read_checkpoint(ckpt_path)
    hp = dict(ckpt["hyper_parameters"])
    clip_cfg = dict(hp.get("clip") or {})
    if clip:
        clip_cfg["name_or_path"] = str(clip)
    if not clip_cfg.get("name_or_path"):
        raise UserError(f"{ckpt_path} records no CLIP path (clip.name_or_path): pass the CLIP folder or hub id")
    trained = list(hp["class_names"])
    names = trained if classes is None else validate_class_names(classes, source="class list")
    evaluation = dict(hp.get("evaluation") or {})
    evaluation["top_k"] = sorted({min(int(k), len(names)) for k in evaluation.get("top_k", [3])})
    new = [n for n in names if n not in trained]
    rule = new_class_rule(hp)
    if new and rule is None:
        raise UserError(f"{ckpt_path} learned one prompt context per training class (prompts.class_specific): "
                        f"new class names {new[:5]} have none; use a subset of the trained classes "
                        f"({len(trained)}: {', '.join(trained[:5])}{', ...' if len(trained) > 5 else ''})")
    if names != trained:
        # subsets, selection subset and residual_classes name the training vocabulary; carry over which names
        # kept T0 in training (unseen classes of a seen/unseen run) and drop the rest
        chosen = hp.get("residual_classes")
        learned = set(trained) if chosen is None else {
            trained[i] for i in residual_columns(chosen, trained, hp.get("class_subsets") or {})}
        hp.update(class_subsets=None, residual_classes=[n for n in names if n in learned])
        evaluation["val_subset"] = None
    hp.update(clip=clip_cfg, class_names=names, evaluation=evaluation)
    model = DbtrLitModule(**hp)
    model.load_state_dict(remap_class_rows(ckpt["state_dict"], trained, names))
    trained_on = (ckpt.get("dbtr") or {}).get("clip_fingerprint")
    if trained_on and trained_on != model.encoder.fingerprint():
        message = (f"the CLIP at {clip_cfg['name_or_path']!r} is not the one {ckpt_path} was trained on "
                   f"(projection hash {model.encoder.fingerprint()} != {trained_on})")
        if not allow_mismatch:
            raise CheckpointMismatchError(message + "; pass the training CLIP, or allow the mismatch to score anyway")
        log.warning(message)
    prep = (ckpt.get("dbtr") or {}).get("preprocessing") or {}
    transform = ClipImageTransform(prep.get("image_size") or model.encoder.image_size,
                                   prep.get("mean", CLIP_MEAN), prep.get("std", CLIP_STD))
    model = model.eval().to(device)
    model.ensure_class_embeddings()
    return LoadedModel(model, transform, str(ckpt_path), clip_cfg["name_or_path"], trained, new,
                       rule if new else "")
