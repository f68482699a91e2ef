"""Text-only training epoch with cached caption features vs re-encoding captions every step.

    python benchmarks/bench_cached_training.py [--captions 5000] [--batch 512]

ViT-B/16-sized random CLIP text tower (12 layers, width 512, 77 tokens), 80 classes, the full head.
The cached epoch reads the on-disk cache (memory-mapped, ragged fp16). Prints the text-encoder forward
count of each epoch (cached must be 0), the epoch-time ratio (target >= 50x at 5,000 captions) and the
cache bytes per caption against a dense 77 x D fp32 layout (target <= 25%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import vit_b16_clip  # noqa: E402

from dbtr.data.captions import CaptionCollate, CaptionDataset, CaptionRecords  # noqa: E402
from dbtr.models.clip import ClipEncoder  # noqa: E402
from dbtr.models.tiny import train_bpe_tokenizer  # noqa: E402
from dbtr.system.lit_module import DbtrLitModule  # noqa: E402

WORDS = "cat dog car bus bird boat chair table person horse sheep cow bottle plant sofa train".split()


def corpus(n: int, classes: int, seed: int = 0) -> CaptionRecords:
    rng = np.random.default_rng(seed)
    texts, labels = [], np.full((n, classes), -1, dtype=np.int8)
    for i in range(n):
        k = rng.integers(1, 4)
        words = rng.choice(len(WORDS), size=k, replace=False)
        texts.append(
            "a photo of "
            + " and ".join(f"a {WORDS[w]} near the {rng.choice(WORDS)} on the street" for w in words)
        )
        labels[i, rng.choice(classes, size=k, replace=False)] = 1
    return CaptionRecords(texts, labels)


def epoch_seconds(model, dataset, collate, batch: int) -> tuple[float, int]:
    calls = []
    handle = model.encoder.model.text_model.register_forward_hook(lambda *a: calls.append(1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    handle.remove()
    return time.perf_counter() - start, len(calls)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args()
    records = corpus(args.captions, args.classes)
    tokenizer = train_bpe_tokenizer(records.texts + WORDS, vocab_size=800)
    model_hf = vit_b16_clip(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    encoder = ClipEncoder(model_hf, tokenizer, dense="clearclip")
    names = [f"class {i}" for i in range(args.classes)]
    model = DbtrLitModule(
        clip={"name_or_path": "random-vit-b16"},
        class_names=names,
        templates="simple",
        encoder=encoder,
        scheduler={"warmup_epochs": 0},
    )
    model.ensure_class_embeddings()

    t_raw, n_raw = epoch_seconds(model, CaptionDataset(records), CaptionCollate(tokenizer, 77), args.batch)
    import tempfile

    from dbtr.data.feature_cache import cached_caption_features

    start = time.perf_counter()
    feats, _ = cached_caption_features(encoder, records.texts, tempfile.mkdtemp(prefix="dbtr-bench-"))
    t_cache = time.perf_counter() - start
    t_cached, n_cached = epoch_seconds(model, CaptionDataset(records, feats), CaptionCollate(), args.batch)
    print(
        f"captions={args.captions} classes={args.classes} batch={args.batch}"
        f" threads={torch.get_num_threads()}"
    )
    print(f"epoch re-encoding captions : {t_raw:8.2f} s  text-encoder forwards: {n_raw}")
    print(f"one-off feature caching    : {t_cache:8.2f} s (encode + write + checksum)")
    print(
        f"epoch on cached features   : {t_cached:8.2f} s  text-encoder forwards: {n_cached}"
        f"  ({'PASS' if n_cached == 0 else 'FAIL'}: must be 0)"
    )
    print(
        f"speed-up per epoch         : {t_raw / t_cached:8.1f}x"
        f"  (target >= 50x: {'PASS' if t_raw / t_cached >= 50 else 'FAIL'})"
    )
    stored = feats.text_embeds.nbytes + feats.token_embeds.nbytes + feats.offsets.nbytes
    dense = len(records.texts) * 77 * encoder.embed_dim * 4
    print(
        f"cache bytes per caption    : {stored / len(records.texts):8.0f}"
        f"  ({100 * stored / dense:.1f}% of dense 77 x D fp32;"
        f" target <= 25%: {'PASS' if stored <= 0.25 * dense else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
