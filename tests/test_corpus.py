"""Caption sources in their real layouts, corpus assembly, NUS-WIDE balancing, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import run_cli
from dbtr.data.corpus import (
    balance_by_rarest_class,
    build_corpus,
    class_sentences,
    coco_captions,
    corpus_prompt_names,
    load_caption_ids,
    narratives,
    text_lines,
)
from dbtr.text.synonyms import SynonymVocabulary
from dbtr.utils.files import DataFormatError

VOCAB = SynonymVocabulary({"dog": ["dog", "puppy"], "cat": ["cat", "kitten"], "hot dog": ["hot dog"]})


def test_coco_captions_layout(tmp_path):
    f = tmp_path / "captions_train2017.json"
    f.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [
                    {"id": 1, "image_id": 9, "caption": "A dog."},
                    {"id": 2, "image_id": 9, "caption": "Two kittens."},
                ],
            }
        )
    )
    assert [t for _, t in coco_captions(f)] == ["A dog.", "Two kittens."]
    f.write_text(json.dumps({"annotations": [{"id": 1}]}))
    with pytest.raises(DataFormatError, match=r"annotations\[0\] has no string 'caption'"):
        list(coco_captions(f))
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(DataFormatError, match="'annotations' list"):
        list(coco_captions(f))


def _coco(tmp_path, captions: dict[int, str]):
    f = tmp_path / "captions_train2017.json"
    anns = [{"id": i, "image_id": 7, "caption": c} for i, c in captions.items()]
    f.write_text(json.dumps({"annotations": anns}))
    return f


def test_coco_captions_restricted_to_an_id_list_in_its_order(tmp_path):
    import pickle

    f = _coco(tmp_path, {37: "A dog.", 5: "A cat.", 49: "Two dogs.", 89: "A kitten."})
    ids = tmp_path / "sampled_idx.pkl"
    ids.write_bytes(pickle.dumps([89, 37, 49], protocol=5))  # TaI-DPT's file: a pickled list of ints
    assert [t for _, t in coco_captions(f, ids=ids)] == ["A kitten.", "A dog.", "Two dogs."]
    txt = tmp_path / "ids.txt"
    txt.write_text("5\n\n89\n")
    assert [t for _, t in coco_captions(f, ids=txt)] == ["A cat.", "A kitten."]
    (tmp_path / "ids.json").write_text("[49]")
    assert load_caption_ids(tmp_path / "ids.json") == [49]
    ids.write_bytes(pickle.dumps([89, 1000, 2000]))
    with pytest.raises(
        DataFormatError, match=r"2 of its 3 caption ids are not annotation ids .*\[1000, 2000\]"
    ):
        list(coco_captions(f, ids=ids))


def test_caption_id_lists_that_could_run_code_or_are_malformed_are_refused(tmp_path):
    import os
    import pickle

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(os.getcwd))  # a pickle that would call a function when loaded
    with pytest.raises(DataFormatError, match="references posix.getcwd; only a plain list of integers"):
        load_caption_ids(bad)
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataFormatError, match="expected a caption id list"):
        load_caption_ids(bad)
    bad.write_bytes(pickle.dumps([3, 4, 3]))
    with pytest.raises(DataFormatError, match="1 caption ids are listed more than once"):
        load_caption_ids(bad)
    (tmp_path / "ids.txt").write_text("12\nx\n")
    with pytest.raises(DataFormatError, match="every line must be one integer"):
        load_caption_ids(tmp_path / "ids.txt")
    with pytest.raises(FileNotFoundError, match="coco_caption_text_embed_sampled_idx.pkl"):
        load_caption_ids(tmp_path / "absent.pkl")


def test_prompt_names_from_the_vocabulary_or_the_labels():
    from dbtr.data.datamodule import TextToImageDataModule

    spec = {"vocabulary": "taidpt_coco2014", "sources": []}
    assert corpus_prompt_names(spec, ["person"]) is None  # default: labels
    names = corpus_prompt_names({**spec, "prompt_names": "vocabulary"}, ["person", "motorcycle", "airplane"])
    assert names == {"person": "person", "motorcycle": "motor bike", "airplane": "aeroplane"}
    dm = TextToImageDataModule(corpus={"vocabulary": "taidpt_voc2007", "prompt_names": "vocabulary"})
    assert dm.prompt_names["diningtable"] == "diningtable" and len(dm.prompt_names) == 20
    assert TextToImageDataModule(corpus={"vocabulary": "voc2007"}).prompt_names is None
    with pytest.raises(
        ValueError, match="data.corpus.prompt_names=names is not allowed; choose one of: labels"
    ):
        TextToImageDataModule(corpus={"vocabulary": "voc2007", "prompt_names": "names"})


def test_narratives_and_text_lines(tmp_path):
    f = tmp_path / "open_images_train_v6_captions.jsonl"
    f.write_text(
        json.dumps({"image_id": "a", "caption": "In this image I can see a dog."})
        + "\n"
        + '{"image_id": "b"}\n'
    )
    with pytest.raises(DataFormatError, match=r"captions.jsonl:2: missing or non-string field 'caption'"):
        list(narratives(f))
    t = tmp_path / "caps.txt"
    t.write_text("a dog\n\n a cat \n")
    assert [x for x in text_lines(t)] == [(f"{t}:1", "a dog"), (f"{t}:3", "a cat")]


def test_class_sentences_follow_taidpt_counts():
    texts, labels = class_sentences(VOCAB, simple_count=9)
    assert len(texts) == 3 * 89 and texts[0] == "a photo of a dog." and texts[9] == "a bad photo of a dog."
    assert (labels == 1).sum(1).tolist() == [1] * len(texts) and labels[89 * 2, 2] == 1


def test_build_corpus_counts_every_drop():
    sources = [("f:1", "a dog and a kitten"), ("f:2", "a tree"), ("f:3", "   "), ("f:4", "a hot dog")]
    texts, labels, report = build_corpus(sources, VOCAB)
    assert texts == ["a dog and a kitten", "a hot dog"]
    np.testing.assert_array_equal(labels, [[1, 1, -1], [-1, -1, 1]])
    assert report.as_dict() == {
        "num_items": 2,
        "read": 4,
        "classes": ["dog", "cat", "hot dog"],
        "positives": [1, 1, 1],
        "truncated": None,
        "dropped": {"no_synonym_match": 1, "empty": 1},
        "labels_per_caption": {"1": 1, "2": 1},
        "classes_without_caption": [],
    }
    with pytest.raises(DataFormatError, match="no labelled caption"):
        build_corpus([("f:1", "a tree")], VOCAB)


def test_rarest_class_balancing_by_hand():
    # class frequencies: 0 -> 4, 1 -> 2, 2 -> 1
    labels = np.array([[1, 1, -1], [1, -1, -1], [1, -1, 1], [1, 1, -1], [-1, -1, -1]])
    # row 0 -> class 1 (rarer than 0), row 1 -> class 0, row 2 -> class 2, row 3 -> class 1 (cap 1: dropped)
    assert balance_by_rarest_class(labels, max_per_class=1).tolist() == [0, 1, 2]
    assert balance_by_rarest_class(labels, max_per_class=5).tolist() == [0, 1, 2, 3]
    texts, _, report = build_corpus(
        [(f"f:{i}", t) for i, t in enumerate(["a dog", "a dog", "a dog", "a cat"])], VOCAB, max_per_class=2
    )
    assert texts == ["a dog", "a dog", "a cat"] and report.dropped == {"over_class_cap": 1}
    assert report.as_dict()["classes_without_caption"] == ["hot dog"]


def test_datamodule_builds_its_captions_from_a_corpus(tmp_path):
    from dbtr.data.datamodule import TextToImageDataModule

    caps = tmp_path / "caps.txt"
    caps.write_text("a dog on a sofa\nthe tree\na kitten\n")
    coco = tmp_path / "captions_train2017.json"
    coco.write_text(json.dumps({"annotations": [{"caption": "two cats and a dog"}]}))
    spec = {
        "vocabulary": "voc2007",
        "class_sentences": 1,
        "max_per_class": None,
        "sources": [{"type": "text_lines", "path": str(caps)}, {"type": "coco_captions", "path": str(coco)}],
    }
    dm = TextToImageDataModule(corpus=spec)
    dm.setup("fit")
    assert dm.class_names[0] == "aeroplane" and len(dm.class_names) == 20
    assert dm.captions.texts[:3] == ["a dog on a sofa", "a kitten", "two cats and a dog"]
    assert len(dm.captions.texts) == 3 + 20 * 81 and dm.corpus_report.dropped == {"no_synonym_match": 1}
    with pytest.raises(ValueError, match="must be equal and in the same order"):
        TextToImageDataModule(classes=["dog", "cat"], corpus=spec).setup("fit")
    with pytest.raises(ValueError, match="sources\\[0\\].type must be one of"):
        TextToImageDataModule(corpus={**spec, "sources": [{"type": "pdf", "path": "x"}]}).setup("fit")


def test_dbtr_data_cli_writes_stats(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("a dog on a sofa\nthe tree\n")
    out = tmp_path / "stats.json"
    proc = run_cli(
        "dbtr-data",
        "data=corpus",
        "data.corpus.vocabulary=voc2007",
        f"data.corpus.sources=[{{type: text_lines, path: {caps}}}]",
        "data.corpus.class_sentences=null",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=300,
    )
    stats = json.loads(out.read_text())
    assert stats["num_items"] == 1 and stats["dropped"] == {"no_synonym_match": 1}
    assert stats["positives"][stats["classes"].index("dog")] == 1 and len(stats["classes"]) == 20
    assert "18 of 20 classes have no training caption" in proc.stderr + proc.stdout


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_hf_datasets_source_on_local_files(tmp_path, fmt):
    pd = pytest.importorskip("pandas")
    from dbtr.data.corpus import hf_dataset

    frame = pd.DataFrame({"caption": ["a dog", "two kittens"], "id": [1, 2]})
    f = tmp_path / f"caps.{fmt}"
    {
        "json": lambda: frame.to_json(f, orient="records", lines=True),
        "csv": lambda: frame.to_csv(f, index=False),
        "parquet": lambda: frame.to_parquet(f),
    }[fmt]()
    assert [t for _, t in hf_dataset(fmt, data_files=str(f))] == ["a dog", "two kittens"]
    with pytest.raises(DataFormatError, match="no column 'text'"):
        list(hf_dataset(fmt, data_files=str(f), column="text"))


def test_truncated_captions_are_counted(encoder):
    from dbtr.data.corpus import count_truncated

    long = " ".join(["red"] * (encoder.max_length + 5))
    assert count_truncated(encoder.tokenizer, ["a red box", long, long], encoder.max_length) == 2


@pytest.mark.slow
def test_dbtr_train_on_a_synonym_labelled_corpus(tmp_path):
    """The toy world's plain captions + its synonyms.json through `data=corpus`, trained and tested end to
    end."""
    from dbtr.toyworld.build import build_toyworld

    tw = build_toyworld(tmp_path / "tw", num_captions=300, num_val=40, num_test=60)
    run = tmp_path / "run"
    overrides = [
        "experiment=toyworld",
        "data=corpus",
        f"data.corpus.vocabulary={tw / 'synonyms.json'}",
        f"data.corpus.sources=[{{type: text_lines, path: {tw / 'captions.txt'}}}]",
        "data.corpus.class_sentences=null",
        f"data.val_images={tw / 'images'}",
        f"data.val_labels={tw / 'val.jsonl'}",
        f"data.test_images={tw / 'images'}",
        f"data.test_labels={tw / 'test.jsonl'}",
        "data.image_size=64",
        "+data.mean=[0.5,0.5,0.5]",
        "+data.std=[0.5,0.5,0.5]",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "model.scheduler.warmup_epochs=0",
        f"hydra.run.dir={run}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    run_cli("dbtr-train", *overrides, cwd=tmp_path)
    report = json.loads((run / "corpus_report.json").read_text())
    assert report["num_items"] == 300 and report["dropped"] == {} and report["truncated"] == 0
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert metrics["test/mAP"] > 50  # the shipped toy CLIP, trained on matched labels, far above chance (~17)
    assert any(p.name.startswith("captions-") for p in (tmp_path / "cache").iterdir())
