"""The toy world: deterministic generation, caption labels, files the real loaders read, atomic model
writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbtr.toyworld.build import build_toyworld
from dbtr.toyworld.datamodule import ToyWorldDataModule
from dbtr.toyworld.localization import box_masks, localization_scores
from dbtr.toyworld.world import CLASS_NAMES, CLASSES, caption_for, render_array, sample_scene


def test_generation_is_deterministic():
    a = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    b = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    assert [s.labels for s in a] == [s.labels for s in b]
    np.testing.assert_array_equal(render_array(a[0]), render_array(b[0]))
    assert caption_for(np.random.default_rng(1), a[0]) == caption_for(np.random.default_rng(1), b[0])


def test_scenes_and_boxes_are_valid():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        assert 1 <= len(scene.labels) <= 3 and scene.labels == [n for n in CLASS_NAMES if n in scene.labels]
        kinds = {o.kind for o in scene.objects}
        assert set(scene.labels) <= kinds
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_caption_labels_are_the_mentioned_classes():
    rng = np.random.default_rng(1)
    words = {c.name: (*c.synonyms, *c.plurals) for c in CLASSES}
    dropped = 0
    for _ in range(500):
        scene = sample_scene(rng)
        text, labels = caption_for(rng, scene, colour_p=0.5, drop_p=0.15)
        assert labels and set(labels) <= set(scene.labels)
        tokens = set(text.replace(",", " ").replace(".", " ").replace("!", " ").split())
        for name in labels:
            assert tokens & set(words[name]), (text, name)
        for name in set(CLASS_NAMES) - set(labels):
            assert not tokens & set(words[name]), (text, name)
        dropped += len(scene.labels) - len(labels)
    assert dropped > 0  # captions do leave objects out


def test_build_writes_the_formats_the_loaders_read(tmp_path):
    root = build_toyworld(tmp_path / "tw", num_captions=120, num_val=10, num_test=20)
    assert (root / "classes.txt").read_text().split() == list(CLASS_NAMES)
    synonyms = json.loads((root / "synonyms.json").read_text())
    assert synonyms["leaf"] == ["leaf", "leaves"]
    assert len((root / "captions.txt").read_text().splitlines()) == 120
    dm = ToyWorldDataModule(str(root), num_captions=120, num_val=10, num_test=20, eval_batch_size=8)
    dm.setup("fit")
    dm.setup("test")
    assert dm.captions.labels.shape == (120, len(CLASS_NAMES)) and len(dm.test_records.file_names) == 20
    first = json.loads((root / "test.jsonl").read_text().splitlines()[0])
    assert {b["label"] for b in first["boxes"]} == set(first["labels"])
    item = next(iter(dm.test_dataloader()))
    assert item["pixel_values"].shape == (8, 3, 64, 64) and float(item["pixel_values"].min()) >= -1.0


def test_prepare_data_builds_once_and_rebuilds_when_the_spec_changes(tmp_path):
    dm = ToyWorldDataModule(str(tmp_path / "tw"), num_captions=50, num_val=5, num_test=6)
    assert not dm.is_built()
    dm.prepare_data()
    assert dm.is_built()
    stamp = (tmp_path / "tw" / "captions.jsonl").stat().st_mtime_ns
    dm.prepare_data()
    assert (tmp_path / "tw" / "captions.jsonl").stat().st_mtime_ns == stamp
    bigger = ToyWorldDataModule(str(tmp_path / "tw"), num_captions=60, num_val=5, num_test=6)
    assert not bigger.is_built()
    bigger.prepare_data()
    assert len((tmp_path / "tw" / "captions.txt").read_text().splitlines()) == 60


def test_localization_scores_against_hand_computed_values():
    boxes = [[{"label": "tomato", "box": [0, 0, 32, 32]}]]  # top-left quarter of a 2x2 grid on 64 px
    masks = box_masks(boxes[0], CLASS_NAMES, grid=2, image_size=64)
    assert masks[0].tolist() == [True, False, False, False]
    att = np.zeros((1, 4, len(CLASS_NAMES)))
    att[0, :, 0] = [0.7, 0.1, 0.1, 0.1]
    labels = -np.ones((1, len(CLASS_NAMES)))
    labels[0, 0] = 1
    got = localization_scores(att, labels, boxes, CLASS_NAMES, 64)
    assert got == {
        "mass_in_box": pytest.approx(70.0),
        "mass_in_box_uniform": 25.0,
        "pointing_accuracy": 100.0,
        "pairs": 1,
    }


def test_model_folder_is_replaced_atomically(tmp_path, monkeypatch):
    from transformers import CLIPModel

    from dbtr.models.tiny import save_random_clip

    target = tmp_path / "clip"
    save_random_clip(target, ["a red tomato"], vocab_size=300, vision_image_size=32)
    before = sorted(p.name for p in target.iterdir())

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(CLIPModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_random_clip(target, ["a red tomato"], vocab_size=300, vision_image_size=32)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]  # no temporary folder left behind
