"""Errors a user can cause: every console script exits non-zero with one message that names the file or value
(and the allowed values), never a traceback; HYDRA_FULL_ERROR=1 / DBTR_TRACEBACK=1 still show the full trace.

The scripts run as subprocesses, the way a user runs them; each case stops before any training."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import cli_env, run_cli
from dbtr.data.images import ClipImageTransform, ImageDataset, ImageDecodeError, ImageRecords, load_image
from dbtr.data.labels import load_class_names
from dbtr.utils.errors import UserError, user_message
from dbtr.utils.files import DataFormatError, iter_jsonl, read_text


def clean_failure(proc, *names: str, code: int = 2) -> str:
    """The run failed with ``code``, printed no traceback, and its message names each of ``names``."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for name in names:
        assert name in text, f"{name!r} not in:\n{text[-3000:]}"
    return text


@pytest.fixture(scope="module")
def ckpt(wandb_run) -> str:
    return json.loads((wandb_run / "metrics.json").read_text())["checkpoint"]


@pytest.fixture()
def tiny_copy(demo_dir, tmp_path) -> Path:
    """The tiny data without its CLIP folder (which configs reach through paths.tiny_dir/clip), to break."""
    root = tmp_path / "tiny"
    shutil.copytree(demo_dir, root, ignore=shutil.ignore_patterns("clip"))
    (root / "clip").symlink_to(demo_dir / "clip", target_is_directory=True)
    return root


# ------------------------------------------------------------------ Hydra apps (dbtr-train, -eval, -data)


def test_missing_clip_weights_is_one_message_and_the_full_trace_on_request(demo_dir, tmp_path):
    missing = tmp_path / "no-such-clip"
    args = (
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"clip.name_or_path={missing}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    text = clean_failure(
        run_cli("dbtr-train", *args, cwd=tmp_path, check=False), str(missing), "clip.name_or_path="
    )
    assert (
        "InstantiationException" not in text and "\\n" not in text
    )  # the cause itself, not Hydra's repr of it
    assert "dbtr-train: error: Could not load CLIP weights" in text
    assert (
        "Could not load CLIP weights" in (tmp_path / "run" / "train.log").read_text()
    )  # the run's log keeps it

    full = run_cli("dbtr-train", *args, cwd=tmp_path, check=False, env=cli_env(HYDRA_FULL_ERROR="1"))
    assert full.returncode != 0 and "Traceback" in full.stderr and "ClipWeightsNotFound" in full.stderr


def test_a_wrong_split_lists_the_allowed_values(tmp_path):
    proc = run_cli(
        "dbtr-data",
        "data=coco2014",
        f"data.root={tmp_path}",
        "data.split=test",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    clean_failure(proc, "data.split=test", "val2014", "train2014")


@pytest.mark.slow
def test_a_failed_multirun_job_is_reported_and_the_others_still_run(demo_dir, tmp_path):
    proc = run_cli(
        "dbtr-data",
        "-m",
        "data=tiny",
        f"paths.tiny_dir={demo_dir}",
        "data.on_bad_image=bogus,skip",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        check=False,
    )
    text = clean_failure(proc, "data.on_bad_image=bogus", "error, skip", code=1)
    assert "Error executing job with overrides" in text
    assert (tmp_path / "sweep" / "1" / "dataset_stats.json").is_file()  # the job after the failed one ran


@pytest.mark.slow
def test_eval_refuses_missing_foreign_and_mismatched_inputs(ckpt, tiny_copy, tmp_path):
    def evaluate(*args: str):
        return run_cli(
            "dbtr-eval",
            "data=tiny",
            f"paths.tiny_dir={tiny_copy}",
            f"hydra.run.dir={tmp_path / 'run'}",
            *args,
            cwd=tmp_path,
            check=False,
        )

    clean_failure(evaluate(), "ckpt_path is required", "ckpt_path=<value>")
    absent = tmp_path / "absent.ckpt"
    clean_failure(evaluate(f"ckpt_path={absent}"), str(absent))

    other = tiny_copy / "other_classes.txt"
    other.write_text("red\ngreen\nblue\n")
    clean_failure(evaluate(f"ckpt_path={ckpt}", f"data.classes={other}"), ckpt, "yellow")

    test_labels = tiny_copy / "test.jsonl"
    lines = test_labels.read_text().splitlines()
    lines[2] = lines[2][:-5]  # a truncated third line
    test_labels.write_text("\n".join(lines) + "\n")
    clean_failure(evaluate(f"ckpt_path={ckpt}"), f"{test_labels}:3", "malformed JSON")


# ------------------------------------------------------------------ argparse apps (dbtr-predict, -toyworld)


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo this must never run",)


@pytest.mark.slow
def test_predict_refuses_an_unsafe_checkpoint_in_one_line(demo_dir, tmp_path):
    import torch

    evil = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"class_names": ["a"]}, "state_dict": {}, "x": _RunsCode()}, evil)
    proc = run_cli(
        "dbtr-predict",
        str(evil),
        str(demo_dir / "images" / "test_0000.png"),
        "-o",
        str(tmp_path / "p.jsonl"),
        cwd=tmp_path,
        check=False,
    )
    text = clean_failure(proc, str(evil), "refused by safe loading", f"{os.system.__module__}.system")
    assert "this must never run" not in text and len(proc.stderr.strip().splitlines()) == 1

    traced = run_cli(
        "dbtr-predict",
        str(evil),
        str(demo_dir / "images" / "test_0000.png"),
        cwd=tmp_path,
        check=False,
        env=cli_env(DBTR_TRACEBACK="1"),
    )
    assert traced.returncode != 0 and "Traceback" in traced.stderr


def test_predict_class_files_bom_and_not_utf8(ckpt, demo_dir, tmp_path):
    from dbtr.cli.predict import main

    image = str(demo_dir / "images" / "test_0000.png")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("red\ngreen\nblue\nvert f\xe8ve\n".encode("latin-1"))
    clean_failure(
        run_cli(
            "dbtr-predict",
            ckpt,
            image,
            "--classes",
            str(latin1),
            "-o",
            str(tmp_path / "x.jsonl"),
            cwd=tmp_path,
            check=False,
        ),
        f"{latin1}:4",
        "UTF-8",
    )

    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("red\ngreen\nblue\n")
    bom.write_bytes("\ufeffred\ngreen\nblue\n".encode("utf-8"))
    run_cli(
        "dbtr-predict", ckpt, image, "--classes", str(bom), "-o", str(tmp_path / "bom.jsonl"), cwd=tmp_path
    )
    assert main([ckpt, image, "--classes", str(plain), "-o", str(tmp_path / "plain.jsonl")]) == 0
    with_bom = json.loads((tmp_path / "bom.jsonl").read_text())
    assert with_bom == json.loads((tmp_path / "plain.jsonl").read_text())
    assert sorted(t["label"] for t in with_bom["top"]) == ["blue", "green", "red"]
    summary = json.loads((tmp_path / "bom.jsonl.summary.json").read_text())
    assert summary["new_classes"] == []  # "red" is the trained class, not a new "\ufeffred"


@pytest.mark.slow
def test_predict_names_the_output_it_cannot_write(ckpt, demo_dir, tmp_path):
    image = str(demo_dir / "images" / "test_0000.png")
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    proc = run_cli(
        "dbtr-predict",
        ckpt,
        image,
        "--heatmaps",
        str(in_the_way / "heat"),
        "-o",
        str(tmp_path / "p.jsonl"),
        cwd=tmp_path,
        check=False,
    )
    clean_failure(proc, f"cannot write {in_the_way}", "Not a directory")
    if os.geteuid() != 0:  # permission bits do not stop root
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        try:
            proc = run_cli(
                "dbtr-predict",
                ckpt,
                image,
                "--heatmaps",
                str(read_only),
                "-o",
                str(tmp_path / "q.jsonl"),
                cwd=tmp_path,
                check=False,
            )
            clean_failure(proc, f"cannot write {read_only}", "Permission denied")
        finally:
            read_only.chmod(0o755)


def test_toyworld_bad_override_is_one_message(tmp_path):
    proc = run_cli("dbtr-toyworld", "model=no_such_model", cwd=tmp_path, check=False)
    clean_failure(proc, "no_such_model", "dbtr-toyworld: error:")


# ------------------------------------------------------------------ in-process: readers and classification


def test_text_readers_drop_a_bom_and_name_the_line_that_is_not_utf8(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffred\ngreen\n".encode("utf-8"))
    assert load_class_names(classes) == ["red", "green"]
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes('\ufeff{"file_name": "a.png", "labels": ["red"]}\n'.encode("utf-8"))
    assert [rec for _, rec in iter_jsonl(labels)] == [{"file_name": "a.png", "labels": ["red"]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"file_name": "a.png"}\n{"file_name": "b\xe9.png"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        list(iter_jsonl(bad))
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: not UTF-8"):
        read_text(bad)


class _Opened:
    """What ``Image.open`` returns, for a decoder that accepts a header of zero height."""

    def __init__(self, image):
        self.image = image

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def draft(self, *args):
        pass

    def load(self):
        pass

    def copy(self):
        return self.image


def test_a_zero_size_image_is_undecodable_not_a_crash(tmp_path, monkeypatch):
    from dbtr.data import images

    path = tmp_path / "flat.png"
    path.write_bytes(b"")
    monkeypatch.setattr(images.Image, "open", lambda p: _Opened(Image.new("RGB", (4, 0))))
    with pytest.raises(ImageDecodeError, match=r"flat\.png: it has zero width or height \(4x0\)"):
        load_image(path)
    records = ImageRecords(tmp_path, ["flat.png"], np.ones((1, 2), dtype=np.int8), ["a", "b"])
    assert ImageDataset(records, ClipImageTransform(8), on_bad_image="skip")[0]["ok"] is False  # counted skip
    with pytest.raises(ImageDecodeError, match=r"flat\.png.*data\.on_bad_image=skip"):
        ImageDataset(records, ClipImageTransform(8), on_bad_image="error")[0]


def test_an_image_error_in_a_dataloader_worker_is_still_one_message(tmp_path):
    from torch.utils.data import DataLoader

    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    records = ImageRecords(tmp_path, ["broken.png"], np.ones((1, 2), dtype=np.int8), ["a", "b"])
    loader = DataLoader(ImageDataset(records, ClipImageTransform(8)), num_workers=1)
    err = _raised(lambda: next(iter(loader)))
    assert isinstance(err, ImageDecodeError) and "Original Traceback" in str(err)  # what torch re-raises
    message = user_message(err)
    assert message.startswith(f"cannot decode image {tmp_path / 'broken.png'}") and "Traceback" not in message


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to classify whatever comes out
        return exc
    raise AssertionError("nothing raised")


def test_what_counts_as_a_user_error(tmp_path):
    from hydra.errors import InstantiationException

    assert user_message(UserError("x.txt:3: bad")) == "x.txt:3: bad"
    for bug in (TypeError("unsupported operand"), IndexError("list index out of range"), KeyError("k")):
        assert user_message(bug) is None  # bugs keep their traceback
    wrapped = InstantiationException("Error in call to target 'X':\nUserError('a\\nb')\nfull_key: model")
    wrapped.__cause__ = UserError("the cause")
    assert user_message(wrapped) == "the cause"
    refused = InstantiationException("Error in call to target 'X':\nTypeError(...)\nfull_key: model.head")
    refused.__cause__ = TypeError("DualBranchHead.__init__() got an unexpected keyword argument 'typo'")
    assert user_message(refused).startswith("model.head: DualBranchHead.__init__() got an unexpected keyword")

    def write():
        (tmp_path / "missing_folder" / "out.json").write_text("{}")

    assert (
        user_message(_raised(write))
        == f"cannot write {tmp_path / 'missing_folder' / 'out.json'}: No such file or directory"
    )
    assert user_message(_raised(lambda: (tmp_path / "absent.txt").read_text())).startswith("cannot read ")
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.json"))
    assert (
        user_message(full) == f"cannot write {tmp_path / 'metrics.json'}: No space left on device "
        "(free some space, or choose another location)"
    )
