"""Caption sources for text-only training assembled into a labelled corpus (docs/method.md §5.1, §5.2).

Sources yield ``(where, text)`` pairs, ``where`` being "file:line" (or file#index) for error messages:
- ``coco_captions``: ``captions_train2017.json`` layout (``{"annotations": [{"caption": ...}, ...]}``),
  optionally only the annotation ids listed in an ``ids`` file (TaI-DPT's sampled captions);
- ``narratives``: OpenImages localized narratives JSON lines (``{"caption": ...}`` per line);
- ``text_lines``: one caption per line;
- ``class_sentences``: generated one-label sentences per class (TaI-DPT: "a photo of a {}." x N plus the
  80 ImageNet templates), whose labels are known and not matched.

``build_corpus`` labels the captions by synonym matching, drops and counts the unmatched ones, optionally
balances them (NUS-WIDE protocol: each caption goes to its rarest positive class, at most N per class), and
returns the records with a report of what was read, kept and dropped.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dbtr.data.labels import signed_row
from dbtr.text.synonyms import SynonymVocabulary
from dbtr.text.templates import IMAGENET_TEMPLATES
from dbtr.utils.errors import ConfigError, choice_error
from dbtr.utils.files import DataFormatError, iter_jsonl, iter_lines, load_json

Caption = tuple[str, str]  # (where, text)


def coco_captions(path: str | os.PathLike, ids: str | os.PathLike | None = None) -> Iterator[Caption]:
    """Every caption of a COCO captions file, in file order; with ``ids`` (a file of annotation ids, see
    :func:`load_caption_ids`) only those, in the ids file's order, each exactly once."""
    data = load_json(path, "a COCO captions file such as annotations/captions_train2017.json")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise DataFormatError(
            f"{path}: expected a JSON object with an 'annotations' list (COCO captions layout)"
        )
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise DataFormatError(f"{path}: annotations[{i}] has no string 'caption'")
    if ids is None:
        for i, ann in enumerate(anns):
            yield f"{path}#annotations[{i}]", ann["caption"]
        return
    wanted = load_caption_ids(ids)
    by_id = {ann.get("id"): i for i, ann in enumerate(anns)}
    absent = [a for a in wanted if a not in by_id]
    if absent:
        raise DataFormatError(
            f"{ids}: {len(absent)} of its {len(wanted)} caption ids are not annotation ids of {path} "
            f"(first: {absent[:5]}); the list must come from the same captions file (TaI-DPT's list is for "
            "captions_train2017.json)"
        )
    for a in wanted:
        i = by_id[a]
        yield f"{path}#annotations[{i}] (id {a})", anns[i]["caption"]


class _NoObjects(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference is refused, so nothing in the file runs."""

    def find_class(self, module: str, name: str):
        raise DataFormatError(f"it references {module}.{name}; only a plain list of integers is accepted")


def load_caption_ids(path: str | os.PathLike) -> list[int]:
    """Caption annotation ids: a ``.pkl`` / ``.pickle`` holding a plain list of integers (TaI-DPT's
    ``coco_caption_text_embed_sampled_idx.pkl``, read without running code from it), a ``.json`` list, or a
    text file with one id per line. Duplicates are refused (a caption would count twice)."""
    path = Path(path)
    what = "a caption id list: .pkl (a pickled list of ints), .json (a list) or .txt (one id per line)"
    if not path.is_file():
        raise FileNotFoundError(
            f"caption id list not found: {path} (expected {what}; TaI-DPT's sampled COCO captions are "
            "coco_caption_text_embed_sampled_idx.pkl in the root of github.com/guozix/TaI-DPT)"
        )
    if path.suffix.lower() in (".pkl", ".pickle"):
        try:
            with path.open("rb") as fh:
                ids = _NoObjects(fh).load()
        except DataFormatError as err:
            raise DataFormatError(f"{path}: {err}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise DataFormatError(f"{path}: not a readable pickle ({err}); expected {what}") from None
    elif path.suffix.lower() == ".json":
        ids = load_json(path, what)
    else:
        ids = [line.strip() for _, line in iter_lines(path) if line.strip()]
        try:
            ids = [int(x) for x in ids]
        except ValueError:
            raise DataFormatError(f"{path}: every line must be one integer caption id") from None
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in ids
    ):
        raise DataFormatError(f"{path}: expected {what}, got {type(ids).__name__} with non-integer items")
    if len(set(ids)) != len(ids):
        raise DataFormatError(f"{path}: {len(ids) - len(set(ids))} caption ids are listed more than once")
    return list(ids)


def narratives(path: str | os.PathLike) -> Iterator[Caption]:
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec.get("caption"), str):
            raise DataFormatError(
                f"{path}:{lineno}: missing or non-string field 'caption' (localized narratives layout)"
            )
        yield f"{path}:{lineno}", rec["caption"]


def text_lines(path: str | os.PathLike) -> Iterator[Caption]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption text file not found: {path} (expected one caption per line)")
    for lineno, line in iter_lines(path):
        if line.strip():
            yield f"{path}:{lineno}", line.strip()


def hf_dataset(
    path: str, column: str = "caption", split: str = "train", data_files=None, **kwargs
) -> Iterator[Caption]:
    """Any HF ``datasets`` dataset: a builder for local files (``json``, ``csv``, ``parquet`` with
    ``data_files``) or a hub name (needs network or the HF cache). ``column`` holds the caption text."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "the hf_dataset caption source needs `pip install datasets` (or dbtr[datasets])"
        ) from None
    ds = datasets.load_dataset(path, data_files=data_files, split=split, **kwargs)
    if column not in ds.column_names:
        raise DataFormatError(
            f"{path} ({data_files or split}): no column {column!r}; columns are {ds.column_names}"
        )
    for i, text in enumerate(ds[column]):
        if not isinstance(text, str):
            raise DataFormatError(
                f"{path} ({data_files or split}) row {i}: {column!r} is {type(text).__name__}, not text"
            )
        yield f"{path}[{i}]", text


def class_sentences(
    vocab: SynonymVocabulary, simple_count: int = 9, templates: Sequence[str] = IMAGENET_TEMPLATES
) -> tuple[list[str], np.ndarray]:
    """TaI-DPT's extra samples: per class "a photo of a {}." x ``simple_count`` plus each template once,
    one-hot."""
    texts, rows = [], []
    for ci, name in enumerate(vocab.prompt_names):
        for sentence in ["a photo of a {}."] * simple_count + list(templates):
            texts.append(sentence.format(name))
            rows.append(signed_row(len(vocab.class_names), [ci]))
    return texts, np.stack(rows) if rows else np.zeros((0, len(vocab.class_names)), dtype=np.int8)


@dataclass
class CorpusReport:
    classes: list[str]
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    positives: list[int] = field(default_factory=list)
    labels_per_caption: dict[int, int] = field(default_factory=dict)
    truncated: int | None = None  # kept captions longer than the tokenizer limit (known once a tokenizer is)

    @classmethod
    def from_labels(
        cls, classes: Sequence[str], labels: np.ndarray, read: int, dropped: dict[str, int]
    ) -> CorpusReport:
        """Counts of a kept label matrix (N, C) in {1, -1}, plus what was read and dropped on the way."""
        positives = labels == 1
        return cls(
            classes=list(classes),
            read=read,
            kept=len(labels),
            dropped={k: v for k, v in dropped.items() if v},
            positives=positives.sum(0).astype(int).tolist(),
            labels_per_caption=dict(Counter(positives.sum(1).astype(int).tolist())),
        )

    def as_dict(self) -> dict:
        return {
            "num_items": self.kept,
            "read": self.read,
            "classes": self.classes,
            "positives": self.positives,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "labels_per_caption": {str(k): v for k, v in sorted(self.labels_per_caption.items())},
            "classes_without_caption": [c for c, n in zip(self.classes, self.positives) if n == 0],
        }


def balance_by_rarest_class(labels: np.ndarray, max_per_class: int) -> np.ndarray:
    """Indices kept by the NUS-WIDE protocol: each caption is assigned to its rarest positive class (by
    caption frequency), and at most ``max_per_class`` captions are kept per class, in corpus order."""
    freq = (labels == 1).sum(0)
    taken = np.zeros(labels.shape[1], dtype=np.int64)
    keep = []
    for i, row in enumerate(labels == 1):
        pos = np.flatnonzero(row)
        if pos.size == 0:
            continue
        cls = pos[np.argmin(freq[pos])]  # ties: the lower class index, deterministic
        if taken[cls] < max_per_class:
            taken[cls] += 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def build_corpus(
    sources: Iterable[Caption],
    vocab: SynonymVocabulary,
    extra: tuple[list[str], np.ndarray] | None = None,
    max_per_class: int | None = None,
) -> tuple[list[str], np.ndarray, CorpusReport]:
    """Label ``sources`` by synonym matching; unmatched and empty captions are dropped and counted."""
    read = 0
    texts, rows = [], []
    drops: Counter[str] = Counter()
    for _where, text in sources:
        read += 1
        if not text.strip():
            drops["empty"] += 1
            continue
        hit = vocab.match(text)
        if not hit:
            drops["no_synonym_match"] += 1
            continue
        texts.append(text)
        rows.append(signed_row(len(vocab.class_names), hit))
    labels = np.stack(rows) if rows else np.zeros((0, len(vocab.class_names)), dtype=np.int8)
    if max_per_class is not None:
        keep = balance_by_rarest_class(labels, max_per_class)
        drops["over_class_cap"] += len(texts) - len(keep)
        texts, labels = [texts[i] for i in keep], labels[keep]
    if extra is not None and len(extra[0]):
        read += len(extra[0])
        texts, labels = texts + list(extra[0]), np.concatenate([labels, extra[1]])
    if not texts:
        raise DataFormatError(f"the corpus yields no labelled caption ({read} read, dropped: {dict(drops)})")
    return texts, labels, CorpusReport.from_labels(vocab.class_names, labels, read, dict(drops))


SOURCES = {
    "coco_captions": coco_captions,
    "narratives": narratives,
    "text_lines": text_lines,
    "hf_dataset": hf_dataset,
}


def resolve_vocabulary(vocabulary: str | os.PathLike) -> SynonymVocabulary:
    """A built-in name (voc2007, coco2014, nuswide) or a JSON file of ``{class: [synonyms]}``."""
    from dbtr.text.synonyms import BUILTIN_VOCABULARIES, builtin_vocabulary, load_vocabulary

    if str(vocabulary) in BUILTIN_VOCABULARIES:
        return builtin_vocabulary(str(vocabulary))
    return load_vocabulary(vocabulary)


PROMPT_NAME_SOURCES = ("labels", "vocabulary")


def corpus_prompt_names(spec: dict, class_names: Sequence[str]) -> dict[str, str] | None:
    """``data.corpus.prompt_names``: ``labels`` (default: the model prompts each class by its label name) or
    ``vocabulary`` (by the vocabulary's first synonym, the name its class sentences use; TaI-DPT prompts its
    own class names, e.g. COCO's "motor bike", VOC's "diningtable"). Returns the mapping for the model, or
    None."""
    source = spec.get("prompt_names") or "labels"
    if source not in PROMPT_NAME_SOURCES:
        raise choice_error("data.corpus.prompt_names", source, PROMPT_NAME_SOURCES)
    if source == "labels":
        return None
    vocab = resolve_vocabulary(spec["vocabulary"])
    names = dict(zip(vocab.class_names, vocab.prompt_names))
    return {c: names[c] for c in class_names if c in names}


def load_corpus(
    spec: dict, class_names: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, CorpusReport]:
    """Build a corpus from a config dict: ``vocabulary``, ``sources`` (``[{type, path}]``),
    ``class_sentences`` (count of "a photo of a {}." per class, with the 80 templates; null = none) and
    ``max_per_class``."""
    vocab = resolve_vocabulary(spec["vocabulary"])
    if class_names is not None and list(class_names) != vocab.class_names:
        raise ConfigError(
            f"the vocabulary {spec['vocabulary']!r} defines classes {vocab.class_names[:5]}... "
            f"({len(vocab.class_names)}), the data's class list is {list(class_names)[:5]}... "
            f"({len(class_names)}): they must be equal and in the same order"
        )
    streams = []
    for i, src in enumerate(spec.get("sources") or []):
        kind = src.get("type")
        if kind not in SOURCES:
            raise ConfigError(f"corpus.sources[{i}].type must be one of {sorted(SOURCES)}, got {kind!r}")
        streams.append(SOURCES[kind](**{k: v for k, v in src.items() if k != "type"}))
    extra = None
    if spec.get("class_sentences") is not None:
        extra = class_sentences(vocab, simple_count=int(spec["class_sentences"]))
    if not streams and extra is None:
        raise ConfigError("corpus: give at least one source or class_sentences")

    def chained() -> Iterator[Caption]:
        for stream in streams:
            yield from stream

    return build_corpus(chained(), vocab, extra=extra, max_per_class=spec.get("max_per_class"))


def count_truncated(tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 4096) -> int:
    """How many captions exceed ``max_length`` tokens (SOT and EOT included) and will be truncated."""
    n = 0
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[start : start + batch_size]), truncation=False)["input_ids"]
        n += sum(len(x) > max_length for x in ids)
    return n


def report_table(report: CorpusReport, title: str = "caption corpus"):
    """A rich table: one row per class with its caption count, then the totals and drops."""
    from rich.table import Table

    truncated = "" if report.truncated is None else f"; {report.truncated} truncated to the token limit"
    table = Table(
        title=(
            f"{title}: {report.kept} kept of {report.read} read; "
            f"dropped {report.dropped or 'none'}{truncated}"
        )
    )
    table.add_column("class")
    table.add_column("captions", justify="right")
    for name, n in zip(report.classes, report.positives):
        table.add_row(name if n else f"[red]{name} (no caption)[/red]", str(n))
    return table
