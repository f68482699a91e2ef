"""Benchmark datasets in their native layouts: label matrices against hand-computed ones, protocol files
(class splits, hold-out, partial labels, frozen lists), the image feature cache and bad-input handling."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dbtr.data.benchmarks import synthetic
from dbtr.data.benchmarks.coco import read_coco2014
from dbtr.data.benchmarks.datamodule import Coco2014DataModule, NusWideDataModule, VOC2007DataModule
from dbtr.data.benchmarks.nuswide import read_nuswide, read_tag_labels
from dbtr.data.benchmarks.protocol import (
    apply_partial_labels,
    holdout,
    load_class_split,
    restrict_to_list,
    write_image_list,
)
from dbtr.data.benchmarks.voc import VOC_CLASSES, read_voc2007
from dbtr.text.synonyms import builtin_vocabulary
from dbtr.utils.files import DataFormatError

V = {n: i for i, n in enumerate(VOC_CLASSES)}


# ------------------------------------------------------------------------------------------------ VOC2007
VOC_OBJECTS = {
    "000001": [("dog", 0), ("dog", 1), ("person", 1)],  # dog 1 (one clear), person 0 (difficult only)
    "000002": [("cat", 1), ("cat", 1), ("car", 0)],  # cat 0, car 1
    "000003": [("person", 0), ("person", 0), ("bicycle", 1), ("bicycle", 0)],  # person 1, bicycle 1
    "000004": [("chair", 1)],  # chair 0 only
    "000005": [("tvmonitor", 0), ("diningtable", 0), ("pottedplant", 1)],
}


def expected_voc(ids):
    want = {
        "000001": {"dog": 1, "person": 0},
        "000002": {"cat": 0, "car": 1},
        "000003": {"person": 1, "bicycle": 1},
        "000004": {"chair": 0},
        "000005": {"tvmonitor": 1, "diningtable": 1, "pottedplant": 0},
    }
    out = np.full((len(ids), 20), -1, np.int8)
    for r, i in enumerate(ids):
        for name, v in want[i].items():
            out[r, V[name]] = v
    return out


@pytest.fixture()
def voc(tmp_path):
    return synthetic.write_voc2007(
        tmp_path, {"trainval": ["000001", "000003", "000005"], "test": ["000002", "000004"]}, VOC_OBJECTS
    )


def test_voc_labels_match_hand_computed(voc):
    for split, ids in (("trainval", ["000001", "000003", "000005"]), ("test", ["000002", "000004"])):
        rec = read_voc2007(voc.parent.parent, split)  # the parent of VOCdevkit is accepted too
        assert rec.file_names == [f"JPEGImages/{i}.jpg" for i in ids]
        assert rec.class_names == list(VOC_CLASSES)
        np.testing.assert_array_equal(rec.labels, expected_voc(ids))


def test_voc_bad_inputs_name_the_problem(voc, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)expected layout:.*ImageSets/Main"):
        read_voc2007(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        read_voc2007(voc, "testing")
    (voc / "Annotations" / "000004.xml").write_text(
        "<annotation><object><name>doggo</name></object></annotation>"
    )
    with pytest.raises(DataFormatError, match=r"000004.xml: object 0 has class 'doggo'"):
        read_voc2007(voc, "test")
    (voc / "Annotations" / "000004.xml").write_text("<annotation>\n<object>\n</annotation>")
    with pytest.raises(DataFormatError, match=r"000004.xml:3: malformed XML"):
        read_voc2007(voc, "test")
    (voc / "Annotations" / "000004.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"test.txt:2: annotation .*000004.xml not found"):
        read_voc2007(voc, "test")


def test_voc_missing_image_error_or_counted_skip(voc):
    (voc / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"(?s)1 of 2 annotated images are not on disk.*000002.jpg.*JPEGImages"
    ):
        VOC2007DataModule(voc, val_size=0).read_images("test")
    rec = VOC2007DataModule(voc, val_size=0, on_missing_image="skip").read_images("test")
    assert rec.file_names == ["JPEGImages/000004.jpg"] and rec.missing == ["JPEGImages/000002.jpg"]


# ------------------------------------------------------------------------------------------------ COCO
COCO = builtin_vocabulary("coco2014").class_names


def test_coco_labels_categories_and_unlabeled_images(tmp_path):
    images = [[0, 0, 5], [], [79, 2], [1]]  # image 1 has no annotation; repeated annotations of class 0
    synthetic.write_coco2014(tmp_path, "val2014", COCO, images, crowd=[3])
    rec = read_coco2014(tmp_path, "val2014")
    assert rec.class_names == COCO  # sorted by id although the file lists them shuffled
    want = np.full((4, 80), -1, np.int8)
    for r, cls in enumerate(images):
        want[r, cls] = 1  # crowd annotations count (COCO.getAnnIds default)
    np.testing.assert_array_equal(rec.labels, want)
    assert rec.file_names[1] == "val2014/COCO_val2014_000000000002.jpg"
    rec = read_coco2014(tmp_path, "val2014", include_unlabeled=False)
    assert len(rec) == 3 and "val2014/COCO_val2014_000000000002.jpg" not in rec.file_names
    dm = Coco2014DataModule(tmp_path, include_unlabeled=False, val_size=0)
    assert len(dm.read_images("test")) == 3


def test_coco_bad_annotations(tmp_path):
    synthetic.write_coco2014(tmp_path, "val2014", COCO, [[0], [1]], missing=[1])
    with pytest.raises(
        FileNotFoundError, match=r"1 of 2 annotated images are not on disk.*COCO_val2014_000000000002"
    ):
        Coco2014DataModule(tmp_path, val_size=0).read_images("test")
    path = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 99, "image_id": 5, "category_id": 1})
    path.write_text(json.dumps(data))
    with pytest.raises(
        DataFormatError, match=r"annotations\[2\]: image_id 5 is not in the file's images list"
    ):
        read_coco2014(tmp_path, "val2014")
    with pytest.raises(FileNotFoundError, match=r"instances_train2014.json not found\nexpected layout"):
        read_coco2014(tmp_path, "train2014")


# ------------------------------------------------------------------------------------------------ NUS-WIDE
NUS = builtin_vocabulary("nuswide").class_names
NUS_SPLIT = load_class_split("nuswide_925_81")
TAGS = json.loads(
    (
        NUS_SPLIT
        and __import__("dbtr.data.benchmarks.protocol", fromlist=["x"]).SPLIT_DIR / "nuswide_925_81.json"
    ).read_text()
)["tag_list_1k"]


@pytest.fixture()
def nus(tmp_path):
    sky, nature = TAGS.index("sky"), TAGS.index("nature")
    splits = {
        "Train": [
            ("actor/0001_1.jpg", [0, 55], [nature]),
            ("beach/0002_2.jpg", [2], [sky, nature]),
            ("zebra/0003_3.jpg", [], []),
        ],
        "Test": [
            ("sky/0004_4.jpg", [55, 80], [sky]),
            ("cat/0005_5.jpg", [], [nature]),
            ("cat/0006_6.jpg", [11], []),
        ],
    }
    return synthetic.write_nuswide(tmp_path / "nus", NUS, TAGS, splits, missing=["cat/0006_6.jpg"])


def test_nuswide_concept_labels_windows_paths_crlf(nus):
    rec = read_nuswide(nus, "Test")
    assert rec.file_names == ["sky/0004_4.jpg", "cat/0005_5.jpg", "cat/0006_6.jpg"] and rec.class_names == NUS
    want = np.full((3, 81), -1, np.int8)
    want[0, [55, 80]] = 1
    want[2, 11] = 1
    np.testing.assert_array_equal(rec.labels, want)
    assert read_nuswide(nus, "test", include_unlabeled=False).file_names == [
        "sky/0004_4.jpg",
        "cat/0006_6.jpg",
    ]
    # the default dataset policy: missing Flickr files are skipped, counted and listed
    dm = NusWideDataModule(nus, val_size=0)
    got = dm.read_images("test")
    assert got.file_names == ["sky/0004_4.jpg", "cat/0005_5.jpg"] and got.missing == ["cat/0006_6.jpg"]


def test_nuswide_tags_and_925_81_label_space(nus):
    tags, labels = read_tag_labels(nus, ["beach/0002_2.jpg", "sky/0004_4.jpg"])
    assert tags == TAGS and labels.shape == (2, 1000)
    assert set(np.flatnonzero(labels[0] == 1)) == {TAGS.index("sky"), TAGS.index("nature")}
    dm = NusWideDataModule(nus, val_size=0, class_split="nuswide_925_81", classes="all")
    assert dm.class_names == list(NUS_SPLIT.seen) + NUS and len(dm.class_names) == 1006
    rec = dm.read_images("test")
    nature = dm.class_names.index("nature")
    np.testing.assert_array_equal(rec.labels[:, nature], [-1, 1])  # "nature" is a seen tag (not a concept)
    np.testing.assert_array_equal(rec.labels[:, 925 + 55], [1, -1])  # concept 55 ("sky") from Labels_sky_Test
    assert (
        NusWideDataModule(nus, val_size=0, class_split="nuswide_925_81", classes="unseen").class_names == NUS
    )


def test_nuswide_bad_label_file_names_the_line(nus):
    (nus / "TrainTestLabels" / "Labels_sky_Test.txt").write_text("1\r\n0\r\nx\r\n", newline="")
    with pytest.raises(DataFormatError, match=r"Labels_sky_Test.txt:3: expected only 0/1 values, found 'x'"):
        read_nuswide(nus, "Test")
    (nus / "TrainTestLabels" / "Labels_sky_Test.txt").write_text("1\n0\n")
    with pytest.raises(DataFormatError, match=r"Labels_sky_Test.txt: 2 rows, expected 3"):
        read_nuswide(nus, "Test")


# ------------------------------------------------------------------------------------------------ protocol
def test_shipped_class_splits_partition_their_label_spaces():
    coco = load_class_split("coco2014_48_17")
    assert (len(coco.seen), len(coco.unseen)) == (48, 17) and not set(coco.seen) & set(coco.unseen)
    coco.check_against(COCO, "COCO")
    assert {"cat", "dog", "airplane", "scissors"} <= set(coco.unseen) and "Bansal" in coco.provenance
    assert (len(NUS_SPLIT.seen), len(NUS_SPLIT.unseen)) == (925, 81) and list(NUS_SPLIT.unseen) == NUS
    # the published rule: seen = the 1k tags that are not one of the 81 concepts, in tag-list order
    assert list(NUS_SPLIT.seen) == [t for t in TAGS if t not in set(NUS)]
    dm = Coco2014DataModule("/nonexistent", class_split="coco2014_48_17", classes="seen")
    assert dm.class_names == list(coco.seen) and dm.unseen_classes == list(coco.unseen)


def test_bad_class_split_fails_at_start_up(tmp_path):
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"seen": ["cat", "unicorn"], "unseen": ["dog"]}))
    with pytest.raises(
        DataFormatError, match=r"names 1 classes that coco2014's label space does not have: \['unicorn'\]"
    ):
        Coco2014DataModule("/nonexistent", class_split=str(bad), classes="seen")
    bad.write_text(json.dumps({"seen": ["cat", "dog"], "unseen": ["dog"]}))
    with pytest.raises(DataFormatError, match="both seen and unseen"):
        Coco2014DataModule("/nonexistent", class_split=str(bad))
    with pytest.raises(ValueError, match="needs data.class_split"):
        VOC2007DataModule("/nonexistent", classes="unseen")


def test_holdout_is_fixed_and_disjoint():
    tr, va = holdout(100, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va) and set(tr) | set(va) == set(range(100))
    np.testing.assert_array_equal(holdout(100, 20, seed=3)[1], va)
    assert not np.array_equal(holdout(100, 20, seed=4)[1], va)
    with pytest.raises(ValueError, match="leaves no training images"):
        holdout(10, 10, 0)


def test_partial_labels_saved_reloaded_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    from dbtr.data.images import ImageRecords

    rec = ImageRecords(
        tmp_path,
        [f"{i}.jpg" for i in range(400)],
        np.where(rng.random((400, 20)) < 0.2, 1, -1).astype(np.int8),
        [f"c{k}" for k in range(20)],
    )
    mask_file = tmp_path / "mask.npz"
    part, path = apply_partial_labels(rec, 0.3, seed=1, mask_file=mask_file)
    known = part.labels != 0
    assert path == mask_file and mask_file.is_file() and abs(known.mean() - 0.3) < 0.02
    np.testing.assert_array_equal(
        part.labels[known], rec.labels[known]
    )  # known labels unchanged, unknown = 0
    again, _ = apply_partial_labels(rec, 0.3, seed=999, mask_file=mask_file)  # the file wins over a new seed
    np.testing.assert_array_equal(again.labels, part.labels)
    with pytest.raises(DataFormatError, match="label_proportion=0.3, run asks 0.5"):
        apply_partial_labels(rec, 0.5, seed=1, mask_file=mask_file)
    with pytest.raises(DataFormatError, match="made for other file names"):
        apply_partial_labels(rec.subset(range(10)), 0.3, seed=1, mask_file=mask_file)


def test_datamodule_holdout_and_partial_train_images(tmp_path):
    root = synthetic.random_voc2007(tmp_path, num_trainval=30, num_test=5)
    dm = VOC2007DataModule(root, val_size=10, label_proportion=0.5, partial_file=str(tmp_path / "m.npz"))
    val, train = dm.read_images("val"), dm.train_images()
    assert len(val) == 10 and len(train) == 20 and not set(val.file_names) & set(train.file_names)
    assert (tmp_path / "m.npz").is_file() and 0.3 < (train.labels != 0).mean() < 0.7
    assert dm.has_val and not VOC2007DataModule(root, val_size=0).has_val


def test_frozen_image_list(tmp_path, voc):
    rec = read_voc2007(voc, "trainval")
    lst = write_image_list(tmp_path / "frozen.txt", rec.subset([2, 0]))
    got = restrict_to_list(rec, lst)
    assert got.file_names == ["JPEGImages/000005.jpg", "JPEGImages/000001.jpg"]
    np.testing.assert_array_equal(got.labels, rec.labels[[2, 0]])
    lst.write_text("JPEGImages/000002.jpg\n")
    with pytest.raises(DataFormatError, match=r"frozen.txt:1: JPEGImages/000002.jpg is not in this split"):
        restrict_to_list(rec, lst)


# ------------------------------------------------------------------------------------------------ image cache
class CountingEncoder:
    """Wraps a ClipEncoder and counts image-tower forwards."""

    def __init__(self, encoder):
        self.inner, self.calls = encoder, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_image(self, pixel_values):
        self.calls += 1
        return self.inner.encode_image(pixel_values)


def _voc_dm(root, **kw):
    dm = VOC2007DataModule(root, val_size=0, eval_batch_size=4, num_workers=0, **kw)
    dm.image_size = 32
    dm.setup("test")
    return dm


def test_image_cache_hit_matches_direct_features_and_rebuilds_corruption(tmp_path, encoder, caplog):
    root = synthetic.random_voc2007(tmp_path, num_trainval=2, num_test=10)
    enc = CountingEncoder(encoder)
    dm = _voc_dm(root)
    assert dm.cache_image_features(enc, ("test",), cache_dir=str(tmp_path / "cache")) == {"test": "built"}
    built_calls = enc.calls
    direct = _voc_dm(root)
    direct.cache_image_features(encoder, ("test",))  # in memory, fp32
    cached = dm.image_features["test"]
    np.testing.assert_allclose(
        np.asarray(cached.patch_embeds, np.float32),
        direct.image_features["test"].patch_embeds.numpy(),
        atol=2e-3,
    )  # fp16 storage
    dm2 = _voc_dm(root)
    assert dm2.cache_image_features(enc, ("test",), cache_dir=str(tmp_path / "cache")) == {"test": "hit"}
    assert enc.calls == built_calls  # no image forward on a hit
    batch = next(iter(dm2.test_dataloader()))
    assert batch["image_embeds"].dtype == torch.float32 and batch["patch_embeds"].shape[0] == 4
    # a flipped byte is detected and the entry rebuilt
    folder = next((tmp_path / "cache").glob("images-*"))
    arr = folder / "patch_embeds.npy"
    data = bytearray(arr.read_bytes())
    data[-7] ^= 0xFF
    arr.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert _voc_dm(root).cache_image_features(enc, ("test",), cache_dir=str(tmp_path / "cache")) == {
            "test": "rebuilt"
        }
    assert "does not match its checksum" in caplog.text
    # another dense mode or resolution is another entry
    encoder.dense = "naive" if encoder.dense != "naive" else "clearclip"
    assert _voc_dm(root).cache_image_features(encoder, ("test",), cache_dir=str(tmp_path / "cache")) == {
        "test": "built"
    }
    assert len(list((tmp_path / "cache").glob("images-*"))) == 2


def test_bad_image_error_or_counted_skip(tmp_path, encoder):
    root = synthetic.random_voc2007(tmp_path, num_trainval=2, num_test=6)
    bad = root / "JPEGImages" / "000005.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(Exception, match=r"cannot decode image .*000005.jpg"):
        _voc_dm(root).cache_image_features(encoder, ("test",))
    dm = _voc_dm(root, on_bad_image="skip")
    dm.cache_image_features(encoder, ("test",), cache_dir=str(tmp_path / "cache"))
    assert dm.test_records.skipped == ["JPEGImages/000005.jpg"] and len(dm.test_records) == 5
    assert len(dm.test_dataloader().dataset) == 5
    report = dm.image_report()["test"]
    assert report["skipped"] == ["JPEGImages/000005.jpg"] and report["num_items"] == 5
    # without a cache the images are scanned once before evaluation
    dm = _voc_dm(root, on_bad_image="skip")
    assert len(dm.test_dataloader().dataset) == 5 and dm.test_records.skipped == ["JPEGImages/000005.jpg"]


# ------------------------------------------------------------------------------------------------ CLIs
@pytest.mark.slow
def test_dbtr_data_reports_a_native_split(tmp_path, voc):
    from cli_helpers import run_cli

    (voc / "JPEGImages" / "000004.jpg").write_bytes(b"truncated")
    out = tmp_path / "stats.json"
    proc = run_cli(
        "dbtr-data",
        "data=voc2007",
        f"data.root={voc}",
        "data.split=test",
        "data.on_bad_image=skip",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    stats = json.loads(out.read_text())
    want = expected_voc(["000002"])  # 000004 cannot be decoded: skipped and listed
    assert stats["num_items"] == 1 and stats["classes"] == list(VOC_CLASSES)
    assert (
        stats["positives"] == (want == 1).sum(0).tolist()
        and stats["difficult"] == (want == 0).sum(0).tolist()
    )
    assert stats["missing_images"] == 0 and stats["skipped"] == ["JPEGImages/000004.jpg"]
    assert (tmp_path / "evaluated_test.txt").read_text() == "JPEGImages/000002.jpg\n"
    assert "tvmonitor" in proc.stdout
    # the default (error) names the file
    proc = run_cli(
        "dbtr-data",
        "data=voc2007",
        f"data.root={voc}",
        f"hydra.run.dir={tmp_path / 'run2'}",
        cwd=tmp_path,
        check=False,
    )
    assert (
        proc.returncode != 0
        and "cannot decode image" in proc.stderr + proc.stdout
        and "000004.jpg" in proc.stderr + proc.stdout
    )


@pytest.mark.slow
def test_train_then_eval_on_native_voc_with_disk_cache(tmp_path, demo_dir):
    """dbtr-train on VOC2007's native layout (a small caption file, a tiny random CLIP), features cached on
    disk; dbtr-eval then reads the same cache entry and reproduces the test numbers."""
    from cli_helpers import run_cli
    from dbtr.text.synonyms import builtin_vocabulary

    root = synthetic.random_voc2007(tmp_path / "voc", num_trainval=24, num_test=16)
    names = builtin_vocabulary("voc2007").prompt_names
    captions = tmp_path / "captions.txt"  # two per class: seconds, not the 20 x 81 class sentences
    captions.write_text(
        "".join(f"a photo of a {a}.\na {a} next to a {b}.\n" for a, b in zip(names, names[1:] + names[:1]))
    )
    common = [
        "data=voc2007",
        f"data.root={root}",
        "clip=tiny",
        f"paths.tiny_dir={demo_dir}",
        "data.num_workers=0",
        f"cache_dir={tmp_path / 'cache'}",
        "cache_image_features=disk",
    ]
    run_cli(
        "dbtr-train",
        *common,
        "data.val_size=8",
        f"data.corpus.sources=[{{type: text_lines, path: {captions}}}]",
        "data.corpus.class_sentences=null",
        "data.batch_size=64",
        "trainer.max_epochs=2",
        f"hydra.run.dir={tmp_path / 'train'}",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    report = json.loads((tmp_path / "train" / "data_report.json").read_text())
    assert report["val"]["num_items"] == 8 and report["test"]["num_items"] == 16
    assert len(list((tmp_path / "cache").glob("images-*"))) == 2  # val and test entries
    ckpt = metrics["checkpoint"]
    proc = run_cli(
        "dbtr-eval", *common, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path
    )
    assert "'test': 'hit'" in proc.stdout + proc.stderr
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert evaluated["test/mAP"] == pytest.approx(metrics["test"]["test/mAP"], abs=1e-6)
