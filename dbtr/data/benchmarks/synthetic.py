"""Tiny datasets written in each benchmark's exact native layout (VOC XML, COCO instances JSON, NUS-WIDE
release files with Windows paths and CRLF line ends), for tests and benchmarks. Images are random pixels:
these check readers, protocols and speed, never accuracy."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dbtr.data.benchmarks.voc import VOC_CLASSES


def random_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    low = rng.integers(
        0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8
    )  # smooth-ish, like a photo, compresses
    Image.fromarray(low).resize((w, h), Image.BILINEAR).save(path, quality=90)


def voc_xml(objects: Sequence[tuple[str, int]]) -> str:
    body = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        for n, d in objects
    )
    return (
        "<annotation><folder>VOC2007</folder><size><width>40</width><height>30</height><depth>3</depth></size>"
        f"{body}</annotation>\n"
    )


def write_voc2007(
    root: str | os.PathLike,
    split_ids: dict[str, list[str]],
    objects: dict[str, list[tuple[str, int]]],
    seed: int = 0,
    image_size: tuple[int, int] = (40, 30),
) -> Path:
    """``<root>/VOCdevkit/VOC2007`` with the given ids per split and (class, difficult) objects per image
    id."""
    base = Path(root) / "VOCdevkit" / "VOC2007"
    rng = np.random.default_rng(seed)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    for split, ids in split_ids.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for image_id, objs in objects.items():
        (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objs))
        random_jpeg(base / "JPEGImages" / f"{image_id}.jpg", rng, image_size)
    return base


def random_voc2007(
    root: str | os.PathLike,
    num_trainval: int,
    num_test: int,
    seed: int = 0,
    image_size: tuple[int, int] = (40, 30),
) -> Path:
    rng = np.random.default_rng(seed)
    ids = [f"{i:06d}" for i in range(1, num_trainval + num_test + 1)]
    objects = {}
    for i in ids:
        k = int(rng.integers(1, 4))
        objects[i] = [(VOC_CLASSES[int(c)], int(rng.random() < 0.15)) for c in rng.integers(0, 20, k)]
    return write_voc2007(
        root, {"trainval": ids[:num_trainval], "test": ids[num_trainval:]}, objects, seed, image_size
    )


def write_coco2014(
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str],
    images: list[list[int]],
    crowd: Sequence[int] = (),
    seed: int = 0,
    missing: Sequence[int] = (),
) -> Path:
    """``<root>/annotations/instances_<split>.json`` + ``<root>/<split>/``; ``images[i]`` = class indices of
    image i.

    Category ids are COCO-like (gapped) and the categories are written in shuffled order, as the reader must
    sort them by id; ``crowd`` image indices get their first annotation marked iscrowd; ``missing`` images get
    no file.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = [k + 1 + k // 10 for k in range(len(class_names))]  # gaps, like COCO's 1..90
    cats = [{"id": cid, "name": n, "supercategory": "x"} for cid, n in zip(ids, class_names)]
    cats = [cats[i] for i in rng.permutation(len(cats))]
    imgs, anns = [], []
    for i, classes in enumerate(images):
        name = f"COCO_{split}_{i + 1:012d}.jpg"
        imgs.append({"id": 1000 + i, "file_name": name, "width": 40, "height": 30})
        if i not in missing:
            random_jpeg(root / split / name, rng)
        for j, c in enumerate(classes):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 1000 + i,
                    "category_id": ids[c],
                    "bbox": [0, 0, 5, 5],
                    "area": 25.0,
                    "iscrowd": int(i in crowd and j == 0),
                }
            )
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "categories": cats})
    )
    return root


def write_nuswide(
    root: str | os.PathLike,
    concepts: Sequence[str],
    tags: Sequence[str],
    splits: dict[str, list[tuple[str, list[int], list[int]]]],
    missing: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """The NUS-WIDE release files under ``root`` and images under ``root/Flickr``.

    ``splits[name]`` lists ``(relative path with "/", concept indices, tag indices)``. Lists use Windows paths
    and CRLF, as the release does; ``Imagelist.txt`` carries the ``C:\\ImageData\\Flickr\\`` prefix.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    crlf = lambda lines: "".join(f"{x}\r\n" for x in lines)  # noqa: E731
    (root / "ImageList").mkdir(parents=True, exist_ok=True)
    (root / "TrainTestLabels").mkdir(parents=True, exist_ok=True)
    (root / "NUS_WID_Tags").mkdir(parents=True, exist_ok=True)
    (root / "Concepts81.txt").write_text(crlf(concepts), newline="")
    (root / "NUS_WID_Tags" / "TagList1k.txt").write_text(crlf(tags), newline="")
    everything, tag_rows = [], []
    for split, items in splits.items():
        win = [p.replace("/", "\\") for p, _, _ in items]
        (root / "ImageList" / f"{split}Imagelist.txt").write_text(crlf(win), newline="")
        for k, concept in enumerate(concepts):
            col = ["1" if k in c else "0" for _, c, _ in items]
            (root / "TrainTestLabels" / f"Labels_{concept}_{split}.txt").write_text(crlf(col), newline="")
        for (path, _, t), w in zip(items, win):
            everything.append("C:\\ImageData\\Flickr\\" + w)
            row = np.zeros(len(tags), dtype=int)
            row[list(t)] = 1
            tag_rows.append("\t".join(map(str, row)))
            if path not in missing:
                random_jpeg(root / "Flickr" / path, rng)
    (root / "ImageList" / "Imagelist.txt").write_text(crlf(everything), newline="")
    (root / "NUS_WID_Tags" / "AllTags1k.txt").write_text(crlf(tag_rows), newline="")
    return root


def random_coco2014(root: str | os.PathLike, num_train: int, num_val: int, seed: int = 0) -> Path:
    from dbtr.text.synonyms import builtin_vocabulary

    names = builtin_vocabulary("coco2014").class_names
    rng = np.random.default_rng(seed)
    for split, n in (("train2014", num_train), ("val2014", num_val)):
        images = [list(rng.choice(80, int(rng.integers(1, 4)), replace=False)) for _ in range(n)]
        write_coco2014(root, split, names, images, seed=seed)
    return Path(root)


def random_nuswide(root: str | os.PathLike, num_train: int, num_test: int, seed: int = 0) -> Path:
    from dbtr.data.benchmarks.protocol import SPLIT_DIR
    from dbtr.text.synonyms import builtin_vocabulary

    concepts = builtin_vocabulary("nuswide").class_names
    tags = json.loads((SPLIT_DIR / "nuswide_925_81.json").read_text())["tag_list_1k"]
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("Train", num_train), ("Test", num_test)):
        splits[split] = [
            (
                f"{concepts[i % 81]}/{split}_{i:04d}.jpg",
                list(rng.choice(81, int(rng.integers(1, 4)), replace=False)),
                list(rng.choice(1000, int(rng.integers(2, 8)), replace=False)),
            )
            for i in range(n)
        ]
    return write_nuswide(root, concepts, tags, splits, seed=seed)
