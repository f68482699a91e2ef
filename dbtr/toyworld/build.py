"""Write a toy-world dataset in the formats dbtr's real loaders read.

    python -m dbtr.toyworld.build --out .toyworld          # ~10 s on 2 cores

Layout (all written atomically):
    classes.txt            class names, one per line (label column order)
    synonyms.json          {class: [synonyms and plural forms]} (first synonym = prompt name)
    captions.jsonl         text-only training captions {"text", "labels"} (labels = classes the text mentions)
    captions.txt           the same captions, one per line (plain-text corpus)
    images/{val,test}/     PNG scenes
    val.jsonl, test.jsonl  {"file_name", "labels", "boxes": [{"label", "box": [x0, y0, x1, y1]}]}

Captions and images come from disjoint seeds, and neither overlaps the CLIP pretraining scenes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from dbtr.toyworld.world import CLASS_NAMES, CLASSES, caption_for, render, sample_scene
from dbtr.utils.io import atomic_directory, atomic_write_json, atomic_write_text

SPLIT_SEEDS = {"captions": 101, "val": 202, "test": 303}


def build_toyworld(
    root: str | os.PathLike,
    seed: int = 0,
    num_captions: int = 20000,
    num_val: int = 500,
    num_test: int = 2000,
    size: int = 64,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "classes.txt", "\n".join(CLASS_NAMES) + "\n")
    atomic_write_json(root / "synonyms.json", {c.name: [*c.synonyms, *c.plurals] for c in CLASSES})
    rng = np.random.default_rng([seed, SPLIT_SEEDS["captions"]])
    lines, plain = [], []
    for _ in range(num_captions):
        text, labels = caption_for(rng, sample_scene(rng, size), colour_p=0.5, drop_p=0.15)
        lines.append(json.dumps({"text": text, "labels": labels}) + "\n")
        plain.append(text + "\n")
    atomic_write_text(root / "captions.jsonl", "".join(lines))
    atomic_write_text(root / "captions.txt", "".join(plain))
    with atomic_directory(root / "images") as images:
        for split, count in (("val", num_val), ("test", num_test)):
            (images / split).mkdir()
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
            rows = []
            for i in range(count):
                scene = sample_scene(rng, size)
                name = f"{split}/{i:05d}.png"
                render(scene, size).save(images / name, compress_level=1)
                boxes = [
                    {"label": o.kind, "box": list(o.box)} for o in scene.objects if o.kind in CLASS_NAMES
                ]
                rows.append(json.dumps({"file_name": name, "labels": scene.labels, "boxes": boxes}) + "\n")
            atomic_write_text(root / f"{split}.jsonl", "".join(rows))
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("DBTR_TOYWORLD_DIR", ".toyworld"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    a = p.parse_args(argv)
    build_toyworld(a.out, a.seed, a.captions, a.val, a.test)
    print(f"toy world written to {a.out}")


if __name__ == "__main__":
    main()
