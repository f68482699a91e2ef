"""Readers of the minimal data formats: labels, errors with file:line, image decoding, preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dbtr.data.captions import CaptionCollate, CaptionDataset, encode_caption_features, read_caption_jsonl
from dbtr.data.datamodule import TextToImageDataModule
from dbtr.data.images import ClipImageTransform, ImageDataset, ImageDecodeError, read_image_jsonl
from dbtr.data.labels import load_class_names
from dbtr.utils.files import DataFormatError

CLASSES = ["cat", "dog", "dining table"]


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_caption_labels(tmp_path):
    f = _write(
        tmp_path / "c.jsonl",
        [
            {"text": "a cat", "labels": ["cat"]},
            "",
            {"text": "a tree", "labels": []},
            {"text": "a dog at a table", "labels": ["dog", "dining table"]},
        ],
    )
    rec = read_caption_jsonl(f, CLASSES)
    assert rec.texts == ["a cat", "a dog at a table"]
    np.testing.assert_array_equal(rec.labels, [[1, -1, -1], [-1, 1, 1]])
    assert rec.dropped == {"no_label": 1}


@pytest.mark.parametrize(
    "lines, match",
    [
        ([{"text": "a cat", "labels": ["cat"]}, '{"text": "oops", '], r"c.jsonl:2: malformed JSON"),
        (
            [{"text": "a cat", "labels": ["cat"]}, {"text": "a cow", "labels": ["cow"]}],
            r"c.jsonl:2: unknown class 'cow'",
        ),
        ([{"text": "  ", "labels": ["cat"]}], r"c.jsonl:1: field 'text' is empty"),
        ([{"caption": "x", "labels": ["cat"]}], r"c.jsonl:1: missing or non-string field 'text'"),
        ([{"text": "a cat", "labels": "cat"}], r"c.jsonl:1: labels must be a list"),
        ([{"text": "a cow", "labels": []}], r"none of the 1 captions carries a label"),
        ([], r"no captions found"),
    ],
)
def test_caption_errors_name_file_and_line(tmp_path, lines, match):
    f = _write(tmp_path / "c.jsonl", lines)
    with pytest.raises(DataFormatError, match=match):
        read_caption_jsonl(f, CLASSES)


def test_class_names_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# comment\ncat\n\ndog\n")
    assert load_class_names(str(f)) == ["cat", "dog"]
    f.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"classes.txt: duplicated"):
        load_class_names(str(f))
    with pytest.raises(FileNotFoundError, match="one class name per line"):
        load_class_names(str(tmp_path / "missing.txt"))


def _images(tmp_path, names):
    root = tmp_path / "img"
    root.mkdir()
    for n in names:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / n)
    return root


def test_image_labels_with_difficult(tmp_path):
    root = _images(tmp_path, ["a.png", "b.png"])
    f = _write(
        tmp_path / "l.jsonl",
        [
            {"file_name": "a.png", "labels": ["cat"], "difficult": ["dog"]},
            {"file_name": "b.png", "labels": []},
        ],
    )
    rec = read_image_jsonl(root, f, CLASSES)
    np.testing.assert_array_equal(rec.labels, [[1, 0, -1], [-1, -1, -1]])
    item = ImageDataset(rec, ClipImageTransform(16))[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["labels"].tolist() == [1, 0, -1]


def test_image_errors(tmp_path):
    root = _images(tmp_path, ["a.png"])
    f = _write(
        tmp_path / "l.jsonl",
        [{"file_name": "a.png", "labels": ["cat"]}, {"file_name": "zz.png", "labels": ["cat"]}],
    )
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ annotated images are not on disk under .*zz.png"):
        read_image_jsonl(root, f, CLASSES)
    f = _write(tmp_path / "l.jsonl", [{"file_name": "a.png", "labels": ["horse"]}])
    with pytest.raises(DataFormatError, match=r"l.jsonl:1: unknown class 'horse'"):
        read_image_jsonl(root, f, CLASSES)
    f = _write(
        tmp_path / "l.jsonl", [{"file_name": "a.png", "labels": []}, {"file_name": "a.png", "labels": []}]
    )
    with pytest.raises(DataFormatError, match=r"l.jsonl:2: 'a.png' is listed twice \(first at line 1\)"):
        read_image_jsonl(root, f, CLASSES)
    with pytest.raises(FileNotFoundError, match="expected layout"):
        read_image_jsonl(tmp_path / "nope", f, CLASSES)


def test_undecodable_image_names_the_file(tmp_path):
    root = _images(tmp_path, ["a.png"])
    (root / "bad.png").write_bytes(b"not a png at all")
    f = _write(tmp_path / "l.jsonl", [{"file_name": "bad.png", "labels": ["cat"]}])
    ds = ImageDataset(read_image_jsonl(root, f, CLASSES), ClipImageTransform(16))
    with pytest.raises(ImageDecodeError, match="bad.png"):
        ds[0]


def test_clip_transform_resizes_short_side_and_centre_crops():
    # a 40x20 image whose left and right quarters are black: after short side -> 10 and centre crop 10,
    # only the white middle remains
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 10:30] = 255
    t = ClipImageTransform(10, mean=(0, 0, 0), std=(1, 1, 1))
    x = t(Image.fromarray(arr))
    assert x.shape == (3, 10, 10)
    assert float(x[:, :, 2:8].min()) > 0.95


@pytest.mark.parametrize(
    "w, h, resized, origin",
    [
        # torchvision Resize(224): long side int(224 * long / short), truncated (round() would give 299, 336)
        (500, 375, (298, 224), (37, 0)),
        (375, 500, (224, 298), (0, 37)),
        (500, 333, (336, 224), (56, 0)),
        # CenterCrop: int(round(slack / 2)), half to even: slack 75 -> 38 (floor would give 37), 73 -> 36
        (299, 224, (299, 224), (38, 0)),
        (297, 224, (297, 224), (36, 0)),
        (224, 224, (224, 224), (0, 0)),
        (640, 427, (335, 224), (56, 0)),
    ],
)
def test_clip_transform_geometry_is_torchvisions(w, h, resized, origin):
    """The size and crop box of OpenAI CLIP's / TaI-DPT's test transform (torchvision Resize + CenterCrop),
    written out per case; the pixels are then exactly a bicubic resize to that size and that crop."""
    from dbtr.data.images import crop_origin, resized_size

    assert resized_size(w, h, 224) == resized and crop_origin(*resized, 224) == origin
    rng = np.random.default_rng(w * h)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    want = image if resized == (w, h) else image.resize(resized, Image.BICUBIC)
    want = want.crop((origin[0], origin[1], origin[0] + 224, origin[1] + 224))
    got = ClipImageTransform(224).crop(image)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_caption_features_cache_and_collate(encoder, tmp_path):
    f = _write(
        tmp_path / "c.jsonl",
        [
            {"text": "a red square", "labels": ["cat"]},
            {"text": "a blue ball and a green box", "labels": ["dog"]},
        ],
    )
    rec = read_caption_jsonl(f, CLASSES)
    feats = encode_caption_features(encoder, rec.texts)
    assert feats.token_embeds.dtype == np.float16
    live = encoder.encode_text(**encoder.tokenize(rec.texts))
    lengths = live.attention_mask.sum(1).tolist()
    assert np.diff(feats.offsets).tolist() == lengths  # only real tokens are stored
    torch.testing.assert_close(
        torch.from_numpy(feats.text_embeds).float(), live.text_embeds, atol=2e-3, rtol=0
    )
    batch = CaptionCollate()([CaptionDataset(rec, feats)[i] for i in range(2)])
    assert set(batch) == {"labels", "text_embeds", "token_embeds", "attention_mask"}
    # the padded batch equals the live features on real tokens, and the mask is the tokenizer's
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for j, n in enumerate(lengths):
        torch.testing.assert_close(
            batch["token_embeds"][j, :n].float(), live.token_embeds[j, :n], atol=2e-3, rtol=0
        )
    raw = CaptionCollate(encoder.tokenizer, encoder.max_length)([CaptionDataset(rec)[i] for i in range(2)])
    assert raw["input_ids"].shape == (2, encoder.max_length)


def test_datamodule_on_demo(demo_dir, encoder):
    dm = TextToImageDataModule(
        classes=str(demo_dir / "classes.txt"),
        train_captions=str(demo_dir / "captions.jsonl"),
        val_images=str(demo_dir / "images"),
        val_labels=str(demo_dir / "val.jsonl"),
        test_images=str(demo_dir / "images"),
        test_labels=str(demo_dir / "test.jsonl"),
        batch_size=16,
        eval_batch_size=8,
    )
    dm.attach_encoder(encoder)
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and batch["labels"].shape == (16, 6)
    img = next(iter(dm.test_dataloader()))
    assert img["pixel_values"].shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="must be given together"):
        TextToImageDataModule(classes=["a"], val_images="x")
