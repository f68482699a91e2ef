"""The toy world: deterministic generation, caption labels, files the real loaders read, atomic model
writes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dbtr.toyworld.build import build_toyworld
from dbtr.toyworld.datamodule import ToyWorldDataModule
from dbtr.toyworld.localization import box_masks, localization_scores
from dbtr.toyworld.world import (
    CANVAS,
    CLASS_NAMES,
    CLASSES,
    DOMINANT_P,
    MENTION_P,
    caption_for,
    closeup_view,
    render_array,
    sample_scene,
    size_bucket,
    visible_objects,
)


def test_generation_is_deterministic():
    a = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    b = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    assert [s.labels for s in a] == [s.labels for s in b]
    np.testing.assert_array_equal(render_array(a[0]), render_array(b[0]))
    assert caption_for(np.random.default_rng(1), a[0]) == caption_for(np.random.default_rng(1), b[0])


def test_neither_colour_nor_shape_alone_identifies_a_class():
    colours = Counter(c.colour for c in CLASSES)
    shapes = Counter(c.shape for c in CLASSES)
    assert set(colours.values()) == {2} and set(shapes.values()) == {2}
    assert len({(c.colour, c.shape) for c in CLASSES}) == len(CLASSES)


def _bucket(scene, name):
    return size_bucket(max(o.area_fraction for o in scene.objects if o.kind == name))


def test_scenes_have_a_dominant_object_and_small_ones_with_valid_boxes():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(1000)]
    for scene in scenes:
        assert scene.labels and scene.labels == [n for n in CLASS_NAMES if n in scene.labels]
        assert set(scene.labels) <= {o.kind for o in scene.objects}
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS and x1 - x0 >= 9
    buckets = Counter(_bucket(s, n) for s in scenes for n in s.labels)
    dominated = np.mean([max(o.area_fraction for o in s.objects) >= 0.25 for s in scenes])
    assert abs(dominated - DOMINANT_P) < 0.05  # every large object covers a quarter of the canvas or more
    assert buckets["small"] > buckets["medium"] > 0 and buckets["large"] > 0


def test_captions_name_what_they_label_and_leave_small_objects_out_more_often():
    rng = np.random.default_rng(1)
    words = {c.name: (*c.synonyms, *c.plurals) for c in CLASSES}
    named, seen = Counter(), Counter()
    for _ in range(2000):
        scene = sample_scene(rng)
        text, labels = caption_for(rng, scene, colour_p=0.5)
        assert labels and set(labels) <= set(scene.labels)
        tokens = set(text.replace(",", " ").replace(".", " ").replace("!", " ").split())
        for name in labels:
            assert tokens & set(words[name]), (text, name)
        for name in set(CLASS_NAMES) - set(labels):
            assert not tokens & set(words[name]), (text, name)
        largest = max((o for o in scene.objects if o.kind in CLASS_NAMES), key=lambda o: o.area_fraction)
        for name in scene.labels:
            if name != largest.kind:  # the largest class object is always named
                seen[_bucket(scene, name)] += 1
                named[_bucket(scene, name)] += name in labels
    rate = {b: named[b] / seen[b] for b in seen}
    for bucket, p in MENTION_P.items():
        if seen[bucket] > 100:
            assert abs(rate[bucket] - p) < 0.06, (bucket, rate)
    assert rate["small"] < rate["medium"]


def test_closeups_render_the_object_large_and_caption_what_they_show():
    rng = np.random.default_rng(2)
    scene = sample_scene(rng)
    view = closeup_view(rng, scene, zoom=(1.5, 1.5))
    image = render_array(scene, 64, view)
    assert image.shape == (64, 64, 3) and not np.array_equal(image, render_array(scene))
    visible = [(o, f) for o, f in visible_objects(scene, view) if o.kind in CLASS_NAMES]
    focus, fraction = max(visible, key=lambda t: t[1])
    assert fraction == pytest.approx(1 / 1.5**2)  # the object's box fills (1 / zoom)^2 of the close-up
    text, labels = caption_for(rng, scene, view=view)
    assert focus.kind in labels and set(labels) <= {o.kind for o, _ in visible}


def test_build_writes_the_formats_the_loaders_read(tmp_path):
    root = build_toyworld(tmp_path / "tw", num_captions=120, num_val=10, num_test=20)
    assert (root / "classes.txt").read_text().split() == list(CLASS_NAMES)
    synonyms = json.loads((root / "synonyms.json").read_text())
    assert synonyms["tree"] == ["tree", "fir", "trees", "firs"]
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


def test_a_world_from_another_generator_or_an_interrupted_build_is_rebuilt(tmp_path, monkeypatch, caplog):
    import dbtr.toyworld.build as build

    root = tmp_path / "tw"
    dm = ToyWorldDataModule(str(root), num_captions=30, num_val=4, num_test=4)
    dm.prepare_data()
    spec = json.loads((root / "world.json").read_text())
    (root / "world.json").write_text(json.dumps({**spec, "generator": 1}))
    assert not dm.is_built() and "generator version 1, this is version 2" in dm.stale_reason()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while rendering")

    monkeypatch.setattr(build, "render", killed)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    # the captions were already rewritten, the images not: no marker, so nothing reads it as a world
    assert not (root / "world.json").exists() and dm.stale_reason() == "no complete world there"
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        dm.prepare_data()
    assert dm.is_built() and "no complete world there; building it" in caplog.text


def test_world_seeds_give_other_scenes_in_their_own_folders():
    from dbtr.toyworld.demo import compose_config

    roots = [compose_config(["experiment=toyworld", f"data.seed={s}"]).data.root for s in (0, 7)]
    assert roots[0].endswith("/world0") and roots[1].endswith("/world7")
    a, b = (sample_scene(np.random.default_rng([s, 303])) for s in (0, 7))
    assert a.labels != b.labels or a.objects != b.objects


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
