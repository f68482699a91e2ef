"""Pretrain the toy world's small CLIP from scratch (CLIP's symmetric contrastive loss) and save it.

    python -m dbtr.toyworld.pretrain --out dbtr/assets/toyclip     # = make toyclip; time in the README

The data side, like web data: 40 % whole scenes (captions name small objects only sometimes, as the world's
captions do) and 60 % close-ups of one object (its box times 1.2-4, rendered natively), captioned with what
the close-up shows. The close-ups are what make the dense (patch) features localise; the recipe was chosen on
the training-free realism signatures only (``dbtr.toyworld.signatures``), never on a trained method's score.
The pre-training scenes come from their own seed stream, disjoint from every world's captions and images.

Deterministic given --seed (data, tokenizer, initialisation, batch order). Plain fp32: bf16 autocast doubled
throughput on a CPU with avx512_bf16 (prototype) but is 16x slower on CPUs without it (measured here: 161 vs
10 pairs/s), and one code path keeps the result the same everywhere. The folder is written atomically: an
interrupted run leaves any previous model untouched.
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dbtr.text.templates import IMAGENET_TEMPLATES
from dbtr.toyworld.world import (
    BACKGROUNDS,
    CLASSES,
    DISTRACTORS,
    GENERATOR_VERSION,
    Scene,
    caption_for,
    closeup_view,
    render_array,
    sample_scene,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "toyclip"
MODEL_SIZE = dict(
    text_hidden_size=128,
    text_intermediate_size=512,
    text_num_hidden_layers=4,
    text_num_attention_heads=4,
    text_max_position_embeddings=32,
    vision_image_size=64,
    vision_patch_size=8,
    vision_hidden_size=128,
    vision_intermediate_size=512,
    vision_num_hidden_layers=4,
    vision_num_attention_heads=4,
    projection_dim=128,
)


View = tuple[float, float, float] | None


def _render_chunk(args: tuple[int, int, float, tuple]) -> tuple[list[tuple[Scene, View]], np.ndarray]:
    seed, count, closeup_p, zoom = args
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        scene = sample_scene(rng)
        items.append((scene, closeup_view(rng, scene, zoom) if rng.random() < closeup_p else None))
    return items, np.stack([render_array(s, 64, v) for s, v in items])


def make_scenes(
    seed: int, count: int, closeup_p: float = 0.6, workers: int = 2, zoom: tuple = (1.2, 4.0)
) -> tuple[list[tuple[Scene, View]], np.ndarray]:
    """(scene, view) pairs and their uint8 images (N, 64, 64, 3): a ``closeup_p`` share are close-ups of one
    object (``view``), the rest whole scenes (``None``); chunked by seed so the result is independent of
    ``workers``."""
    chunk = 2000
    jobs = [
        (seed * 1_000_003 + i, min(chunk, count - i * chunk), closeup_p, tuple(zoom))
        for i in range(math.ceil(count / chunk))
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    return [s for p in parts for s in p[0]], np.concatenate([p[1] for p in parts])


def tokenizer_corpus(rng: np.random.Generator, items: list[tuple[Scene, View]]) -> list[str]:
    texts = [caption_for(rng, s, colour_p=0.7, view=v)[0] for s, v in items[:20000]]
    names = [w for c in CLASSES for w in (*c.synonyms, *c.plurals, c.colour)] + [
        w for d in DISTRACTORS for w in (d[0], d[1], d[4])
    ]
    texts += [t.format(n) for n in names for t in IMAGENET_TEMPLATES] + list(BACKGROUNDS)
    return texts


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (the toy CLIP's mean/std are 0.5/0.5)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def pretrain(
    out: Path,
    seed: int = 0,
    num_images: int = 100000,
    steps: int = 1200,
    batch_size: int = 256,
    lr: float = 1e-3,
    warmup: int = 50,
    closeup_p: float = 0.6,
    zoom: tuple[float, float] = (1.2, 4.0),
    workers: int = 2,
    log_every: int = 50,
    snapshot_every: int = 0,
) -> dict:
    from transformers import CLIPModel

    from dbtr.models.tiny import tiny_clip_config, train_bpe_tokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    scenes, images = make_scenes(seed, num_images, closeup_p, workers, zoom)
    t_data = time.perf_counter() - t0
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(rng, scenes), vocab_size=1000)
    config = tiny_clip_config(len(tokenizer), **MODEL_SIZE)
    model = CLIPModel(config)
    # sdpa: 16% faster than eager per step on this CPU (measured), same loss
    model.config._attn_implementation = "sdpa"
    for sub in (model.text_model.config, model.vision_model.config):
        sub._attn_implementation = "sdpa"
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    history = []
    t1 = time.perf_counter()
    for step in range(steps):
        idx = rng.integers(0, num_images, size=batch_size)
        caps = [caption_for(rng, scenes[i][0], colour_p=0.7, view=scenes[i][1])[0] for i in idx]
        tok = tokenizer(caps, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        batch = images[idx]
        flip = rng.random(batch_size) < 0.5
        batch[flip] = batch[flip, :, ::-1]
        outputs = model(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            pixel_values=to_pixels(batch),
            return_loss=True,
        )
        loss = outputs.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps - 1:
            history.append((step, round(loss.item(), 4)))
            rate = (step + 1) * batch_size / (time.perf_counter() - t1)
            print(
                f"step {step:5d}  loss {float(loss):.3f}  scale {model.logit_scale.exp():.1f}"
                f"  {rate:.0f} pairs/s",
                flush=True,
            )
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            # an intermediate model beside ``out`` (to follow the realism signatures while it trains)
            save_model(out.with_name(f"{out.name}_step{step + 1}"), model, tokenizer, {"steps": step + 1})
    t_train = time.perf_counter() - t1
    model.eval()
    stats = {
        "seed": seed,
        "num_images": num_images,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "closeup_p": closeup_p,
        "zoom": list(zoom),
        "model": MODEL_SIZE,
        "world_generator": GENERATOR_VERSION,
        "data_s": round(t_data, 1),
        "train_s": round(t_train, 1),
        "loss_history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_model(out, model, tokenizer, stats)
    return stats


def save_model(out: Path, model, tokenizer, stats: dict) -> None:
    """Write the folder atomically: an interrupted save leaves any previous model untouched."""
    import copy

    from dbtr.utils.io import atomic_directory, atomic_write_json

    with atomic_directory(out) as tmp:
        # fp16 on disk halves the shipped size; dbtr loads it as float32. A copy: training may go on.
        copy.deepcopy(model).half().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain_stats.json", stats)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=100000)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--closeup-p", type=float, default=0.6, help="share of close-up crops of one object")
    p.add_argument("--zoom", type=float, nargs=2, default=(1.2, 4.0), help="close-up side / object box side")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--snapshot-every", type=int, default=0, help="also save <out>_step<N> every N steps")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stats = pretrain(
        a.out,
        a.seed,
        a.num_images,
        a.steps,
        a.batch_size,
        a.lr,
        closeup_p=a.closeup_p,
        zoom=tuple(a.zoom),
        workers=a.workers,
        snapshot_every=a.snapshot_every,
    )
    print(
        f"saved {a.out} ({stats['parameters']:,} parameters; data {stats['data_s']} s,"
        f" training {stats['train_s']} s)"
    )


if __name__ == "__main__":
    main()
