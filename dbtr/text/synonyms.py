"""Caption -> multi-hot labels by synonym matching on lemmas (TaI-DPT protocol, docs/method.md §5.2).

TaI-DPT lemmatises with NLTK's POS tagger + WordNet, whose data cannot be downloaded here. We use
lemminflect (its data ships in the wheel) and, lacking a tagger, give every token the set of its possible
lemmas (noun, verb, adjective readings): "leaves" -> {leaves, leaf, leave}, "skiing" -> {skiing, ski}. A
synonym word matches a token if it is in that set. Matching order follows TaI-DPT: multi-word synonyms
first (longest first), and their tokens are consumed so "hot dog" does not also label "dog"; then single
words. A multi-word synonym is also registered without its spaces ("motor bike" -> "motorbike").
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from dbtr.utils.errors import ConfigError, UserError

_TOKEN = re.compile(r"[a-z0-9]+")


class VocabularyError(UserError):
    """A synonym vocabulary is malformed (the message names the file and the classes involved)."""


@lru_cache(maxsize=200_000)
def lemma_set(token: str) -> frozenset[str]:
    """The token itself plus every lemma lemminflect knows for it (any part of speech)."""
    import lemminflect

    lemmas = {token}
    for upos in ("NOUN", "VERB", "ADJ"):
        lemmas.update(lemminflect.getLemma(token, upos=upos, lemmatize_oov=upos == "NOUN"))
    return frozenset(lemmas)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass
class SynonymVocabulary:
    """Per class, its synonyms; the first synonym is the prompt name. A synonym may belong to one class
    only."""

    synonyms: dict[str, list[str]]
    source: str = "vocabulary"
    _phrases: list[tuple[tuple[str, ...], int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.synonyms:
            raise VocabularyError(f"{self.source}: no classes")
        owner: dict[tuple[str, ...], str] = {}
        phrases = []
        for ci, (cls, syns) in enumerate(self.synonyms.items()):
            if not syns or not all(isinstance(s, str) and s.strip() for s in syns):
                raise VocabularyError(
                    f"{self.source}: class {cls!r} needs a non-empty list of non-empty synonyms"
                )
            forms = []
            for syn in syns:
                words = tuple(tokenize(syn))
                if not words:  # it would match every caption (an empty phrase is found everywhere)
                    raise VocabularyError(
                        f"{self.source}: class {cls!r} has the synonym {syn!r}, which has no letter "
                        "or digit and would label every caption: remove it"
                    )
                forms.append(words)
                if len(words) > 1:
                    forms.append(("".join(words),))
            for words in dict.fromkeys(forms):
                if words in owner and owner[words] != cls:
                    raise VocabularyError(
                        f"{self.source}: synonym {' '.join(words)!r} belongs to both {owner[words]!r} "
                        f"and {cls!r}"
                    )
                if words not in owner:
                    owner[words] = cls
                    phrases.append((words, ci))
        self._refuse_shared_inflections(owner)
        # longest phrases first: compounds are matched (and consumed) before their single words
        self._phrases = sorted(phrases, key=lambda p: -len(p[0]))

    def _refuse_shared_inflections(self, owner: dict[tuple[str, ...], str]) -> None:
        """A caption word matches a synonym word through its lemmas ("balls" matches "ball"), so "ball" in one
        class and "balls" in another would both label "balls": refuse it as a shared synonym."""
        for words, cls in owner.items():
            for form in itertools.product(*(sorted(lemma_set(w)) for w in words)):
                other = owner.get(form)
                if other is not None and other != cls:
                    raise VocabularyError(
                        f"{self.source}: synonym {' '.join(words)!r} of class {cls!r} and "
                        f"{' '.join(form)!r} of class {other!r} are forms of the same word (a caption with "
                        f"{' '.join(words)!r} would be labelled with both): keep it in one class"
                    )

    @property
    def class_names(self) -> list[str]:
        return list(self.synonyms)

    @property
    def prompt_names(self) -> list[str]:
        return [syns[0] for syns in self.synonyms.values()]

    def match(self, text: str) -> list[int]:
        """Indices of the classes ``text`` mentions (sorted)."""
        tokens = [lemma_set(t) for t in tokenize(text)]
        used = [False] * len(tokens)
        found = set()
        for words, ci in self._phrases:
            n = len(words)
            for start in range(len(tokens) - n + 1):
                span = range(start, start + n)
                if not any(used[i] for i in span) and all(words[k] in tokens[start + k] for k in range(n)):
                    found.add(ci)
                    if n > 1:
                        for i in span:
                            used[i] = True
        return sorted(found)

    def label(self, texts: Iterable[str]) -> np.ndarray:
        """(N, C) int8 matrix in {1, -1}: 1 where a class is mentioned."""
        matches = [self.match(text) for text in texts]
        out = np.full((len(matches), len(self.synonyms)), -1, dtype=np.int8)
        for i, found in enumerate(matches):
            out[i, found] = 1
        return out


def load_vocabulary(path: str | os.PathLike) -> SynonymVocabulary:
    """A JSON object ``{class: [synonym, ...]}`` (order = label columns; first synonym = prompt name)."""
    from dbtr.utils.files import load_json

    data = load_json(path, "a synonym vocabulary: a JSON object class -> [synonyms]", VocabularyError)
    if not isinstance(data, dict):
        raise VocabularyError(
            f"{path}: expected a JSON object class -> [synonyms], got {type(data).__name__}"
        )
    return SynonymVocabulary(
        {str(k): list(v) if isinstance(v, list) else v for k, v in data.items()}, source=str(path)
    )


VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabularies"
# name -> file under VOCABULARY_DIR. The dbtr lists were written for dbtr from each dataset's class
# definitions. The taidpt_* lists are TaI-DPT's own (guozix/TaI-DPT, datasets/data_helpers.py at commit
# 1333ecaa32bfffb4f2eb916f5532afb88ac457fe, last changed in 90a7524: voc_classname_synonyms l.104-125,
# coco_classname_synonyms l.168-249, nuswide_classname_synonyms l.256-338), in their order, keyed by dbtr's
# label names. Their first synonym is TaI-DPT's class name (its *_object_categories): for VOC the devkit name,
# put first where TaI-DPT's list starts otherwise ("diningtable" before "table"); TaI-DPT registers the
# space-free form of every compound anyway, so this changes no match. docs/taidpt_recipe.md has the details.
BUILTIN_FILES = {
    "voc2007": "voc2007.json",
    "coco2014": "coco2014.json",
    "nuswide": "nuswide.json",
    "taidpt_voc2007": "taidpt/voc2007.json",
    "taidpt_coco2014": "taidpt/coco2014.json",
    "taidpt_nuswide": "taidpt/nuswide.json",
}
BUILTIN_VOCABULARIES = tuple(BUILTIN_FILES)


def builtin_vocabulary(name: str) -> SynonymVocabulary:
    """A shipped vocabulary (class order = the dataset's standard label order). In dbtr's own lists VOC's
    "diningtable", "tvmonitor", "pottedplant" prompt as "dining table", "tv monitor", "potted plant"."""
    if name not in BUILTIN_FILES:
        raise ConfigError(
            f"unknown vocabulary {name!r}; built in: {', '.join(BUILTIN_VOCABULARIES)} (or pass the path "
            "of a JSON file {class: [synonyms]})"
        )
    return load_vocabulary(VOCABULARY_DIR / BUILTIN_FILES[name])


def vocabulary_from_names(class_names: Sequence[str]) -> SynonymVocabulary:
    """Each class matched by its own name only (for label spaces without a synonym file)."""
    return SynonymVocabulary({n: [n] for n in class_names}, source="class names")
