"""Inputs that used to give a silent wrong answer: a model folder that is not a (complete) CLIP, a CLIP
without its tokenizer, high-bit-depth and alpha images, EXIF-rotated photos, decompression bombs,
dbtr-predict's inputs and output. Each must either work correctly or stop with one message naming the file."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_cli
from dbtr.data.images import ClipImageTransform, ImageDataset, ImageDecodeError, ImageRecords, load_image
from dbtr.models.clip import ClipEncoder
from dbtr.utils.errors import UserError

CAPTIONS = ["a photo of a dog.", "a red ball on the grass", "there is a blue box and a cat"]


def clean_failure(proc, *names: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for name in names:
        assert name in text, f"{name!r} not in:\n{text[-3000:]}"
    return text


# ------------------------------------------------------------------------------------------ model folders


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from dbtr.models.tiny import save_random_clip

    path = tmp_path_factory.mktemp("clips") / "clip"
    save_random_clip(path, CAPTIONS, vocab_size=600)
    return path


def broken_copy(tiny_clip: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(tiny_clip, out)
    return out


def test_a_folder_that_is_not_a_clip_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(bert)
    with pytest.raises(UserError, match=r"bert is not a CLIP model: its config\.json has model_type='bert'"):
        ClipEncoder.from_pretrained(str(bert))


def test_missing_damaged_or_incomplete_weights_are_refused(tiny_clip, tmp_path):
    from safetensors.torch import load_file, save_file

    missing = broken_copy(tiny_clip, tmp_path, "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"(?s)missing.*no file named model\.safetensors"):
        ClipEncoder.from_pretrained(str(missing))

    truncated = broken_copy(tiny_clip, tmp_path, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated.*model\.safetensors.*truncated, damaged"):
        ClipEncoder.from_pretrained(str(truncated))

    partial = broken_copy(tiny_clip, tmp_path, "partial")
    weights = load_file(partial / "model.safetensors")
    del weights["visual_projection.weight"]  # transformers would initialise it at random, with a warning
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"partial.*lack weight 'visual_projection\.weight'"):
        ClipEncoder.from_pretrained(str(partial))

    extra = broken_copy(tiny_clip, tmp_path, "extra")
    weights = load_file(extra / "model.safetensors")
    weights["head.weight"] = weights["text_projection.weight"].clone()
    save_file(weights, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"extra.*unknown weight 'head\.weight'"):
        ClipEncoder.from_pretrained(str(extra))


def test_a_clip_without_tokenizer_files_is_refused(tiny_clip, tmp_path):
    bare = broken_copy(tiny_clip, tmp_path, "bare")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(
        UserError,
        match=r"bare has no tokenizer files: it needs tokenizer\.json or vocab\.json \+ "
        r"merges\.txt \(it holds config\.json, model\.safetensors\)",
    ):
        ClipEncoder.from_pretrained(str(bare))


def test_a_tokenizer_that_cannot_be_the_models_is_refused(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from dbtr.models.tiny import BOS, EOS, tiny_clip_config

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_clip))
    for name, vocab_size, why in (
        ("larger", len(tokenizer) - 10, "but the text model embeds"),
        ("smaller", 4 * len(tokenizer), "but the text model embeds"),
    ):
        folder = tmp_path / name
        CLIPModel(tiny_clip_config(vocab_size)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with pytest.raises(
            UserError,
            match=rf"tokenizer of .*{name} does not fit.*{len(tokenizer)} tokens {why} "
            rf"{vocab_size}",
        ):
            ClipEncoder.from_pretrained(str(folder))

    # a vocabulary of the right size that knows no English: every word is the unknown token
    vocab = {BOS: 0, EOS: 1, **{f"tok{i}</w>": i + 2 for i in range(598)}}
    folder = tmp_path / "unknown"
    CLIPModel(tiny_clip_config(len(vocab))).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    with pytest.raises(UserError, match=r"tokenizer of .*unknown does not fit.*unknown tokens only"):
        ClipEncoder.from_pretrained(str(folder))


def test_the_shipped_and_fixture_clips_still_load(tiny_clip, clip_dir):
    from dbtr.models.clip import MIN_TOKENIZER_VOCAB

    toy = Path(__file__).resolve().parents[1] / "dbtr" / "assets" / "toyclip"
    for path in (toy, tiny_clip, clip_dir):
        enc = ClipEncoder.from_pretrained(str(path))
        assert MIN_TOKENIZER_VOCAB <= len(enc.tokenizer) == enc.model.config.text_config.vocab_size


def test_dbtr_train_refuses_a_clip_without_tokenizer_before_training(demo_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(
        demo_dir / "clip",
        bare,
        ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json"),
    )
    run = tmp_path / "run"
    proc = run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"clip.name_or_path={bare}",
        f"hydra.run.dir={run}",
        "logger=none",
        cwd=tmp_path,
        check=False,
    )
    clean_failure(proc, f"{bare} has no tokenizer files", "tokenizer.json", "vocab.json + merges.txt")
    assert not (run / "metrics.json").exists()


# ------------------------------------------------------------------------------------------ image modes


def decoded(tmp_path: Path, image: Image.Image, fmt: str = "png") -> np.ndarray:
    """What the model sees of ``image`` saved as a file: load_image, then the CLIP crop at its own size."""
    path = tmp_path / f"{image.mode.replace(';', '_')}.{fmt}"
    image.save(path)
    assert Image.open(path).mode == image.mode  # the file keeps the mode under test
    return np.asarray(ClipImageTransform(image.width).crop(load_image(path)))


def grey(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.uint8)
    return np.stack([v, v, v], axis=-1)


def test_high_bit_depth_images_are_scaled_not_clipped_to_white(tmp_path):
    sixteen = np.array([[0, 2570], [32896, 65535]], dtype=np.uint16)  # /257: 0, 10, 128, 255
    want = grey([[0, 10], [128, 255]])
    np.testing.assert_array_equal(decoded(tmp_path, Image.fromarray(sixteen)), want)  # I;16 (16-bit PNG)
    big_endian = Image.frombytes("I;16B", (2, 2), sixteen.astype(">u2").tobytes())
    np.testing.assert_array_equal(decoded(tmp_path, big_endian, "tiff"), want)
    # I (32-bit int): 8-bit-like values as they are, 16-bit values / 257, anything else stretched min..max
    np.testing.assert_array_equal(
        decoded(tmp_path, Image.fromarray(np.array([[0, 10], [128, 255]], np.int32)), "tiff"), want
    )
    np.testing.assert_array_equal(decoded(tmp_path, Image.fromarray(sixteen.astype(np.int32)), "tiff"), want)
    stretched = Image.fromarray(np.array([[-1000, 0], [1000, 3000]], np.int32))
    np.testing.assert_array_equal(decoded(tmp_path, stretched, "tiff"), grey([[0, 64], [128, 255]]))
    # F (float): 0..1 times 255, 0..255 as they are
    np.testing.assert_array_equal(
        decoded(tmp_path, Image.fromarray(np.array([[0, 0.5], [0.25, 1]], np.float32)), "tiff"),
        grey([[0, 128], [64, 255]]),
    )
    np.testing.assert_array_equal(
        decoded(tmp_path, Image.fromarray(np.array([[0, 10.2], [128, 255]], np.float32)), "tiff"), want
    )


def test_alpha_palette_cmyk_and_one_bit_images_become_the_right_rgb(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 255]], [[0, 0, 0, 128], [255, 255, 255, 7]]], np.uint8)
    # alpha is dropped, as CLIP's own preprocessing (.convert("RGB")) does: not composited on white
    np.testing.assert_array_equal(decoded(tmp_path, Image.fromarray(rgba, "RGBA")), rgba[..., :3])
    la = Image.fromarray(np.array([[[40, 0], [90, 255]], [[0, 10], [255, 128]]], np.uint8), "LA")
    np.testing.assert_array_equal(decoded(tmp_path, la), grey([[40, 90], [0, 255]]))
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2, 1])
    palette.info["transparency"] = 1  # green is the transparent entry: its colour is kept, alpha dropped
    np.testing.assert_array_equal(
        decoded(tmp_path, palette),
        np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]], np.uint8),
    )
    cmyk = Image.frombytes("CMYK", (2, 2), bytes([255, 0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 255, 0, 0, 0, 0]))
    np.testing.assert_array_equal(
        decoded(tmp_path, cmyk, "tiff"),
        np.array([[[0, 255, 255], [255, 0, 255]], [[0, 0, 0], [255, 255, 255]]], np.uint8),
    )
    one_bit = Image.fromarray(np.array([[True, False], [False, True]]))
    assert one_bit.mode == "1"
    np.testing.assert_array_equal(decoded(tmp_path, one_bit), grey([[255, 0], [0, 255]]))


def test_exif_orientation_is_applied(tmp_path):
    # stored 32 wide x 16 tall, left half red, right half blue; orientation 6 = "turn 90 degrees clockwise"
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    photo = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    photo.save(path, quality=95, exif=exif)
    image = load_image(path)
    assert image.size == (16, 32)  # upright: portrait
    top, bottom = (
        np.asarray(image, np.float32)[:12].mean((0, 1)),
        np.asarray(image, np.float32)[-12:].mean((0, 1)),
    )
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50  # red on top, blue below


# ------------------------------------------------------------------------------------ decompression bombs


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (8-bit grey) and whose pixels are absent: Pillow
    judges the size from the header, so no gigabytes are needed to make a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def over_twice_the_limit() -> tuple[int, int]:
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10
    return side, side


def test_a_decompression_bomb_is_an_undecodable_image_naming_the_file(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", *over_twice_the_limit())
    with pytest.raises(ImageDecodeError, match=r"cannot decode image .*bomb\.png: .*decompression bomb"):
        load_image(bomb)
    records = ImageRecords(tmp_path, ["bomb.png"], np.ones((1, 2), dtype=np.int8), ["a", "b"])
    assert (
        ImageDataset(records, ClipImageTransform(8), on_bad_image="skip")[0]["ok"] is False
    )  # a counted skip


@pytest.fixture()
def data_with_a_bomb(demo_dir, tmp_path) -> Path:
    """The tiny data, one test image replaced by a decompression bomb (its CLIP folder linked, not copied)."""
    root = tmp_path / "tiny"
    shutil.copytree(demo_dir, root, ignore=shutil.ignore_patterns("clip"))
    (root / "clip").symlink_to(demo_dir / "clip", target_is_directory=True)
    png_header_only(root / "images" / "test_0003.png", *over_twice_the_limit())
    return root


def test_bad_images_are_found_at_setup_before_fit(data_with_a_bomb):
    import lightning as L

    from dbtr.data.datamodule import TextToImageDataModule

    def datamodule(policy: str) -> TextToImageDataModule:
        root = data_with_a_bomb
        dm = TextToImageDataModule(
            classes=str(root / "classes.txt"),
            train_captions=str(root / "captions.jsonl"),
            val_images=str(root / "images"),
            val_labels=str(root / "val.jsonl"),
            test_images=str(root / "images"),
            test_labels=str(root / "test.jsonl"),
            image_size=32,
            on_bad_image=policy,
        )
        dm.trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )  # as trainer.fit sets it
        return dm

    with pytest.raises(ImageDecodeError, match=r"test_0003\.png.*data\.on_bad_image=skip"):
        datamodule("error").setup("fit")
    dm = datamodule("skip")
    dm.setup("fit")
    assert dm.test_records.skipped == ["test_0003.png"] and "test_0003.png" not in dm.test_records.file_names
    assert dm.image_report()["test"]["skipped"] == ["test_0003.png"]


@pytest.fixture(scope="module")
def trained_past_a_bomb(demo_dir, tmp_path_factory) -> Path:
    """dbtr-train with data.on_bad_image=skip on the tiny data whose test split holds a decompression bomb."""
    tmp = tmp_path_factory.mktemp("bomb_run")
    root = tmp / "tiny"
    shutil.copytree(demo_dir, root, ignore=shutil.ignore_patterns("clip"))
    (root / "clip").symlink_to(demo_dir / "clip", target_is_directory=True)
    png_header_only(root / "images" / "test_0003.png", *over_twice_the_limit())
    run = tmp / "run"
    run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={root}",
        "data.on_bad_image=skip",
        "trainer.max_epochs=2",
        "logger=none",
        f"hydra.run.dir={run}",
        cwd=tmp,
    )
    return run


def test_training_skips_and_counts_a_decompression_bomb(trained_past_a_bomb):
    report = json.loads((trained_past_a_bomb / "data_report.json").read_text())
    assert "test_0003.png" in json.dumps(report["test"])
    metrics = json.loads((trained_past_a_bomb / "metrics.json").read_text())
    assert metrics["test"] and metrics["checkpoint"]


def test_training_stops_at_a_bad_test_image_before_fit(data_with_a_bomb, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={data_with_a_bomb}",
        "logger=none",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=False,
    )
    clean_failure(proc, str(data_with_a_bomb / "images" / "test_0003.png"), "data.on_bad_image=skip")
    assert not list(run.rglob("*.ckpt"))  # stopped before training, not after it


# ------------------------------------------------------------------------------------------ dbtr-predict


@pytest.fixture(scope="module")
def ckpt(trained_past_a_bomb) -> str:
    return json.loads((trained_past_a_bomb / "metrics.json").read_text())["checkpoint"]


def test_predict_checks_its_output_before_loading_the_model(ckpt, demo_dir, tmp_path, monkeypatch, capsys):
    import dbtr.system.checkpoint
    from dbtr.cli.predict import main

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the output cannot be written")

    monkeypatch.setattr(dbtr.system.checkpoint, "load_checkpoint", never)
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    with pytest.raises(SystemExit) as exc:
        main([ckpt, str(demo_dir / "images"), "-o", str(in_the_way / "out" / "p.jsonl")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot write {in_the_way / 'out' / 'p.jsonl'}: {in_the_way} is a file, not a folder" in err
    with pytest.raises(SystemExit):
        main([ckpt, str(demo_dir / "images"), "-o", str(tmp_path)])
    assert f"cannot write {tmp_path}: it is a folder" in capsys.readouterr().err


def test_predict_reports_an_empty_folder_and_scores_the_rest(ckpt, demo_dir, tmp_path, capsys):
    from dbtr.cli.predict import main

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "folder" / "p.jsonl"  # a folder that does not exist yet is created
    image = demo_dir / "images" / "test_0000.png"
    assert main([ckpt, str(image), str(empty), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{empty}: the folder holds no image file" in err and "scored 1 of 2" in err
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == [str(image)]
    summary = json.loads(out.with_name("p.jsonl.summary.json").read_text())
    assert [s["image"] for s in summary["skipped"]] == [str(empty)]


def test_a_truncated_checkpoint_is_one_line_naming_the_file(ckpt, demo_dir, tmp_path, capsys):
    from dbtr.cli.predict import main

    data = Path(ckpt).read_bytes()
    for name, content in (("half.ckpt", data[: len(data) // 2]), ("tail_cut.ckpt", data[:-200])):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(SystemExit) as exc:
            main([str(bad), str(demo_dir / "images" / "test_0000.png"), "-o", str(tmp_path / "p.jsonl")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err, err
        assert f"{bad}: not a readable PyTorch checkpoint" in err and "truncated or damaged" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.jsonl").exists()
