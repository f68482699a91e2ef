"""dbtr-predict and the inference loader: safe checkpoint loading, top-k equal to the model, bad inputs,
open vocabulary (a new name scores as plain zero-shot)."""

from __future__ import annotations

import csv
import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image

from dbtr.cli.predict import main, parse_class_list
from dbtr.data.images import ClipImageTransform, load_image
from dbtr.system.checkpoint import load_checkpoint, read_checkpoint
from dbtr.testing.fixtures import TINY_CLASSES


@pytest.fixture(scope="module")
def ckpt(wandb_run) -> str:
    return json.loads((wandb_run / "metrics.json").read_text())["checkpoint"]


def test_trained_checkpoints_load_with_weights_only(wandb_run):
    paths = sorted((wandb_run / "checkpoints").glob("*.ckpt"))
    assert len(paths) == 2  # the selected epoch and last.ckpt
    for path in paths:
        raw = torch.load(path, map_location="cpu", weights_only=True)  # raises on any non-plain object
        assert raw["hyper_parameters"]["class_names"] == list(TINY_CLASSES)
        assert read_checkpoint(path)["state_dict"].keys() == raw["state_dict"].keys()


def test_unsafe_or_foreign_files_are_refused_with_a_reason(tmp_path):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(
        {"hyper_parameters": {"class_names": ["a"]}, "state_dict": {}, "extra": Fraction(1, 3)}, unsafe
    )
    with pytest.raises(ValueError, match="refused by safe loading.*fractions.Fraction"):
        read_checkpoint(unsafe)
    foreign = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a dbtr checkpoint"):
        read_checkpoint(foreign)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_cli_top_k_are_the_models_scores_and_bad_images_are_skipped(ckpt, demo_dir, tmp_path, cli):
    from dbtr import DbtrLitModule

    inputs = tmp_path / "in"
    inputs.mkdir()
    names = [f"test_000{i}.png" for i in range(3)]
    for name in names:
        shutil.copy(demo_dir / "images" / name, inputs / name)
    (inputs / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out" / "preds.jsonl"
    proc = cli(
        "dbtr-predict",
        ckpt,
        str(inputs),
        str(tmp_path / "missing.jpg"),
        "-o",
        str(out),
        "-k",
        "3",
        "--heatmaps",
        str(tmp_path / "heat"),
        cwd=tmp_path,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == names

    model = DbtrLitModule.load_from_checkpoint(ckpt).eval()
    pixels = torch.stack([ClipImageTransform(32)(load_image(inputs / n)) for n in names])
    with torch.no_grad():
        top = model(pixels).logits.topk(3)
    for r, values, indices in zip(records, top.values, top.indices):
        assert [t["label"] for t in r["top"]] == [TINY_CLASSES[i] for i in indices]
        assert [t["score"] for t in r["top"]] == pytest.approx(values.tolist(), abs=1e-5)
        with Image.open(r["heatmap"]) as im:
            assert im.format == "PNG"

    skipped = out.with_name("preds.jsonl.skipped.txt").read_text()
    assert "broken.png\tcannot decode image" in skipped and "missing.jpg\tno such file" in skipped
    assert "scored 3 of 5 image(s)" in proc.stderr and "broken.png" in proc.stderr
    summary = json.loads(out.with_name("preds.jsonl.summary.json").read_text())
    assert summary["num_scored"] == 3 and summary["new_classes"] == [] and len(summary["skipped"]) == 2


def test_csv_output_with_a_new_vocabulary(ckpt, demo_dir, tmp_path, capsys):
    classes = tmp_path / "vocab.txt"
    classes.write_text("blue\nzebra\nred\n")
    out = tmp_path / "preds.csv"
    assert (
        main(
            [
                ckpt,
                str(demo_dir / "images" / "test_000*.png"),
                "-o",
                str(out),
                "-k",
                "2",
                "--classes",
                str(classes),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10 * 2 and {r["rank"] for r in rows} == {"1", "2"}
    assert {r["label"] for r in rows} <= {"blue", "zebra", "red"}
    summary = json.loads((tmp_path / "preds.csv.summary.json").read_text())
    assert summary["new_classes"] == ["zebra"] and summary["format"] == "csv"
    assert summary["new_class_rule"] == "a zero residual (plain zero-shot T0)"
    assert (
        "not trained on, scored with a zero residual (plain zero-shot T0): zebra" in capsys.readouterr().err
    )
    assert not (tmp_path / "preds.csv.skipped.txt").exists()


def test_a_new_name_scores_as_plain_zero_shot_and_trained_names_keep_their_residual(ckpt, demo_dir, tmp_path):
    from dbtr import DbtrLitModule

    # Without the attention terms each class is scored independently of the others, so the comparison is exact
    # (with PFA, the softmax over classes lets the vocabulary shift every score).
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["hyper_parameters"]["head"] = {**raw["hyper_parameters"]["head"], "pfa": "none"}
    path = tmp_path / "nopfa.ckpt"
    torch.save(raw, path)
    opened = load_checkpoint(path, classes=["blue", "zebra", "red"])
    trained = load_checkpoint(path)
    assert opened.new_classes == ["zebra"] and trained.new_classes == [] and trained.new_class_rule == ""
    hp = {**raw["hyper_parameters"], "evaluation": {"top_k": [1]}}
    zero_shot = {
        name: DbtrLitModule(**{**hp, "class_names": [name]}, encoder=trained.model.encoder).eval()
        for name in ("zebra", "blue")
    }
    images = [load_image(demo_dir / "images" / f"test_{i:04d}.png") for i in range(8)]
    pixels = torch.stack([trained.transform(im) for im in images])
    got, want = opened.score(images)[0], trained.score(images)[0]
    with torch.no_grad():
        torch.testing.assert_close(got[:, 1], zero_shot["zebra"](pixels).logits[:, 0])
        torch.testing.assert_close(
            got[:, [0, 2]], want[:, [TINY_CLASSES.index("blue"), TINY_CLASSES.index("red")]]
        )
        assert not torch.allclose(got[:, 0], zero_shot["blue"](pixels).logits[:, 0])  # the residual is kept


def test_a_new_vocabulary_keeps_the_seen_unseen_training_rule(ckpt, demo_dir, tmp_path):
    # A seen/unseen checkpoint: "unseen" classes kept T0 in training (row_mask), even where their residual
    # rows hold values. A new vocabulary drops the training subsets (they name other classes) but must keep
    # that rule.
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    seen, unseen = list(TINY_CLASSES[:2]), list(TINY_CLASSES[2:])
    hp = raw["hyper_parameters"]
    hp.update(
        head={**hp["head"], "pfa": "none"},
        class_subsets={"seen": seen, "unseen": unseen},
        residual_classes="seen",
        evaluation={**hp["evaluation"], "val_subset": "seen"},
    )
    for key in ("head.global_classifier.residual", "head.local_classifier.residual"):
        raw["state_dict"][key] = torch.randn_like(
            raw["state_dict"][key]
        )  # nonzero rows for the unseen classes too
    path = tmp_path / "zsl.ckpt"
    torch.save(raw, path)
    trained = load_checkpoint(path)
    vocab = [unseen[0], "zebra", seen[1]]
    opened = load_checkpoint(path, classes=vocab)
    assert opened.new_classes == ["zebra"]
    assert opened.model.head.global_classifier.row_mask.tolist() == [0.0, 0.0, 1.0]  # unseen and new keep T0
    images = [load_image(demo_dir / "images" / f"test_{i:04d}.png") for i in range(6)]
    got, want = opened.score(images)[0], trained.score(images)[0]
    columns = [TINY_CLASSES.index(unseen[0]), TINY_CLASSES.index(seen[1])]
    torch.testing.assert_close(got[:, [0, 2]], want[:, columns])


def test_wrong_inputs_give_clear_errors(ckpt, demo_dir, tmp_path, capsys):
    def fails(*args: str, code: int = 2) -> str:
        with pytest.raises(SystemExit) as exc:
            main([*args, "-o", str(tmp_path / "p.jsonl")])
        assert exc.value.code == code
        return capsys.readouterr().err

    image = str(demo_dir / "images" / "test_0000.png")
    assert "matches no file" in fails(ckpt, str(tmp_path / "*.jpg"))
    assert "no checkpoint file" in fails(str(tmp_path / "nope.ckpt"), image)
    assert "class list file not found" in fails(ckpt, image, "--classes", str(tmp_path / "classes.txt"))
    assert "duplicated class name" in fails(ckpt, image, "--classes", "red,blue,red")
    assert "--top-k must be at least 1" in fails(ckpt, image, "-k", "0")
    assert "holds no image file" in fails(ckpt, str(tmp_path))
    assert "Could not load CLIP weights" in fails(ckpt, image, "--clip", str(tmp_path / "noclip"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    assert main([ckpt, str(broken), "-o", str(tmp_path / "p.jsonl")]) == 1  # nothing readable: exit 1
    assert "no readable image" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()


def test_class_list_parsing(tmp_path):
    (tmp_path / "c.txt").write_text("# comment\ndog\n\ncat\n")
    assert parse_class_list(str(tmp_path / "c.txt")) == ["dog", "cat"]
    assert parse_class_list("dog, hot dog ,cat") == ["dog", "hot dog", "cat"]
    with pytest.raises(ValueError, match="empty class name"):
        parse_class_list("dog,,cat")
