"""Caption corpora for text-only training: records, datasets, and the in-memory feature cache.

A caption stands in for an image (TaI-DPT): its EOT embedding is the "global" feature and its token
embeddings, masked to the real tokens, are the "local" features. CLIP is frozen, so these features are
computed once (``encode_caption_features``) and training steps never run the text encoder.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
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


def offsets_problem(offsets: np.ndarray, num_captions: int, num_tokens: int) -> str | None:
    """Why ``offsets`` cannot index ``num_tokens`` ragged tokens of ``num_captions`` captions (None if it
    can)."""
    if offsets.ndim != 1 or len(offsets) != num_captions + 1:
        want = num_captions + 1
        return f"offsets has shape {offsets.shape}, expected ({want},) for {num_captions} captions"
    if len(offsets) and (offsets[0] != 0 or offsets[-1] != num_tokens):
        return f"offsets run from {offsets[0]} to {offsets[-1]}, the token array holds 0 to {num_tokens}"
    if (np.diff(offsets) < 0).any():
        return "offsets decrease somewhere (a caption with a negative token count)"
    return None


@dataclass
class CaptionFeatures:
    """Normalised CLIP text features of a corpus in fp16, ragged: only real tokens (SOT..EOT) are stored.

    Caption i's tokens are ``token_embeds[offsets[i]:offsets[i + 1]]``. Arrays may be numpy memory maps
    (the disk cache), in-memory arrays, or torch tensors (e.g. on the accelerator, see :meth:`to`); a batch is
    one vectorised gather (:meth:`gather`). Offsets that disagree with the token count are refused here, so a
    gather never reads out of bounds.
    """

    text_embeds: np.ndarray | Tensor  # (N, D) float16
    token_embeds: np.ndarray | Tensor  # (T, D) float16, T = total real tokens
    offsets: np.ndarray | Tensor  # (N + 1,) int64

    def __post_init__(self):
        offsets = self.offsets.cpu().numpy() if isinstance(self.offsets, Tensor) else np.asarray(self.offsets)
        problem = offsets_problem(offsets, len(self.text_embeds), len(self.token_embeds))
        if problem:
            raise ValueError(f"inconsistent caption features: {problem}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> np.ndarray:
        return self.token_embeds[self.offsets[i] : self.offsets[i + 1]]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(a) for a in (self.text_embeds, self.token_embeds, self.offsets))

    def to(self, device: torch.device | str) -> CaptionFeatures:
        """The same features as torch tensors on ``device`` (the arrays are read once, e.g. from the memory
        map)."""
        arrays = (self.text_embeds, self.token_embeds, self.offsets)
        return CaptionFeatures(*(_as_tensor(a).to(device) for a in arrays))

    def gather(self, index: Tensor) -> dict[str, Tensor]:
        """Captions ``index`` as one padded batch: ``text_embeds`` (b, D), ``token_embeds`` (b, L, D)
        zero-padded to the longest of them, ``attention_mask`` (b, L) True on real tokens; fp16, on the
        arrays' device.

        One row gather straight into the padded layout (padding reads a real row, clamped inside the array,
        then is zeroed), on 8-byte words where the rows allow it: the batch is bound by memory bandwidth, not
        Python.
        """
        if isinstance(self.token_embeds, Tensor):  # e.g. on an accelerator: index them there
            return self._gather_tensors(index.to(self.offsets.device))
        idx = index.cpu().numpy()
        start = self.offsets[idx]
        length = self.offsets[idx + 1] - start
        width = int(length.max()) if len(idx) else 0
        steps = np.arange(width)
        mask = steps[None, :] < length[:, None]
        rows = np.minimum(start[:, None] + steps[None, :], max(len(self.token_embeds) - 1, 0)).reshape(-1)
        tokens = _take(self.token_embeds, rows)
        tokens[~mask.reshape(-1)] = 0
        return {
            "text_embeds": torch.from_numpy(_take(self.text_embeds, idx)),
            "token_embeds": torch.from_numpy(tokens.reshape(len(idx), width, -1)),
            "attention_mask": torch.from_numpy(mask),
        }

    def _gather_tensors(self, index: Tensor) -> dict[str, Tensor]:
        start = self.offsets[index]
        length = self.offsets[index + 1] - start
        width = int(length.max()) if len(index) else 0
        steps = torch.arange(width, device=index.device)
        mask = steps[None, :] < length[:, None]
        rows = (start[:, None] + steps[None, :]).clamp_max(max(len(self.token_embeds) - 1, 0)).view(-1)
        tokens = self.token_embeds.index_select(0, rows)
        tokens.masked_fill_(~mask.view(-1, 1), 0)
        return {
            "text_embeds": self.text_embeds.index_select(0, index),
            "token_embeds": tokens.view(len(index), width, -1),
            "attention_mask": mask,
        }


def _take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` (a new array), copied as 8-byte words when a row allows it (~25% faster)."""
    wide = array.ndim == 2 and array.flags.c_contiguous and (array.shape[1] * array.itemsize) % 8 == 0
    if wide and array.size:
        return np.take(array.view(np.int64), rows, axis=0).view(array.dtype)
    return np.take(array, rows, axis=0)


def _as_tensor(a: np.ndarray | Tensor) -> Tensor:
    if isinstance(a, Tensor):
        return a
    with warnings.catch_warnings():  # a read-only memory map: nothing writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _nbytes(a: np.ndarray | Tensor) -> int:
    return a.numel() * a.element_size() if isinstance(a, Tensor) else a.nbytes


@torch.no_grad()
def encode_caption_features(
    encoder, texts: Sequence[str], batch_size: int = 256, progress: bool = False
) -> CaptionFeatures:
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
    """Captions with their labels: ``dataset[i]`` is one item (a dict with ``labels`` and either cached
    features or the raw text), ``dataset[index_tensor]`` a whole batch, gathered at once (:meth:`batch`)."""

    def __init__(self, records: CaptionRecords, features: CaptionFeatures | None = None):
        if features is not None and len(features) != len(records.texts):
            raise ValueError(f"{len(features)} cached features for {len(records.texts)} captions")
        self.records, self.features = records, features
        self._labels = records.labels
        if features is not None and isinstance(features.offsets, Tensor):  # batches gathered on that device
            self._labels = torch.from_numpy(np.ascontiguousarray(records.labels)).to(features.offsets.device)

    def __len__(self) -> int:
        return len(self.records.texts)

    def __getitem__(self, i: int | Tensor) -> dict:
        if isinstance(i, Tensor) and i.ndim == 1:
            return self.batch(i)
        item = {"labels": torch.from_numpy(self.records.labels[i].astype(np.int64))}
        if self.features is None:
            item["text"] = self.records.texts[i]
        else:
            f = self.features
            item.update(
                text_embeds=torch.from_numpy(np.array(f.text_embeds[i])),
                token_embeds=torch.from_numpy(np.array(f.tokens(i))),
            )
        return item

    def batch(self, index: Tensor) -> dict:
        """Captions ``index`` (1-D int64) as one batch: int64 ``labels`` (b, C) and the padded cached features
        (:meth:`CaptionFeatures.gather`), or the raw ``text`` list (tokenised by :class:`CaptionCollate`)."""
        if isinstance(self._labels, Tensor):
            out = {"labels": self._labels[index.to(self._labels.device)].long()}
        else:
            out = {"labels": torch.from_numpy(self._labels[index.cpu().numpy()].astype(np.int64))}
        if self.features is None:
            out["text"] = [self.records.texts[i] for i in index.tolist()]
        else:
            out.update(self.features.gather(index))
        return out


class CaptionCollate:
    """Tokenises the raw texts of a gathered batch with the CLIP tokenizer (cached features pass through), or
    stacks a list of items (picklable for workers)."""

    def __init__(self, tokenizer=None, max_length: int = 77):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict] | dict) -> dict:
        if isinstance(items, dict):  # a batch from CaptionDataset.batch
            if "text" not in items:
                return items
            out = {"labels": items["labels"]}
            texts = items["text"]
        else:
            out = {"labels": torch.stack([it["labels"] for it in items])}
            if "text" not in items[0]:
                return {**out, **_pad_items(items)}
            texts = [it["text"] for it in items]
        if self.tokenizer is None:
            raise RuntimeError(
                "raw captions need a tokenizer: call datamodule.attach_encoder(encoder) or cache features"
            )
        tok = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        out.update(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return out


def _pad_items(items: list[dict]) -> dict:
    """Pad the ragged token sets of single items to the longest caption; the mask marks real tokens."""
    tokens = [it["token_embeds"] for it in items]
    length = max(len(t) for t in tokens)
    padded = torch.zeros(len(tokens), length, tokens[0].shape[-1], dtype=tokens[0].dtype)
    mask = torch.zeros(len(tokens), length, dtype=torch.bool)
    for j, t in enumerate(tokens):
        padded[j, : len(t)] = t
        mask[j, : len(t)] = True
    text = torch.stack([it["text_embeds"] for it in items])
    return {"text_embeds": text, "token_embeds": padded, "attention_mask": mask}


def features_on_device(
    features: CaptionFeatures, device: torch.device, headroom: float = 0.5
) -> CaptionFeatures:
    """The features moved onto an accelerator when they fit in its free memory with ``headroom`` (a fraction
    of the free memory kept for the step), so a batch is gathered there; otherwise (or on CPU) unchanged,
    with a one-line notice: host memory is slower but never runs out halfway through an epoch."""
    if device.type != "cuda" or (isinstance(features.offsets, Tensor) and features.offsets.device == device):
        return features
    copies = features.__dict__.setdefault("_device_copies", {})  # train_dataloader() is called more than once
    if str(device) not in copies:
        free, _ = torch.cuda.mem_get_info(device)
        if features.nbytes > (1.0 - headroom) * free:
            log.warning(
                "caption features (%.2f GiB) stay in host memory: %s has only %.2f GiB free",
                features.nbytes / 2**30,
                device,
                free / 2**30,
            )
            copies[str(device)] = features
        else:
            copies[str(device)] = features.to(device)
    return copies[str(device)]
