"""OpenAI CLIP's byte-level BPE tokenizer (the one its ResNet and ViT checkpoints were trained with).

Vocabulary: ``bpe_simple_vocab_16e6.txt.gz`` (a header line, then merges; OpenAI uses the first
49152 - 256 - 2 of them), which OpenAI's ``clip`` package ships (MIT licence) and which dbtr does not bundle:
pass its path. Ids: the 256 byte symbols, the same with the end-of-word marker ``</w>``, one id per merge,
then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.

Text is cleaned as OpenAI does (``ftfy.fix_text`` when ftfy is installed, which OpenAI requires and dbtr does
not; HTML entities unescaped twice; runs of whitespace collapsed; lowercased), split with OpenAI's pattern
(contractions, letter runs, single digits, runs of other non-space symbols) and each piece merged greedily
by merge rank. Sequences are ``[SOT] + ids + [EOT]``, cut to the context length with EOT kept last, and padded
with 0, so EOT is the largest id of every row (OpenAI's argmax rule finds it).
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import regex
import torch
from torch import Tensor

from dbtr.utils.errors import UserError

SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
CONTEXT_LENGTH = 77
N_MERGES = 49152 - 256 - 2
# The published ids of a probe sentence: a vocabulary file that does not give them is the wrong file.
PROBE_TEXT, PROBE_IDS = "a photo of a cat", (320, 1125, 539, 320, 2368)
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerFileError(UserError):
    """A BPE vocabulary file that is missing, unreadable or does not reproduce OpenAI's ids."""


@lru_cache
def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # Order matters: ids follow this dict's order (the kept bytes first, then the others from 256 up).
    table = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain text tokenizes the same without it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class OpenAIBPETokenizer:
    def __init__(self, vocab_path: str | Path, context_length: int = CONTEXT_LENGTH):
        self.path = Path(vocab_path).expanduser()
        self.context_length = context_length
        merges = self._read_merges()
        symbols = list(byte_symbols().values())
        vocab = (
            symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        )
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self._cache: dict[str, list[str]] = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}
        self.sot_id, self.eot_id = self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN]
        got = tuple(self.encode(PROBE_TEXT))
        if (self.sot_id, self.eot_id) != (SOT_ID, EOT_ID) or got != PROBE_IDS:
            raise TokenizerFileError(
                f"{self.path} is not OpenAI CLIP's BPE vocabulary: {PROBE_TEXT!r} gives {list(got)} and "
                f"SOT/EOT {self.sot_id}/{self.eot_id}, expected {list(PROBE_IDS)} and {SOT_ID}/{EOT_ID}; "
                f"use bpe_simple_vocab_16e6.txt.gz from OpenAI's clip package"
            )

    def _read_merges(self) -> list[tuple[str, str]]:
        try:
            lines = gzip.open(self.path, "rt", encoding="utf-8").read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise TokenizerFileError(
                f"cannot read the BPE vocabulary {self.path} ({type(err).__name__}: {err}); pass the path of "
                f"bpe_simple_vocab_16e6.txt.gz from OpenAI's clip package (pip download openai-clip "
                f"--no-deps)"
            ) from None
        merges = []
        for lineno, line in enumerate(lines[1 : N_MERGES + 1], start=2):
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerFileError(
                    f"{self.path} line {lineno}: {line!r} is not a merge of two symbols; the file must hold "
                    f"a header line and at least {N_MERGES} merges (OpenAI's bpe_simple_vocab_16e6.txt.gz)"
                )
            merges.append((parts[0], parts[1]))
        if len(merges) < N_MERGES:
            raise TokenizerFileError(
                f"{self.path} holds {len(merges)} merges, OpenAI's vocabulary needs {N_MERGES}: truncated "
                f"file?"
            )
        return merges

    def __len__(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> list[str]:
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without SOT/EOT."""
        table = byte_symbols()
        ids = []
        for piece in _PATTERN.findall(clean(text)):
            symbols = "".join(table[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(symbols))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        inverse = {c: b for b, c in byte_symbols().items()}
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(inverse[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    # The parts of the HF tokenizer interface dbtr uses (CaptionCollate, PromptLearner, ClipEncoder).
    @property
    def bos_token_id(self) -> int:
        return self.sot_id

    @property
    def eos_token_id(self) -> int:
        return self.eot_id

    pad_token_id = 0  # OpenAI pads with 0, so EOT stays the largest id of a row
    unk_token_id = None

    def __repr__(self) -> str:  # part of the caption cache key: names the vocabulary by content
        import hashlib

        digest = hashlib.sha256("\n".join(" ".join(m) for m in self.ranks).encode()).hexdigest()[:16]
        return f"OpenAIBPETokenizer(merges={digest}, context_length={self.context_length})"

    def ids(self, text: str, max_length: int | None = None) -> list[int]:
        """``[SOT] + encode(text) + [EOT]``, cut to ``max_length`` with EOT kept last (OpenAI's truncate)."""
        tokens = [self.sot_id, *self.encode(text), self.eot_id]
        if max_length is not None and len(tokens) > max_length:
            tokens = [*tokens[: max_length - 1], self.eot_id]
        return tokens

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
    ) -> dict:
        """HF-style: ``input_ids`` / ``attention_mask`` for one text (flat lists) or a batch.
        ``padding="max_length"`` pads with 0 to ``max_length`` (default: the context length), as OpenAI's
        ``clip.tokenize``; ``padding=True`` to the longest row; ``return_tensors="pt"`` gives tensors."""
        single = isinstance(texts, str)
        length = max_length or self.context_length
        rows = [self.ids(t, length if truncation else None) for t in ([texts] if single else texts)]
        if padding == "max_length" or padding is True or return_tensors == "pt":
            width = length if padding == "max_length" else max((len(r) for r in rows), default=0)
            masks = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    def tokenize(self, texts: Sequence[str], context_length: int | None = None) -> Tensor:
        """(B, L) ids exactly as OpenAI's ``clip.tokenize(texts, context_length, truncate=True)``."""
        length = context_length or self.context_length
        return self(
            list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )["input_ids"]
