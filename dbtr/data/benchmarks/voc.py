"""PASCAL VOC2007 from ``VOCdevkit/VOC2007`` exactly as it unpacks.

Labels per image and class, derived from ``Annotations/<id>.xml`` the way the devkit's ``<cls>_<split>.txt``
files are: 1 if the image has a non-difficult object of the class, 0 if its only objects of the class are
difficult, -1 otherwise. How label 0 is scored is the evaluation's ``difficult`` option (TaI-DPT: negative).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from dbtr.data.images import ImageRecords
from dbtr.utils.errors import ConfigError
from dbtr.utils.files import DataFormatError, read_text

# The devkit's class order (VOCcode/VOCinit.m), which is the label-column order everywhere.
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "test")
LAYOUT = """expected layout:
  <root>/ImageSets/Main/<split>.txt   one image id per line
  <root>/Annotations/<id>.xml         objects with <name> and <difficult>
  <root>/JPEGImages/<id>.jpg
(<root> is VOCdevkit/VOC2007; the VOCdevkit folder or its parent are accepted too)"""


def find_voc_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    for cand in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (cand / "ImageSets" / "Main").is_dir() and (cand / "Annotations").is_dir():
            return cand
    raise FileNotFoundError(f"no VOC2007 dataset under {root}\n{LAYOUT}")


def parse_voc_xml(
    path: Path, class_index: dict[str, int], row: np.ndarray, areas: np.ndarray | None = None
) -> np.ndarray:
    """Fill ``row`` (all -1) from one annotation file, and ``areas`` (all NaN) with each class's largest
    non-difficult box area (px^2, the devkit's inclusive pixel boxes); unknown class names and bad XML name
    the file."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise DataFormatError(f"{path}:{err.position[0]}: malformed XML ({err})") from None
    for i, obj in enumerate(tree.getroot().iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise DataFormatError(f"{path}: object {i} has class {name!r}, not one of the 20 VOC classes")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        k = class_index[name]
        if not difficult:
            row[k] = 1
            if areas is not None:
                areas[k] = np.fmax(areas[k], _box_area(obj, path, i))
        elif row[k] == -1:
            row[k] = 0
    return row


def _box_area(obj: ET.Element, path: Path, i: int) -> float:
    try:
        x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError):
        raise DataFormatError(f"{path}: object {i} has no numeric bndbox xmin/ymin/xmax/ymax") from None
    return (x1 - x0 + 1) * (y1 - y0 + 1)


def read_voc2007(root: str | os.PathLike, split: str = "test") -> ImageRecords:
    root = find_voc_root(root)
    if split not in VOC_SPLITS:
        raise ConfigError(f"VOC2007 split must be one of {VOC_SPLITS}, got {split!r}")
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(
            f"{list_file} not found (is the {split!r} part of VOC2007 unpacked here?)\n{LAYOUT}"
        )
    index = {n: i for i, n in enumerate(VOC_CLASSES)}
    ids, rows, areas, seen = [], [], [], {}
    for lineno, line in enumerate(read_text(list_file).splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in seen:
            raise DataFormatError(f"{list_file}:{lineno}: image id {image_id} repeats line {seen[image_id]}")
        seen[image_id] = lineno
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{list_file}:{lineno}: annotation {xml} not found\n{LAYOUT}")
        areas.append(np.full(len(VOC_CLASSES), np.nan, np.float32))
        rows.append(parse_voc_xml(xml, index, np.full(len(VOC_CLASSES), -1, np.int8), areas[-1]))
        ids.append(image_id)
    if not ids:
        raise DataFormatError(f"{list_file}: no image ids")
    return ImageRecords(
        root, [f"JPEGImages/{i}.jpg" for i in ids], np.stack(rows), list(VOC_CLASSES), areas=np.stack(areas)
    )
