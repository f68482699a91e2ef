"""Image evaluation: cached features vs the full image pass, and whether decoding keeps up with the model.

    python benchmarks/bench_image_eval.py [--images 500] [--workers 2] [--device cuda]

On a VOC2007-layout dataset of ``--images`` random 500x375 JPEGs and a ViT-B/16-sized random CLIP at 224 px:
  1. full pass = decode + preprocess + image tower + heads + mAP over the test split (what every evaluation
     costs without the cache); cached = the same evaluation reading the fingerprinted fp16 disk cache
     (checksums verified). Target: full / cached >= 20.
  2. loader alone (decode + CLIP preprocessing with the configured workers) vs the image tower alone on
     ready tensors, in images/s. Target: loader / model >= 2.
All numbers come from this one run on this machine; the ratios are what the targets are about.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import vit_b16_clip  # noqa: E402

from dbtr.data.benchmarks.datamodule import VOC2007DataModule  # noqa: E402
from dbtr.data.benchmarks.synthetic import random_voc2007  # noqa: E402
from dbtr.metrics import mean_average_precision  # noqa: E402
from dbtr.models.clip import ClipEncoder  # noqa: E402
from dbtr.models.heads import DualBranchHead  # noqa: E402


def evaluate(dm, encoder, head) -> float:
    """Score the whole test split (pixels or cached features, whichever the datamodule serves) and return
    mAP."""
    scores, labels = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            if "pixel_values" in batch:
                emb = encoder.encode_image(batch["pixel_values"].to(encoder.device))
                g, p = emb.image_embeds, emb.patch_embeds
            else:
                g, p = batch["image_embeds"].to(encoder.device), batch["patch_embeds"].to(encoder.device)
            scores.append(head(g, p).logits.float().cpu())
            labels.append(batch["labels"])
    return mean_average_precision(torch.cat(scores), torch.cat(labels))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fast-decode", action="store_true", help="JPEG draft decoding")
    args = ap.parse_args()
    dev = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="dbtr-bench-"))
    t = time.perf_counter()
    root = random_voc2007(tmp / "voc", num_trainval=2, num_test=args.images, image_size=(500, 375))
    print(f"dataset: {args.images} JPEGs 500x375 written in {time.perf_counter() - t:.1f} s ({root})")
    encoder = ClipEncoder(vit_b16_clip(torch.float32, dev), tokenizer=None, dense="clearclip")
    head = DualBranchHead(20, 512).to(dev)
    head.set_class_embeddings(torch.nn.functional.normalize(torch.randn(20, 512, device=dev), dim=-1))

    def datamodule():
        dm = VOC2007DataModule(
            root,
            val_size=0,
            eval_batch_size=args.batch,
            num_workers=args.workers,
            fast_decode=args.fast_decode,
        )
        dm.attach_encoder(encoder)
        dm.setup("test")
        return dm

    t = time.perf_counter()
    full_map = evaluate(datamodule(), encoder, head)
    full_s = time.perf_counter() - t
    dm = datamodule()
    t = time.perf_counter()
    status = dm.cache_image_features(encoder, ("test",), cache_dir=str(tmp / "cache"))
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    dm = datamodule()
    status.update(dm.cache_image_features(encoder, ("test",), cache_dir=str(tmp / "cache")))
    cached_map = evaluate(dm, encoder, head)
    cached_s = time.perf_counter() - t
    print(
        f"\n1. evaluation of {args.images} images ({args.device}, {torch.get_num_threads()} threads,"
        f" {args.workers} workers)"
    )
    print(f"   full image pass     {full_s:8.2f} s   mAP {full_map:.2f}")
    print(f"   cache build (once)  {build_s:8.2f} s")
    print(f"   from disk cache     {cached_s:8.2f} s   mAP {cached_map:.2f}   (status {status['test']})")
    print(f"   ratio full / cached {full_s / cached_s:8.1f}x   (target >= 20)")

    loader = datamodule()._pixel_loader(datamodule().test_records)
    t, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["index"])
    load_rate = n / (time.perf_counter() - t)
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    with torch.no_grad():
        encoder.encode_image(x)
        reps = max(1, 64 // args.batch)
        t = time.perf_counter()
        for _ in range(reps):
            encoder.encode_image(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    model_rate = reps * args.batch / (time.perf_counter() - t)
    print("\n2. throughput (images/s)")
    print(
        f"   loader alone        {load_rate:8.1f}"
        f"   (decode + resize + crop + normalise, {args.workers} workers)"
    )
    print(f"   image tower alone   {model_rate:8.1f}")
    print(f"   ratio loader/model  {load_rate / model_rate:8.1f}x   (target >= 2)")


if __name__ == "__main__":
    main()
