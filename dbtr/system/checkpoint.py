"""From a checkpoint to a scorer: the one loader, and everything a checkpoint must agree with.

    import dbtr
    model, transform = dbtr.load_checkpoint("logs/train/runs/<run>/checkpoints/last.ckpt")

:func:`load_checkpoint` is the only place a checkpoint becomes a model (dbtr-eval, dbtr-predict, the notebook,
the toy-world demo, the ensemble's text model, the README quickstart). It returns the model with the exact
image preprocessing stored in the checkpoint (:class:`Preprocessing`: the toy world's (0.5, 0.5, 0.5) mean/std
is not CLIP's), after checking it against the CLIP weights it was trained on.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain Python values only, no code
runs while loading (dbtr checkpoints hold nothing else: residuals, hyper-parameters, Lightning's loop state).

The vocabulary can be replaced at inference (open vocabulary): a class the model was trained on keeps what it
learned, and a new name is scored the way the model scores any class without training labels
(:func:`new_class_rule`): a zero residual (plain template embedding T0) for free residuals, ``g(T0)`` with a
residual generator, the learned shared contexts with TaI-DPT prompts. Class-specific prompt contexts exist
only for trained names, so a vocabulary with new names is refused for them.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from dbtr.data.images import CLIP_MEAN, CLIP_STD, ClipImageTransform
from dbtr.utils.errors import UserError

log = logging.getLogger("dbtr")

META_KEY = "dbtr"  # checkpoint["dbtr"]: what the residuals depend on beyond the hyper-parameters


class CheckpointMismatchError(UserError):
    """A checkpoint's classes, CLIP weights, preprocessing or tensor shapes do not match the data or the
    model."""


# ------------------------------------------------------------------ what a checkpoint records


@dataclass(frozen=True)
class Preprocessing:
    """The image preprocessing the residuals were trained (selected) with: written into every checkpoint, and
    what evaluation and inference must use (a different mean/std silently shifts every score)."""

    image_size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def of(cls, datamodule) -> Preprocessing | None:
        """The preprocessing a datamodule applies (None before its image size is known)."""
        if datamodule is None or getattr(datamodule, "image_size", None) is None:
            return None
        return cls(
            int(datamodule.image_size), tuple(map(float, datamodule.mean)), tuple(map(float, datamodule.std))
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            int(d["image_size"]),
            tuple(map(float, d.get("mean", CLIP_MEAN))),
            tuple(map(float, d.get("std", CLIP_STD))),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    def transform(self, draft: bool = False) -> ClipImageTransform:
        return ClipImageTransform(self.image_size, self.mean, self.std, draft=draft)

    def differences(self, other: Preprocessing) -> dict[str, tuple[Any, Any]]:
        """``{field: (mine, other's)}`` for the fields that differ (floats to 1e-6)."""
        out = {}
        for name, a, b in (
            ("image_size", self.image_size, other.image_size),
            ("mean", self.mean, other.mean),
            ("std", self.std, other.std),
        ):
            same = (
                a == b
                if isinstance(a, int)
                else len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))
            )
            if not same:
                out[name] = (a if isinstance(a, int) else list(a), b if isinstance(b, int) else list(b))
        return out


def checkpoint_meta(encoder, datamodule, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """``checkpoint["dbtr"]``: the CLIP fingerprint, the preprocessing and (when known) the run that made
    it."""
    prep = Preprocessing.of(datamodule)
    return {
        "clip_fingerprint": encoder.fingerprint(),
        "preprocessing": None if prep is None else prep.as_dict(),
        **({"run": run} if run else {}),
    }


def stored_preprocessing(ckpt: dict[str, Any], encoder) -> Preprocessing:
    """The checkpoint's preprocessing; checkpoints without one were made on CLIP's own (size, mean, std)."""
    prep = (ckpt.get(META_KEY) or {}).get("preprocessing")
    return Preprocessing.from_dict(prep) if prep else Preprocessing(int(encoder.image_size))


# ------------------------------------------------------------------ reading and checking


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, loaded without unpickling arbitrary objects; clear errors for non-dbtr files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint file at {path} (a dbtr-train run keeps them in <run>/checkpoints/)"
        )
    if not zipfile.is_zipfile(path):  # torch.save (and so Lightning) writes zip archives
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint (not the zip archive torch.save writes; "
            "a truncated or damaged file also reads this way)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long; its "GLOBAL x.Y" (unsupported or blocked) names the offending object
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        held = f"the object {found.group(1)}" if found else "objects other than tensors and plain values"
        raise UserError(
            f"{path}: refused by safe loading (weights_only=True): it holds {held}, and dbtr "
            "checkpoints hold only tensors and plain values (pass a .ckpt written by dbtr-train)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint, truncated or damaged ({type(err).__name__}: {err})"
        ) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "class_names" not in hp or "state_dict" not in ckpt:
        raise UserError(
            f"{path}: not a dbtr checkpoint (no hyper_parameters.class_names / state_dict); "
            "pass a .ckpt written by dbtr-train"
        )
    return ckpt


def check_class_names(checkpoint_names: Sequence[str], data_names: Sequence[str], ckpt_path: str) -> None:
    """The data's label columns must be the checkpoint's classes, in the same order."""
    if list(checkpoint_names) == list(data_names):
        return
    only_ckpt = [n for n in checkpoint_names if n not in data_names]
    only_data = [n for n in data_names if n not in checkpoint_names]
    detail = f"only in checkpoint: {only_ckpt[:10]}; only in data: {only_data[:10]}"
    if not only_ckpt and not only_data:
        detail = "same names in a different order (label columns would be misaligned)"
    raise CheckpointMismatchError(
        f"{ckpt_path} was trained on {len(checkpoint_names)} classes, "
        f"the data has {len(data_names)}: {detail}"
    )


def check_preprocessing(
    trained: Preprocessing, now: Preprocessing | None, ckpt_path: str, allow_mismatch: bool = False
) -> None:
    """Evaluation data must be preprocessed as in training, or a clear error (a warning if allowed)."""
    diff = {} if now is None else trained.differences(now)
    if diff:
        _mismatch(
            f"{ckpt_path}: image preprocessing differs from training (trained, now): {diff}",
            allow_mismatch,
            "pass allow_mismatch=true to evaluate anyway",
        )


def check_clip(
    ckpt: dict[str, Any], encoder, ckpt_path: str, clip_path: str, allow_mismatch: bool = False
) -> None:
    """The residuals only mean something on the CLIP weights they were trained on (a hash of the
    projections)."""
    trained_on = (ckpt.get(META_KEY) or {}).get("clip_fingerprint")
    if trained_on and trained_on != encoder.fingerprint():
        _mismatch(
            f"the CLIP at {clip_path!r} is not the one the residuals were trained on "
            f"({ckpt_path}: projection hash {encoder.fingerprint()} != {trained_on})",
            allow_mismatch,
            "pass the training CLIP, or allow the mismatch (allow_mismatch=true, --allow-mismatch) "
            "to score anyway",
        )


def _mismatch(message: str, allow: bool, advice: str) -> None:
    if not allow:
        raise CheckpointMismatchError(f"{message}; {advice}")
    log.warning(message)


def check_state_dict(
    state_dict: dict[str, Tensor], expected: dict[str, Tensor], num_classes: int, encoder, strict: bool = True
) -> None:
    """A checkpoint's head tensors against the model's: a clear error for a mis-shaped or missing tensor."""
    for key, value in state_dict.items():
        if key not in expected or tuple(value.shape) == tuple(expected[key].shape):
            continue
        if key.startswith("head.prompts."):
            raise CheckpointMismatchError(
                f"checkpoint prompt context {key!r} has shape {tuple(value.shape)} but this model expects "
                f"{tuple(expected[key].shape)} (model.prompts.n_ctx / class_specific, text width "
                f"{encoder.text_width}): use the training prompts and CLIP model."
            )
        c, d = tuple(value.shape) if value.ndim == 2 else (None, None)
        raise CheckpointMismatchError(
            f"checkpoint tensor {key!r} has shape {tuple(value.shape)} but this model expects "
            f"{tuple(expected[key].shape)} = ({num_classes} classes, "
            f"CLIP projection dim {encoder.embed_dim}); "
            f"the checkpoint was trained with {c} classes and embedding size {d}. "
            "Use the same class list and CLIP model as in training."
        )
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointMismatchError(
            f"checkpoint does not match the head configuration: missing {missing}, unexpected {unexpected} "
            "(was it trained with other head.global_residual/local_residual/use_local "
            "or model.prompts settings?)"
        )


# ------------------------------------------------------------------ checkpoint surgery


def remap_class_rows(
    state_dict: dict[str, Tensor], trained: Sequence[str], names: Sequence[str]
) -> dict[str, Tensor]:
    """Per-class rows (free residuals, class-specific prompt contexts) reordered to ``names``: a trained name
    keeps its row, a new name gets zeros (callers refuse new names where a zero row means nothing)."""
    index = {n: i for i, n in enumerate(trained)}
    out = {}
    for key, value in state_dict.items():
        per_class = (key.endswith(".residual") and value.ndim == 2) or (
            key.startswith("head.prompts.ctx_") and value.ndim == 3
        )
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
        return (
            None if prompts.get("class_specific") else "the learned prompt contexts (shared by all classes)"
        )
    if (hp.get("head") or {}).get("residual_generator"):
        return "the residual generator g(T0)"
    return "a zero residual (plain zero-shot T0)"


def check_continues(
    ckpt: dict[str, Any], class_names: Sequence[str], encoder, ckpt_path: str, what: str
) -> None:
    """A checkpoint that training continues from (``ckpt_path=`` resume, ``model.init_from``) must have been
    trained on the same classes in the same order and on the same CLIP: its rows would otherwise land on other
    classes (the resumed "red" row would be the old "green" one) or mean nothing on these features."""
    advice = (
        f"Training cannot continue from it: start a fresh run (drop {what}) or use the classes and CLIP it "
        "was trained with"
    )
    try:
        check_class_names(ckpt["hyper_parameters"]["class_names"], class_names, f"{what}={ckpt_path}")
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{err}. {advice}") from None
    trained_on = (ckpt.get(META_KEY) or {}).get("clip_fingerprint")
    if trained_on and trained_on != encoder.fingerprint():
        raise CheckpointMismatchError(
            f"{what}={ckpt_path} was trained on another CLIP than this run's "
            f"clip.name_or_path (projection hash {trained_on} != {encoder.fingerprint()}). "
            f"{advice}"
        )


def load_head_init(head: torch.nn.Module, path: str, class_names: Sequence[str], encoder) -> None:
    """``model.init_from``: initialise a head from another checkpoint's head tensors (same classes, CLIP and
    shapes required)."""
    ckpt = read_checkpoint(path)
    check_continues(ckpt, class_names, encoder, path, "model.init_from")
    state = ckpt["state_dict"]
    head_state = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    mine = head.state_dict()
    bad = {k: tuple(v.shape) for k, v in head_state.items() if k not in mine or v.shape != mine[k].shape}
    if bad or not head_state:
        raise CheckpointMismatchError(
            f"model.init_from={path}: head tensors {bad or 'none'} do not "
            "fit this head (same classes, CLIP and residual settings needed)"
        )
    head.load_state_dict(head_state, strict=False)


def load_companion(path: str, encoder, class_names: Sequence[str]):
    """``model.ensemble.text_ckpt``: the text-only model scored beside this one, on the same (frozen) CLIP."""
    loaded = load_checkpoint(path, encoder=encoder)
    if loaded.model.class_names != list(class_names):
        raise CheckpointMismatchError(
            f"model.ensemble.text_ckpt={path} was trained on other classes than this model"
        )
    loaded.model.head.requires_grad_(False)
    return loaded.model


# ------------------------------------------------------------------ the loader


@dataclass
class LoadedModel:
    """A checkpoint's model (eval mode) with the preprocessing it was trained with. ``model, transform =
    load_checkpoint(path)`` unpacks it."""

    model: Any  # DbtrLitModule
    transform: ClipImageTransform
    preprocessing: Preprocessing
    checkpoint: str
    clip: str
    trained_classes: list[str]
    new_classes: list[str] = field(default_factory=list)  # names not trained on, scored by ``new_class_rule``
    new_class_rule: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint["dbtr"]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.transform))

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def device(self) -> torch.device:
        return self.model.head.class_embeds.device

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor | None]:
        """``(scores (B, C), attention (B, C, g, g) or None)`` on the CPU, from one forward pass."""
        from dbtr.system.lit_module import attention_grid

        pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
        out = self.model(pixels)
        attention = None if out.local_attention is None else attention_grid(out.local_attention).cpu()
        return out.logits.float().cpu(), attention


def load_checkpoint(
    path: str | os.PathLike,
    clip: str | dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    allow_mismatch: bool = False,
    evaluation: dict[str, Any] | None = None,
    encoder=None,
) -> LoadedModel:
    """Rebuild a checkpoint's model (safe loading) with the preprocessing stored in it.

    :param clip: a CLIP folder or hub id, or a dict of ``clip.*`` fields (dense, dtype, ...) to override;
        default the CLIP settings stored in the checkpoint.
    :param classes: replace the vocabulary (see module docstring); default the trained classes.
    :param allow_mismatch: warn instead of failing when the CLIP weights are not the ones trained on.
    :param evaluation: ``evaluation.*`` fields to override (e.g. ``{"difficult": "ignore"}``).
    :param encoder: an already built :class:`~dbtr.models.clip.ClipEncoder` to reuse (still
        fingerprint-checked).
    """
    from dbtr.system.lit_module import DbtrLitModule, residual_columns
    from dbtr.text.names import validate_class_names

    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    clip_cfg = dict(hp.get("clip") or {})
    if isinstance(clip, dict):
        clip_cfg.update({k: v for k, v in clip.items() if v is not None})
    elif clip:
        clip_cfg["name_or_path"] = str(clip)
    if not clip_cfg.get("name_or_path"):
        raise UserError(f"{path} records no CLIP path (clip.name_or_path): pass the CLIP folder or hub id")
    trained = list(hp["class_names"])
    names = trained if classes is None else validate_class_names(classes, source="class list")
    eval_cfg = {
        **(hp.get("evaluation") or {}),
        **{k: v for k, v in (evaluation or {}).items() if v is not None},
    }
    given_sparc = (evaluation or {}).get("sparc")
    if isinstance(given_sparc, dict):  # key by key: {enabled: true} keeps the stored compounds and thresholds
        stored = (hp.get("evaluation") or {}).get("sparc") or {}
        eval_cfg["sparc"] = {**stored, **{k: v for k, v in given_sparc.items() if v is not None}}
    eval_cfg["top_k"] = sorted({min(int(k), len(names)) for k in eval_cfg.get("top_k", [3])})
    new = [n for n in names if n not in trained]
    rule = new_class_rule(hp)
    if new and rule is None:
        raise UserError(
            f"{path} learned one prompt context per training class (prompts.class_specific): "
            f"new class names {new[:5]} have none; use a subset of the trained classes "
            f"({len(trained)}: {', '.join(trained[:5])}{', ...' if len(trained) > 5 else ''})"
        )
    if names != trained:
        # subsets, selection subset and residual_classes name the training vocabulary; carry over which names
        # kept T0 in training (unseen classes of a seen/unseen run) and drop the rest
        chosen = hp.get("residual_classes")
        learned = (
            set(trained)
            if chosen is None
            else {trained[i] for i in residual_columns(chosen, trained, hp.get("class_subsets") or {})}
        )
        hp.update(class_subsets=None, residual_classes=[n for n in names if n in learned])
        eval_cfg["val_subset"] = None
    hp.update(clip=clip_cfg, class_names=names, evaluation=eval_cfg)
    model = DbtrLitModule(**hp, encoder=encoder)
    model.load_state_dict(remap_class_rows(ckpt["state_dict"], trained, names))
    check_clip(ckpt, model.encoder, str(path), clip_cfg["name_or_path"], allow_mismatch)
    prep = stored_preprocessing(ckpt, model.encoder)
    model = model.eval().to(device)
    model.ensure_class_embeddings()
    return LoadedModel(
        model,
        prep.transform(),
        prep,
        str(path),
        clip_cfg["name_or_path"],
        trained,
        new,
        rule if new else "",
        dict(ckpt.get(META_KEY) or {}),
    )
