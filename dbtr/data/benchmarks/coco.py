"""MS-COCO 2014 from ``annotations/instances_{train,val}2014.json`` and the ``{train,val}2014/`` image
folders.

Classes are the 80 categories in category-id order (the json's order after sorting by id). An image is
positive for every category it has an annotation of (crowd annotations included, as ``COCO.getAnnIds`` does).
Images without annotations: TaI-DPT evaluates all 40,504 val images (``include_unlabeled: true``);
DualCoOp/ASL use the 40,137 with at least one label (``false``). State which.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dbtr.data.images import ImageRecords
from dbtr.utils.errors import ConfigError
from dbtr.utils.files import DataFormatError, load_json

COCO_SPLITS = ("train2014", "val2014")
LAYOUT = """expected layout:
  <root>/annotations/instances_train2014.json, instances_val2014.json
  <root>/train2014/COCO_train2014_<id>.jpg, <root>/val2014/COCO_val2014_<id>.jpg"""


def _field(obj: dict, key: str, kind: type, where: str):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataFormatError(f"{where}: expected field {key!r} of type {kind.__name__}, got {value!r}")
    return value


def read_coco2014(
    root: str | os.PathLike, split: str = "val2014", include_unlabeled: bool = True
) -> ImageRecords:
    root = Path(root)
    if split not in COCO_SPLITS:
        raise ConfigError(f"COCO 2014 split must be one of {COCO_SPLITS}, got {split!r}")
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found\n{LAYOUT}")
    data = load_json(path, "COCO instances annotations")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DataFormatError(f"{path}: not a COCO instances file (no {key!r} list)")
    cats = sorted(data["categories"], key=lambda c: _field(c, "id", int, f"{path}: categories"))
    class_names = [_field(c, "name", str, f"{path}: category {c['id']}") for c in cats]
    cat_col = {c["id"]: k for k, c in enumerate(cats)}
    if len(cat_col) != len(cats):
        raise DataFormatError(f"{path}: repeated category ids")

    image_row, file_names = {}, []
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        image_id = _field(img, "id", int, where)
        if image_id in image_row:
            raise DataFormatError(f"{where}: image id {image_id} is listed twice")
        image_row[image_id] = len(file_names)
        file_names.append(f"{split}/{_field(img, 'file_name', str, where)}")
    labels = np.full((len(file_names), len(class_names)), -1, np.int8)
    # COCO's own size measure: the instance's segment ``area`` (what COCOeval's 32^2 / 96^2 ranges use)
    areas = np.full(labels.shape, np.nan, np.float32)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id, cat_id = _field(ann, "image_id", int, where), _field(ann, "category_id", int, where)
        if image_id not in image_row:
            raise DataFormatError(f"{where}: image_id {image_id} is not in the file's images list")
        if cat_id not in cat_col:
            raise DataFormatError(f"{where}: category_id {cat_id} is not one of the file's categories")
        r, k = image_row[image_id], cat_col[cat_id]
        labels[r, k] = 1
        area = ann.get("area")
        if isinstance(area, (int, float)) and not isinstance(area, bool) and not ann.get("iscrowd", 0):
            areas[r, k] = np.fmax(areas[r, k], float(area))
    keep = np.arange(len(file_names)) if include_unlabeled else np.flatnonzero((labels == 1).any(1))
    return ImageRecords(root, [file_names[i] for i in keep], labels[keep], class_names, areas=areas[keep])
