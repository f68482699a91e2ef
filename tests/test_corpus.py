"""Caption sources in their real layouts, corpus assembly, NUS-WIDE balancing, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbtr.data.labels import DataFormatError
from dbtr.text.corpus import (
    balance_by_rarest_class,
    build_corpus,
    class_sentences,
    coco_captions,
    narratives,
    text_lines,
)
from dbtr.text.synonyms import SynonymVocabulary

VOCAB = SynonymVocabulary({"dog": ["dog", "puppy"], "cat": ["cat", "kitten"], "hot dog": ["hot dog"]})


def test_coco_captions_layout(tmp_path):
    f = tmp_path / "captions_train2017.json"
    f.write_text(json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 9, "caption": "A dog."},
                                                          {"id": 2, "image_id": 9, "caption": "Two kittens."}]}))
    assert [t for _, t in coco_captions(f)] == ["A dog.", "Two kittens."]
    f.write_text(json.dumps({"annotations": [{"id": 1}]}))
    with pytest.raises(DataFormatError, match=r"annotations\[0\] has no string 'caption'"):
        list(coco_captions(f))
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(DataFormatError, match="'annotations' list"):
        list(coco_captions(f))


def test_narratives_and_text_lines(tmp_path):
    f = tmp_path / "open_images_train_v6_captions.jsonl"
    f.write_text(json.dumps({"image_id": "a", "caption": "In this image I can see a dog."}) + "\n" + '{"image_id": "b"}\n')
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
        "num_items": 2, "read": 4, "classes": ["dog", "cat", "hot dog"], "positives": [1, 1, 1],
        "dropped": {"no_synonym_match": 1, "empty": 1}, "labels_per_caption": {"1": 1, "2": 1},
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
    texts, _, report = build_corpus([(f"f:{i}", t) for i, t in enumerate(["a dog", "a dog", "a dog", "a cat"])], VOCAB,
                                    max_per_class=2)
    assert texts == ["a dog", "a dog", "a cat"] and report.dropped == {"over_class_cap": 1}
    assert report.as_dict()["classes_without_caption"] == ["hot dog"]
