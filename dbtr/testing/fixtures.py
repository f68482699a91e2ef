"""A tiny self-contained dataset with a RANDOM-weight CLIP: the fast fixture of the tests.

    python -m dbtr.testing.fixtures --out /tmp/tiny
    dbtr-train experiment=tiny_full paths.tiny_dir=/tmp/tiny

Its numbers are at chance level by construction; it exercises every code path (loading by path, caching,
training, selection, test, checkpoints) on real file formats in seconds. The toy world is the demo that
shows the method working.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dbtr.text.templates import IMAGENET_TEMPLATES
from dbtr.utils.io import atomic_directory, atomic_write_text

TINY_CLASSES = ("red", "green", "blue", "yellow", "purple", "orange")
_RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
_SHAPES = ("square", "ball", "block", "box")


def _caption(rng: np.random.Generator, present: list[str]) -> str:
    parts = [f"a {c} {rng.choice(_SHAPES)}" for c in present]
    return f"{rng.choice(['a photo of', 'there is', 'an image with'])} {' and '.join(parts)}."


def _image(rng: np.random.Generator, present: list[str], size: int) -> Image.Image:
    canvas = np.full((size, size, 3), rng.integers(90, 160), dtype=np.uint8)
    for cls in present:
        side = int(rng.integers(size // 5, size // 3))
        y, x = rng.integers(0, size - side, size=2)
        canvas[y : y + side, x : x + side] = _RGB[cls]
    return Image.fromarray(canvas)


def make_tiny_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    num_captions: int = 256,
    num_val: int = 48,
    num_test: int = 64,
    image_size: int = 32,
    clip: bool = True,
    siglip: bool = False,
) -> Path:
    """Write ``classes.txt``, ``captions.jsonl``, ``images/``, ``val.jsonl``, ``test.jsonl`` and ``clip/``
    under ``root`` (and with ``siglip`` a random SigLIP in ``siglip/``, for ``clip=tiny_siglip``)."""
    from dbtr.models.tiny import save_random_clip, save_random_siglip

    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = list(TINY_CLASSES)

    def draw() -> list[str]:
        k = int(rng.integers(1, 4))
        return sorted(rng.choice(classes, size=k, replace=False).tolist(), key=classes.index)

    captions = []
    for _ in range(num_captions):
        present = draw()
        captions.append({"text": _caption(rng, present), "labels": present})
    root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(root / "images") as img_dir:
        splits = {"val": [], "test": []}
        for split, count in (("val", num_val), ("test", num_test)):
            for i in range(count):
                present = draw()
                name = f"{split}_{i:04d}.png"
                _image(rng, present, image_size).save(img_dir / name)
                splits[split].append({"file_name": name, "labels": present})
    atomic_write_text(root / "classes.txt", "\n".join(classes) + "\n")
    atomic_write_text(root / "captions.jsonl", "".join(json.dumps(c) + "\n" for c in captions))
    for split, rows in splits.items():
        atomic_write_text(root / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    corpus = [c["text"] for c in captions] + [t.format(c) for c in classes for t in IMAGENET_TEMPLATES]
    if clip:
        save_random_clip(root / "clip", corpus, seed=seed, vocab_size=600, vision_image_size=image_size)
    if siglip:
        save_random_siglip(root / "siglip", corpus, seed=seed, vocab_size=600, vision_image_size=image_size)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--siglip", action="store_true", help="also a random SigLIP (clip=tiny_siglip)")
    args = parser.parse_args(argv)
    path = make_tiny_dataset(args.out, seed=args.seed, siglip=args.siglip)
    print(f"tiny dataset and random-weight CLIP{' and SigLIP' if args.siglip else ''} written to {path}")


if __name__ == "__main__":
    main()
