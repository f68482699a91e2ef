"""mAP by object size: hand-computed values, and the areas the readers take from boxes (jsonl, VOC, COCO)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dbtr.data.benchmarks import synthetic
from dbtr.data.benchmarks.coco import read_coco2014
from dbtr.data.benchmarks.voc import read_voc2007
from dbtr.data.images import read_image_jsonl
from dbtr.evaluation import summarise
from dbtr.metrics import map_by_size, size_buckets
from dbtr.utils.files import DataFormatError

NAN = float("nan")
# class 0: a small (img 0), a medium (img 1) and a large (img 2) positive; class 1: a large and a small one
SCORES = np.array([[0.9, 0.1], [0.2, 0.7], [0.5, 0.2], [0.8, 0.3], [0.3, 0.9], [0.1, 0.4]])
LABELS = np.array([[1, 0], [1, 1], [1, 0], [0, 1], [0, 0], [0, 0]])
AREAS = np.array([[10, NAN], [500, 2000], [5000, NAN], [NAN, 50], [NAN, NAN], [NAN, NAN]])


def test_by_size_matches_hand_computed_values():
    # class 0 small: .9 (pos) over negatives .8 .3 .1 -> AP 1; medium: .2 below .8 .3 -> 1/3; large: .5 below
    # .8 -> 1/2. Class 1 small: .3 below .9 .4 -> 1/3; no medium; large: .7 below .9 -> 1/2.
    got = map_by_size(SCORES, LABELS, AREAS, thresholds=(100, 1000))
    want = {"mAP_small": 100 * (1 + 1 / 3) / 2, "mAP_medium": 100 / 3, "mAP_large": 50.0}
    assert got == pytest.approx(want)


def test_difficult_entries_follow_the_evaluation_convention():
    labels = np.where(LABELS == 1, 1, -1)
    labels[5, 0] = 0  # a difficult class-0 image scored above everything
    scores = SCORES.copy()
    scores[5, 0] = 0.95
    negative = map_by_size(scores, labels, AREAS, (100, 1000), difficult="negative")
    # as a negative it outranks each class-0 positive: small 1/2, medium 1/4, large 1/3
    assert negative["mAP_small"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert negative["mAP_medium"] == pytest.approx(25.0)
    assert negative["mAP_large"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert map_by_size(scores, labels, AREAS, (100, 1000), difficult="ignore") == pytest.approx(
        map_by_size(SCORES, LABELS, AREAS, (100, 1000))
    )


def test_buckets_are_half_open_and_a_bucket_without_positives_is_nan():
    assert size_buckets(np.array([[99.9, 100.0, 999.0, 1000.0, NAN]]), (100, 1000)).tolist() == [
        [0, 1, 1, 2, -1]
    ]
    got = map_by_size(SCORES, LABELS, np.where(np.isnan(AREAS), NAN, 1.0), (100, 1000))
    assert np.isnan(got["mAP_medium"]) and np.isnan(got["mAP_large"]) and got["mAP_small"] > 0
    with pytest.raises(ValueError, match="thresholds"):
        size_buckets(AREAS, (1000, 100))


def test_summarise_reports_per_size_map_per_branch_on_the_test_split_only():
    s, y = torch.tensor(SCORES, dtype=torch.float32), torch.tensor(LABELS, dtype=torch.int8)
    collected = {"merged": (s, y), "local": (s.flip(0), y)}
    cfg = {"difficult": "negative", "top_k": [1], "f1_at": [], "val_subset": None}
    test, _ = summarise(collected, "test", cfg, ["a", "b"], object_areas=(AREAS, (100, 1000)))
    want = map_by_size(SCORES, LABELS, AREAS, (100, 1000))
    assert {k: test[f"test/{k}"] for k in want} == pytest.approx(want)
    assert test["test/mAP_small_local"] == pytest.approx(
        map_by_size(SCORES[::-1], LABELS, AREAS, (100, 1000))["mAP_small"]
    )
    val, _ = summarise(collected, "val", cfg, ["a", "b"], object_areas=(AREAS, (100, 1000)))
    assert not [k for k in val if "mAP_small" in k]


def test_jsonl_boxes_give_each_class_its_largest_instance(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("a.png", "b.png"):
        (tmp_path / "img" / n).write_bytes(b"x")
    lines = [
        {"file_name": "a.png", "labels": ["cat", "dog"], "boxes": [
            {"label": "cat", "box": [0, 0, 4, 4]}, {"label": "cat", "box": [0, 0, 10, 3]},
            {"label": "dog", "box": [0, 0, 5, 5], "difficult": True}]},
        {"file_name": "b.png", "labels": ["dog"],
         "boxes": [{"label": "dog", "box": [1, 1, 3, 2], "area": 7.5}]},
    ]  # fmt: skip
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rec = read_image_jsonl(tmp_path / "img", tmp_path / "l.jsonl", ["cat", "dog"])
    np.testing.assert_array_equal(rec.areas, [[30, NAN], [NAN, 7.5]])
    np.testing.assert_array_equal(rec.subset([1]).areas, [[NAN, 7.5]])
    np.testing.assert_array_equal(rec.select_classes(["dog"]).areas, [[NAN], [7.5]])
    lines[1]["boxes"] = [{"label": "dog", "box": [3, 1, 1, 2]}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataFormatError, match=r"l.jsonl:2: boxes\[0\] must be .* x0 <= x1"):
        read_image_jsonl(tmp_path / "img", tmp_path / "l.jsonl", ["cat", "dog"])
    del lines[1]["boxes"]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataFormatError, match=r"l.jsonl:2: no 'boxes' although earlier lines have them"):
        read_image_jsonl(tmp_path / "img", tmp_path / "l.jsonl", ["cat", "dog"])


def test_voc_areas_are_the_largest_non_difficult_devkit_box(tmp_path):
    base = synthetic.write_voc2007(tmp_path, {"test": ["000001"]}, {"000001": [("dog", 0)]})
    (base / "Annotations" / "000001.xml").write_text(
        "<annotation>"
        "<object><name>dog</name><difficult>0</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>dog</name><difficult>0</difficult>"
        "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>14</xmax><ymax>14</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>100</ymax></bndbox></object>"
        "</annotation>"
    )
    rec = read_voc2007(tmp_path, "test")
    names = rec.class_names
    assert rec.areas[0, names.index("dog")] == 200.0  # 10 x 20 inclusive pixels beats 10 x 10
    assert np.isnan(rec.areas[0, names.index("cat")])  # difficult only: label 0, no size


def test_coco_areas_are_instance_areas_without_crowds(tmp_path):
    synthetic.write_coco2014(tmp_path, "val2014", ["a", "b"], [[0, 1]], crowd=[0])
    rec = read_coco2014(tmp_path, "val2014")
    assert rec.labels.tolist() == [[1, 1]]
    assert np.isnan(rec.areas[0, 0]) and rec.areas[0, 1] == 25.0  # the crowd annotation has no size
