"""Caption corpora for text-only training: records, datasets, and the in-memory feature cache.

A caption stands in for an image (TaI-DPT): its EOT embedding is the "global" feature and its token
embeddings, masked to the real tokens, are the "local" features. CLIP is frozen, so these features are
computed once (``encode_caption_features``) and training steps never run the text encoder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dbtr.data.labels import label_row, require_text
from dbtr.utils.files import DataFormatError, iter_jsonl

log = logging.getLogger(__name__)


@dataclass
class CaptionRecords:
    texts: list[str]
    labels: np.ndarray  # (N, C) int8 in {1, -1}
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count


def read_caption_jsonl(path: str | os.PathLike, class_names: Sequence[str]) -> CaptionRecords:
    """Read ``{"text": ..., "labels": [class names]}`` lines; every error names the file and line.

    Captions without any label are dropped and counted (TaI-DPT drops unmatched captions): as all-negative
    rows they would only dilute the ranking loss and add label noise to BCE/ASL.
    """
    index = {n: i for i, n in enumerate(class_names)}
    texts, rows, read = [], [], 0
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        text = require_text(rec, "text", where)
        row = label_row(rec.get("labels"), index, where)
        read += 1
        if (row == 1).any():
            texts.append(text)
            rows.append(row)
    if read == 0:
        raise DataFormatError(f"{path}: no captions found")
    if not texts:
        raise DataFormatError(f"{path}: none of the {read} captions carries a label; nothing to train on")
    dropped = {"no_label": read - len(texts)} if read > len(texts) else {}
    if dropped:
        log.warning("%s: dropped %d of %d captions without any label", path, dropped["no_label"], read)
    return CaptionRecords(texts, np.stack(rows), dropped)


@dataclass
class CaptionFeatures:
    """Normalised CLIP text features of a corpus in fp16, ragged: only real tokens (SOT..EOT) are stored.

    Caption i's tokens are ``token_embeds[offsets[i]:offsets[i + 1]]``. Arrays may be numpy memory maps
    (the disk cache) or in-memory arrays; batches are padded by the collate function.
    """

    text_embeds: np.ndarray  # (N, D) float16
    token_embeds: np.ndarray  # (T, D) float16, T = total real tokens
    offsets: np.ndarray  # (N + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> np.ndarray:
        return self.token_embeds[self.offsets[i] : self.offsets[i + 1]]


@torch.no_grad()
def encode_caption_features(encoder, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> CaptionFeatures:
    """Run the frozen text encoder once over ``texts`` and keep the EOT and real-token embeddings (fp16)."""
    glob, toks, lengths = [], [], []
    starts = range(0, len(texts), batch_size)
    if progress:
        from dbtr.utils.progress import track

        starts = track(starts, description=f"encoding {len(texts)} captions")
    for start in starts:
        batch = encoder.tokenize(texts[start : start + batch_size])
        out = encoder.encode_text(**batch)
        mask = out.attention_mask.cpu()
        glob.append(out.text_embeds.to("cpu", torch.float16).numpy())
        toks.append(out.token_embeds.to("cpu", torch.float16)[mask].numpy())
        lengths.append(mask.sum(1).numpy())
    dim = encoder.embed_dim
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    return CaptionFeatures(
        np.concatenate(glob) if glob else np.zeros((0, dim), np.float16),
        np.concatenate(toks) if toks else np.zeros((0, dim), np.float16),
        offsets,
    )


class CaptionDataset(Dataset):
    """Items are dicts with ``labels`` and either cached features or the raw text (tokenised in the collate)."""

    def __init__(self, records: CaptionRecords, features: CaptionFeatures | None = None):
        if features is not None and len(features) != len(records.texts):
            raise ValueError(f"{len(features)} cached features for {len(records.texts)} captions")
        self.records, self.features = records, features

    def __len__(self) -> int:
        return len(self.records.texts)

    def __getitem__(self, i: int) -> dict:
        item = {"labels": torch.from_numpy(self.records.labels[i].astype(np.int64))}
        if self.features is None:
            item["text"] = self.records.texts[i]
        else:
            f = self.features
            item.update(text_embeds=torch.from_numpy(np.array(f.text_embeds[i])), token_embeds=torch.from_numpy(np.array(f.tokens(i))))
        return item


class CaptionCollate:
    """Stacks cached features, or tokenises raw texts with the CLIP tokenizer (picklable for workers)."""

    def __init__(self, tokenizer=None, max_length: int = 77):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict:
        out = {"labels": torch.stack([it["labels"] for it in items])}
        if "text" in items[0]:
            if self.tokenizer is None:
                raise RuntimeError("raw captions need a tokenizer: call datamodule.attach_encoder(encoder) or cache features")
            tok = self.tokenizer(
                [it["text"] for it in items], padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )
            out.update(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        else:
            # pad the ragged token sets to the longest caption of the batch; the mask marks real tokens
            tokens = [it["token_embeds"] for it in items]
            length = max(len(t) for t in tokens)
            padded = torch.zeros(len(tokens), length, tokens[0].shape[-1], dtype=tokens[0].dtype)
            mask = torch.zeros(len(tokens), length, dtype=torch.bool)
            for j, t in enumerate(tokens):
                padded[j, : len(t)] = t
                mask[j, : len(t)] = True
            out.update(text_embeds=torch.stack([it["text_embeds"] for it in items]), token_embeds=padded, attention_mask=mask)
        return out
