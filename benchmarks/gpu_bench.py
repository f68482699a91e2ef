"""Accelerator speed check (the Python part of benchmarks/gpu.sh), written to one JSON file.

    python benchmarks/gpu_bench.py --device cuda --dtype bfloat16 --out gpu_bench.json   # the real check
    python benchmarks/gpu_bench.py --tiny --out /tmp/x.json                              # toy sizes, any CPU

ViT-B/16-shaped random CLIP (bf16 on the GPU; the head stays fp32):
1. image throughput of the full model (global + dense features in one pass, both branches, PFA in both)
against
   plain ``get_image_features`` + cosine, batch 256;
2. caption-encoding throughput of the frozen text tower (the one-off feature caching), batch 256, 77 tokens;
3. the wall time of a 20-epoch full-method (conf/model/dbtr.yaml) run on 118,287 COCO-scale cached captions,
   batch 512, with the features on the device when they fit (else host memory, as training does). If the run
   would overrun ``--budget-s`` it stops early and projects the rest from the measured epochs (``projected``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coco_scale import loader  # noqa: E402
from common import (  # noqa: E402
    COCO_CAPTIONS,
    build_model,
    coco_class_names,
    random_text_encoder,
    synthetic_caption_cache,
    synthetic_captions,
    timeit,
    train_step,
)

from dbtr.models.heads import DualBranchHead  # noqa: E402


def image_throughput(encoder, classes: int, batch: int, repeats: int, sync) -> dict:
    dev, model = encoder.device, encoder.model
    head = DualBranchHead(classes, encoder.embed_dim, pfa="both").to(dev)
    t0 = F.normalize(torch.randn(classes, encoder.embed_dim, device=dev), dim=-1)
    head.set_class_embeddings(t0)
    px = torch.randn(batch, 3, encoder.image_size, encoder.image_size, device=dev, dtype=model.dtype)

    @torch.inference_mode()
    def plain():
        img = model.get_image_features(pixel_values=px)
        img = getattr(img, "pooler_output", img)
        return F.normalize(img.float(), dim=-1) @ t0.t()

    @torch.inference_mode()
    def full():
        out = encoder.encode_image(px)
        return head(out.image_embeds, out.patch_embeds, None, modality="image").logits

    t_plain, t_full = timeit(plain, repeats, warmup=2, sync=sync), timeit(full, repeats, warmup=2, sync=sync)
    return {
        "batch": batch,
        "plain_images_per_s": batch / t_plain,
        "full_images_per_s": batch / t_full,
        "full_over_plain_time": t_full / t_plain,
    }


def caption_throughput(encoder, class_names, batch: int, repeats: int, sync) -> dict:
    texts = synthetic_captions(class_names, batch)
    tokens = {k: v.to(encoder.device) for k, v in encoder.tokenize(texts).items()}

    @torch.inference_mode()
    def encode():
        return encoder.encode_text(**tokens)

    return {
        "batch": batch,
        "tokens": int(tokens["input_ids"].shape[1]),
        "captions_per_s": batch / timeit(encode, repeats, warmup=2, sync=sync),
    }


def training_run(
    encoder, class_names, captions: int, batch: int, epochs: int, budget_s: float, sync, tmp
) -> dict:
    records, feats = synthetic_caption_cache(tmp, captions, dim=encoder.embed_dim, classes=len(class_names))
    model, optimizer = build_model("dbtr", encoder, class_names)
    model.train()
    train = loader(records, feats, class_names, batch, encoder.device)
    tokens = train.dataset.features.token_embeds
    on_device = isinstance(tokens, torch.Tensor) and tokens.device == encoder.device
    sync()
    start, done, epoch_times = time.perf_counter(), 0, []
    for epoch in range(epochs):
        t = time.perf_counter()
        train.sampler.set_epoch(epoch)
        for b in train:
            train_step(model, optimizer, {k: v.to(encoder.device, non_blocking=True) for k, v in b.items()})
        sync()
        epoch_times.append(time.perf_counter() - t)
        done += 1
        if time.perf_counter() - start + epoch_times[-1] > budget_s:
            break
    wall = time.perf_counter() - start
    return {
        "captions": captions,
        "batch": batch,
        "steps_per_epoch": len(train),
        "epochs": epochs,
        "epochs_run": done,
        "features_on_device": bool(on_device),
        "epoch_s": epoch_times,
        "wall_s": wall,
        "projected": done < epochs,
        "run_s": wall if done == epochs else wall + (epochs - done) * min(epoch_times),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument(
        "--tiny", action="store_true", help="toy model and data sizes: checks the script runs, on a CPU"
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-time cap of the training run")
    p.add_argument("--out", default="gpu_bench.json")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tiny = args.tiny
    class_names = coco_class_names()[: 8 if tiny else 80]
    encoder = random_text_encoder(class_names, device=dev, dtype=getattr(torch, args.dtype), tiny=tiny)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "tiny": tiny,
        "torch": torch.__version__,
    }
    started = time.perf_counter()
    result["images"] = image_throughput(
        encoder, len(class_names), 8 if tiny else 256, 2 if tiny else 10, sync
    )
    result["captions"] = caption_throughput(encoder, class_names, 8 if tiny else 256, 2 if tiny else 10, sync)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dbtr-gpu-bench-") as tmp:
        result["training"] = training_run(
            encoder,
            class_names,
            200 if tiny else COCO_CAPTIONS,
            16 if tiny else 512,
            2 if tiny else args.epochs,
            args.budget_s,
            sync,
            tmp,
        )
    if dev.type == "cuda":
        result["peak_device_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    result["total_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
