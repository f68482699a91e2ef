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
from torch import Tensor
from torch.utils.data import Dataset

from dbtr.data.labels import DataFormatError, iter_jsonl, label_row, require_text

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
    """Normalised CLIP text features of a corpus, padded to the longest caption (fp16 to halve memory)."""

    text_embeds: Tensor  # (N, D)
    token_embeds: Tensor  # (N, L, D)
    attention_mask: Tensor  # (N, L) bool


@torch.no_grad()
def encode_caption_features(encoder, texts: Sequence[str], batch_size: int = 256, dtype=torch.float16) -> CaptionFeatures:
    """Run the frozen text encoder once over ``texts``; trim padding to the corpus' longest caption."""
    glob, toks, masks = [], [], []
    for start in range(0, len(texts), batch_size):
        batch = encoder.tokenize(texts[start : start + batch_size])
        out = encoder.encode_text(**batch)
        glob.append(out.text_embeds.to("cpu", dtype))
        toks.append(out.token_embeds.to("cpu", dtype))
        masks.append(out.attention_mask.cpu())
    mask = torch.cat(masks)
    length = int(mask.sum(1).max())
    return CaptionFeatures(torch.cat(glob), torch.cat(toks)[:, :length].contiguous(), mask[:, :length].contiguous())


class CaptionDataset(Dataset):
    """Items are dicts with ``labels`` and either cached features or the raw text (tokenised in the collate)."""

    def __init__(self, records: CaptionRecords, features: CaptionFeatures | None = None):
        if features is not None and len(features.text_embeds) != len(records.texts):
            raise ValueError(f"{len(features.text_embeds)} cached features for {len(records.texts)} captions")
        self.records, self.features = records, features

    def __len__(self) -> int:
        return len(self.records.texts)

    def __getitem__(self, i: int) -> dict:
        item = {"labels": torch.from_numpy(self.records.labels[i].astype(np.int64))}
        if self.features is None:
            item["text"] = self.records.texts[i]
        else:
            f = self.features
            item.update(text_embeds=f.text_embeds[i], token_embeds=f.token_embeds[i], attention_mask=f.attention_mask[i])
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
            for key in ("text_embeds", "token_embeds", "attention_mask"):
                out[key] = torch.stack([it[key] for it in items])
        return out
