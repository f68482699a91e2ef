"""Write a toy-world dataset in the formats dbtr's real loaders read.

    python -m dbtr.toyworld.build --out .toyworld --seed 0     # ~15 s on 2 cores

Layout (all written atomically):
    world.json             the generator version and the spec (seed, counts): written last, removed first
    classes.txt            class names, one per line (label column order)
    synonyms.json          {class: [synonyms and plural forms]} (first synonym = prompt name)
    captions.jsonl         text-only training captions {"text", "labels"} (labels = classes the text mentions)
    captions.txt           the same captions, one per line (plain-text corpus)
    images/{val,test}/     PNG scenes
    val.jsonl, test.jsonl  {"file_name", "labels", "boxes": [{"label", "box": [x0, y0, x1, y1]}]}

``seed`` is the world seed: another seed gives other scenes and captions from the same distribution (the
shipped CLIP stays). Captions and images come from disjoint seed streams, and neither overlaps the CLIP's
pre-training scenes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from dbtr.toyworld.world import (
    CANVAS,
    CLASS_NAMES,
    CLASSES,
    GENERATOR_VERSION,
    caption_for,
    render,
    sample_scene,
)
from dbtr.utils.io import atomic_directory, atomic_write_json, atomic_write_text

SPLIT_SEEDS = {"captions": 101, "val": 202, "test": 303}
MARKER = "world.json"


def world_spec(seed: int, num_captions: int, num_val: int, num_test: int) -> dict:
    return {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "num_captions": num_captions,
        "num_val": num_val,
        "num_test": num_test,
    }


def read_spec(root: str | os.PathLike) -> dict | None:
    """The spec a complete build wrote, or None (no build, or an interrupted one)."""
    marker = Path(root) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def build_toyworld(
    root: str | os.PathLike,
    seed: int = 0,
    num_captions: int = 20000,
    num_val: int = 500,
    num_test: int = 2000,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # The marker goes first: a build interrupted from here on leaves a folder that no reader takes for a
    # complete world (it is rebuilt), never old images beside new captions under the old spec.
    (root / MARKER).unlink(missing_ok=True)
    atomic_write_text(root / "classes.txt", "\n".join(CLASS_NAMES) + "\n")
    atomic_write_json(root / "synonyms.json", {c.name: [*c.synonyms, *c.plurals] for c in CLASSES})
    rng = np.random.default_rng([seed, SPLIT_SEEDS["captions"]])
    lines, plain = [], []
    for _ in range(num_captions):
        text, labels = caption_for(rng, sample_scene(rng), colour_p=0.5)
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
                scene = sample_scene(rng)
                name = f"{split}/{i:05d}.png"
                render(scene, CANVAS).save(images / name, compress_level=1)
                boxes = [
                    {"label": o.kind, "box": list(o.box)} for o in scene.objects if o.kind in CLASS_NAMES
                ]
                rows.append(json.dumps({"file_name": name, "labels": scene.labels, "boxes": boxes}) + "\n")
            atomic_write_text(root / f"{split}.jsonl", "".join(rows))
    atomic_write_json(root / MARKER, world_spec(seed, num_captions, num_val, num_test))
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("DBTR_TOYWORLD_DIR", ".toyworld"))
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    a = p.parse_args(argv)
    build_toyworld(a.out, a.seed, a.captions, a.val, a.test)
    print(f"toy world written to {a.out}")


if __name__ == "__main__":
    main()
