"""Full-model inference vs plain CLIP zero-shot on the same batch (ViT-B/16-sized, batch 32 at 224 px).

    python benchmarks/bench_inference.py [--device cuda --dtype bfloat16] [--dense clearclip] [--repeats 3]

Full = global + dense features in one pass, both branches, parameter-free attention in both.
Plain = ``CLIPModel.get_image_features`` + cosine with the class embeddings. Target ratio: <= 1.15.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timeit, vit_b16_clip  # noqa: E402

from dbtr.models.clip import ClipEncoder  # noqa: E402
from dbtr.models.heads import DualBranchHead  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--dense", default="clearclip")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    model = vit_b16_clip(dtype, dev)
    encoder = ClipEncoder(model, tokenizer=None, dense=args.dense)
    head = DualBranchHead(args.classes, 512, pfa="both").to(dev)
    t0 = F.normalize(torch.randn(args.classes, 512, device=dev), dim=-1)
    head.set_class_embeddings(t0)
    px = torch.randn(args.batch, 3, 224, 224, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def plain():
        img = model.get_image_features(pixel_values=px).pooler_output
        return 100.0 * F.normalize(img.float(), dim=-1) @ t0.t()

    @torch.inference_mode()
    def full():
        out = encoder.encode_image(px)
        return head(out.image_embeds, out.patch_embeds, None, modality="image").logits

    t_plain = timeit(plain, args.repeats, sync=sync)
    t_full = timeit(full, args.repeats, sync=sync)
    ratio = t_full / t_plain
    print(
        f"device={dev} dtype={args.dtype} batch={args.batch} classes={args.classes} dense={args.dense}"
        f" threads={torch.get_num_threads()}"
    )
    print(f"plain CLIP zero-shot : {t_plain * 1000:8.1f} ms/batch")
    print(f"full dbtr model      : {t_full * 1000:8.1f} ms/batch")
    print(f"ratio full/plain     : {ratio:.3f}  (target <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'})")


if __name__ == "__main__":
    main()
