"""SPARC (Miller et al., CVPR 2025): black-box score normalisation and compound-prompt fusion (docs/sparc.md).

A post-hoc scorer over a whole evaluation split (it standardises each class over the evaluated images, so it
is transductive, as published). For image n, class c and compound prompt p:

    s[n, c]   the model's score (zero-shot CLIP: scale * cos(f_n, T0_c), T0 the 80-template ensemble)
    u[n, c]   cos(f_n, text(name_c))                  the "simple single" prompt: the bare class name
    q[n, p]   cos(f_n, text(p))                       p = "A and B", "A, B, and C", or any given sentence
    rows:     s^ = (s - mean_c s) / sd_c s            q^ = (q - mean_c u) / sd_c u      (per image, ddof 1)
    columns:  s~ = (s^ - mean_n s^) / sd_n s^         q~ likewise per prompt              (per class / prompt)
    class c, its prompts P_c (those naming c):  x_n = (sort_asc(q~[n, P_c]), s~[n, c])      (k + 1 values)
    w = first principal direction of {x_n}, sign so that mean(w) >= 0, scaled to |w|_1 = 1
    z[n, c] = b * s~[n, c] + (1 - b) * <w, x_n>       b = 0.5;  z = s~ when P_c is empty

Sorting makes each column of x an order statistic (the max, the second max, ...), so the PCA weights ranks,
not prompts: SPARC's "adaptive fusion" (the second-highest compound score is often better than the max).
``s~`` alone is SPARC's "normalise only" ablation (``debiased`` here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dbtr.text.names import prompt_name
from dbtr.utils.errors import ConfigError, UserError, choice_error

log = logging.getLogger(__name__)

SPARC_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "compounds": "cooccurrence",
    "pair_threshold": 0.05,
    "triplet_threshold": 0.025,
    "prompts": None,
    "standardize_base_rows": True,
    "base_weight": 0.5,
}
COMPOUND_SOURCES = ("cooccurrence", "all_pairs", "none")
_KEY = "model.evaluation.sparc"
_EPS = 1e-12  # a constant row or column standardises to 0 instead of NaN


# --------------------------------------------------------------------------- compound prompts
def cooccurring_combinations(
    labels: np.ndarray, pair_threshold: float = 0.05, triplet_threshold: float = 0.025
) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """SPARC's class pairs and triplets from a (M, C) label matrix (True = present).

    Pair (i, j), i < j, when P(j | i) > ``pair_threshold`` (only the later class conditioned on the earlier
    one, as the reference code). For each pair, the third class k maximising P(k | i, j), if that exceeds
    ``triplet_threshold``; a triple found twice as (i, j, k) and (i, k, j) is kept once, in the order of the
    larger probability.
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 2 or len(y) == 0:
        raise UserError(f"co-occurrence needs a non-empty (samples, classes) label matrix, got {y.shape}")
    marginal = y.mean(0)
    joint = y.T @ y / len(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        given = joint / marginal[:, None]  # given[i, j] = P(j | i); NaN for a class never present
    c = y.shape[1]
    pairs = [(i, j) for i in range(c - 1) for j in range(i + 1, c) if given[i, j] > pair_threshold]
    triplets: dict[tuple[int, int, int], float] = {}
    for i, j in pairs:
        prob = (y[:, i] * y[:, j]) @ y / len(y) / joint[i, j]  # P(k | i, j) for every k
        prob[[i, j]] = -np.inf
        k = int(np.argmax(prob))  # the first of tied maxima
        if not prob[k] > triplet_threshold:
            continue
        twin = (i, k, j)
        if twin in triplets:
            if prob[k] > triplets[twin]:
                del triplets[twin]
                triplets[(i, j, k)] = float(prob[k])
        else:
            triplets[(i, j, k)] = float(prob[k])
    return pairs, list(triplets)


def compound_text(names: Sequence[str]) -> str:
    """``A and B`` or ``A, B, and C`` (SPARC's wording for pairs and triplets)."""
    if len(names) == 2:
        return f"{names[0]} and {names[1]}"
    return ", ".join(names[:-1]) + f", and {names[-1]}"


_IRREGULAR = (
    ("person", "people"),
    ("child", "children"),
    ("man", "men"),
    ("foot", "feet"),
    ("goose", "geese"),
    ("mouse", "mice"),
    ("die", "dice"),
    ("tooth", "teeth"),
    ("louse", "lice"),
    ("leaf", "leaves"),
    ("wolf", "wolves"),
    ("knife", "knives"),
    ("cactus", "cacti"),
    ("shelf", "shelves"),
    ("calf", "calves"),
)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())


def surface_forms(name: str) -> list[str]:
    """The name, singular and plural forms SPARC's matcher looks for."""
    plural = name
    for a, b in _IRREGULAR:
        plural = plural.replace(a, b)
    singular = name[:-1] if name.endswith("s") else name
    return sorted({name, singular, name + "s", name + "es", plural})


def match_classes(
    prompt: str, class_names: Sequence[str], prompt_names: Mapping[str, str] | None = None
) -> list[int]:
    """The classes a free-text compound prompt names (SPARC's string matching): whole words, letters only,
    longest class name first, each matched span blanked out so that a shorter name inside it ("dog" in
    "hot dog") does not match again. Returns class indices, longest name first."""
    names = [_words(prompt_name(n, prompt_names)) for n in class_names]
    text = " " + _words(prompt) + " "
    found = []
    for c in sorted(range(len(names)), key=lambda i: len(names[i]), reverse=True):
        hit = False
        for form in surface_forms(names[c]):
            if form and f" {form} " in text:
                hit = True
                text = text.replace(f" {form} ", " ! ")
        if hit:
            found.append(c)
    return found


@dataclass
class CompoundPrompts:
    """The compound prompts and, per class, the indices of those that name it."""

    texts: list[str]
    members: list[list[int]]  # members[c] = prompts naming class c


def build_compound_prompts(
    class_names: Sequence[str],
    source: str,
    labels: np.ndarray | None = None,
    pair_threshold: float = 0.05,
    triplet_threshold: float = 0.025,
    extra: Sequence[str] = (),
    prompt_names: Mapping[str, str] | None = None,
) -> CompoundPrompts:
    """Generated pairs/triplets (``cooccurrence`` from ``labels``, or ``all_pairs``, or ``none``) followed by
    the ``extra`` sentences (e.g. an LLM's), which are assigned to classes by :func:`match_classes`. Classes
    are written as the model prompts them (``prompt_names``, e.g. TaI-DPT's names)."""
    if source not in COMPOUND_SOURCES:
        raise choice_error(f"{_KEY}.compounds", source, COMPOUND_SOURCES)
    shown = [prompt_name(n, prompt_names) for n in class_names]
    combos: list[tuple[int, ...]] = []
    if source == "cooccurrence":
        if labels is None:
            raise ValueError("compounds=cooccurrence needs the label matrix")
        pairs, triplets = cooccurring_combinations(labels, pair_threshold, triplet_threshold)
        combos = [*pairs, *triplets]
    elif source == "all_pairs":
        combos = [(i, j) for i in range(len(shown) - 1) for j in range(i + 1, len(shown))]
    texts, members = [], [[] for _ in shown]
    for combo in combos:
        for c in combo:
            members[c].append(len(texts))
        texts.append(compound_text([shown[c] for c in combo]))
    unmatched = 0
    for sentence in dict.fromkeys(s.strip() for s in extra if s.strip()):
        if sentence in texts:
            continue
        named = match_classes(sentence, class_names, prompt_names)
        if not named:  # it would score no class
            unmatched += 1
            continue
        for c in named:
            members[c].append(len(texts))
        texts.append(sentence)
    if unmatched:
        log.warning("SPARC: %d of the given compound prompts name no class; they are left out", unmatched)
    return CompoundPrompts(texts, members)


def read_prompt_list(spec: str | Sequence[str] | None) -> list[str]:
    """``prompts``: a text file (one prompt a line) or a list of prompts."""
    if spec is None:
        return []
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{_KEY}.prompts={spec}: no such file (give a text file with one compound prompt a line, "
                "or a list of prompts)"
            )
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(s) for s in spec]


# --------------------------------------------------------------------------- the score equations
def row_standardize(x: Tensor) -> Tensor:
    """``(x - mean) / sd`` per row, over the columns (ddof 1)."""
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(_EPS)


def column_standardize(x: Tensor) -> Tensor:
    """``(x - mean) / sd`` per column, over the rows (ddof 1)."""
    return (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True).clamp_min(_EPS)


def principal_direction(x: Tensor) -> Tensor:
    """First principal direction of the rows of ``x`` (N, m), sign so that its mean is >= 0, scaled to unit
    L1 norm (SPARC's fusion weights)."""
    centred = x - x.mean(0, keepdim=True)
    _, vectors = torch.linalg.eigh(centred.t() @ centred)  # ascending eigenvalues
    w = vectors[:, -1]
    w = -w if w.mean() < 0 else w
    return w / w.abs().sum()


def fuse_ranks(compound: Tensor, base: Tensor) -> Tensor:
    """``<w, x_n>`` with ``x_n = (sort_asc(compound[n]), base[n])``: compound (N, k) and base (N,) already
    standardised; ``base`` itself when k = 0."""
    if compound.shape[1] == 0:
        return base
    x = torch.cat([compound.sort(dim=1).values, base[:, None]], dim=1)
    return x @ principal_direction(x)


def sparc_scores(
    base: Tensor,
    simple: Tensor,
    compound: Tensor | Callable[[int], Tensor],
    members: Sequence[Sequence[int]],
    standardize_base_rows: bool = True,
    base_weight: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """``(z, s~)`` (N, C) of the module docstring, in float64.

    :param base: s (N, C), the model's scores; :param simple: u (N, C), bare-class-name cosines.
    :param compound: q (N, P), or a function giving class c's columns ``q[:, members[c]]`` (so that the
        (N, P) matrix need not exist; every column is standardised independently of the others).
    :param standardize_base_rows: standardise s per image first (SPARC's default; off for scores that are
        already per-image normalised, as SPARC runs TagCLIP's log-probabilities).
    """
    base, simple = base.double(), simple.double()
    if base.shape[0] < 2:
        raise UserError(
            "SPARC standardises every class over the evaluated images: it needs at least 2, got "
            f"{base.shape[0]}"
        )
    columns = compound if callable(compound) else (lambda c: compound[:, list(members[c])])
    debiased = column_standardize(row_standardize(base) if standardize_base_rows else base)
    mean_u, sd_u = simple.mean(1, keepdim=True), simple.std(1, keepdim=True).clamp_min(_EPS)
    scores = torch.empty_like(debiased)
    for c in range(base.shape[1]):
        q = columns(c).double().to(base.device)
        if q.shape[1]:
            q = column_standardize((q - mean_u) / sd_u)
        scores[:, c] = base_weight * debiased[:, c] + (1.0 - base_weight) * fuse_ranks(q, debiased[:, c])
    return scores, debiased


# --------------------------------------------------------------------------- the scorer of a run
def sparc_settings(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checked ``model.evaluation.sparc`` settings, or None when SPARC is off."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(SPARC_DEFAULTS))
    if unknown:
        raise ConfigError(f"{_KEY} has no key(s) {unknown}; the keys are {sorted(SPARC_DEFAULTS)}")
    s = {**SPARC_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}  # null = the default
    if not s["enabled"]:
        return None
    if s["compounds"] not in COMPOUND_SOURCES:
        raise choice_error(f"{_KEY}.compounds", s["compounds"], COMPOUND_SOURCES)
    for key in ("pair_threshold", "triplet_threshold"):
        if not 0.0 <= float(s[key]) < 1.0:
            raise ConfigError(f"{_KEY}.{key} must be a probability in [0, 1), got {s[key]}")
    if not 0.0 <= float(s["base_weight"]) <= 1.0:
        raise ConfigError(f"{_KEY}.base_weight must be in [0, 1], got {s['base_weight']}")
    return s


class SparcScorer:
    """SPARC for one label space: builds the prompts and their text embeddings once (:meth:`prepare`), then
    scores whole evaluation splits (:meth:`__call__`).

    ``caption_labels`` (of :meth:`prepare`) returns the training captions' (M, C) label matrix; it is only
    called for ``compounds=cooccurrence`` (dbtr counts co-occurrence in text, never in training images).
    """

    def __init__(
        self,
        settings: dict[str, Any],
        class_names: Sequence[str],
        prompt_names: Mapping[str, str] | None = None,
    ):
        self.settings, self.class_names = settings, list(class_names)
        self.prompt_names = prompt_names  # the model's class texts: SPARC scores the same names as T0
        self.extra = read_prompt_list(settings["prompts"])  # a missing file fails at start-up
        self.prompts: CompoundPrompts | None = None
        self.simple_embeds: Tensor | None = None
        self.compound_embeds: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.prompts is not None

    def check_sources(self, caption_labels: Callable[[], np.ndarray] | None) -> None:
        """Refuse ``compounds=cooccurrence`` without training captions."""
        if self.settings["compounds"] == "cooccurrence" and caption_labels is None:
            raise ConfigError(
                f"{_KEY}.compounds=cooccurrence counts class co-occurrence in the training captions' labels, "
                "and this run's data has none (data.train_captions or data.corpus): give them, or set "
                f"{_KEY}.compounds=all_pairs, or compounds=none with {_KEY}.prompts=<file>"
            )

    @torch.no_grad()
    def prepare(self, encoder, caption_labels: Callable[[], np.ndarray] | None = None) -> None:
        """Build the compound prompts and encode them and the bare class names (once)."""
        if self.ready:
            return
        self.check_sources(caption_labels)
        s = self.settings
        labels = np.asarray(caption_labels()) == 1 if s["compounds"] == "cooccurrence" else None
        self.prompts = build_compound_prompts(
            self.class_names,
            s["compounds"],
            labels,
            s["pair_threshold"],
            s["triplet_threshold"],
            self.extra,
            self.prompt_names,
        )
        few = [n for n, m in zip(self.class_names, self.prompts.members) if len(m) < 4]
        log.info(
            "SPARC: %d compound prompts (%s); %d classes have fewer than 4 (%s)",
            len(self.prompts.texts),
            s["compounds"],
            len(few),
            ", ".join(few[:10]),
        )
        # encoded once per run; the bare names and compounds carry no template, as SPARC's
        self.simple_embeds = encoder.encode_texts(
            [prompt_name(n, self.prompt_names) for n in self.class_names]
        ).float()
        self.compound_embeds = encoder.encode_texts(self.prompts.texts).float()

    @torch.no_grad()
    def __call__(self, base: Tensor, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """``(SPARC scores, debiased base)`` (N, C) float32 on the CPU for one split: ``base`` the model's
        scores, ``image_embeds`` (N, D) the same images' global CLIP embeddings."""
        if not self.ready:
            raise RuntimeError("SparcScorer.prepare(encoder) must run before scoring")
        device = self.simple_embeds.device
        images = F.normalize(image_embeds.float().to(device), dim=-1)
        compound = self.compound_embeds
        members = self.prompts.members
        scores, debiased = sparc_scores(
            base.to(device),
            images @ self.simple_embeds.t(),
            lambda c: images @ compound[members[c]].t(),
            members,
            bool(self.settings["standardize_base_rows"]),
            float(self.settings["base_weight"]),
        )
        return scores.float().cpu(), debiased.float().cpu()
