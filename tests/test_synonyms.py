"""Caption -> label matching on lemmas, against hand-computed labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbtr.text.synonyms import SynonymVocabulary, VocabularyError, load_vocabulary, vocabulary_from_names

VOCAB = {
    "dog": ["dog", "puppy"],
    "hot dog": ["hot dog"],
    "motorbike": ["motor bike", "motor cycle"],
    "person": ["person", "man", "woman", "people", "child"],
    "leaf": ["leaf"],
    "skis": ["skis", "ski"],
    "dining table": ["dining table", "table"],
}


@pytest.fixture(scope="module")
def vocab():
    return SynonymVocabulary(VOCAB)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two DOGS play with a puppy.", ["dog"]),  # plural + case + synonym
        ("a man eating a hot dog", ["hot dog", "person"]),  # compound consumed: no "dog"
        ("a hot dog next to a dog", ["dog", "hot dog"]),  # the second, separate "dog" still counts
        ("a red motorbike", ["motorbike"]),  # compound registered without its space
        ("motor bikes parked in a row", ["motorbike"]),  # plural inside a compound
        ("leaves on the ground", ["leaf"]),  # irregular plural
        ("children skiing down a slope", ["person", "skis"]),  # irregular plural, verb form
        ("a dining table and a table", ["dining table"]),  # overlapping synonyms of one class
        ("a cat on a sofa", []),
    ],
)
def test_matching_against_hand_labels(vocab, text, expected):
    assert [vocab.class_names[i] for i in vocab.match(text)] == sorted(expected, key=vocab.class_names.index)


def test_label_matrix(vocab):
    got = vocab.label(["a dog", "a cat"])
    want = -np.ones((2, len(VOCAB)), dtype=np.int8)
    want[0, 0] = 1
    np.testing.assert_array_equal(got, want)
    assert vocab.prompt_names[2] == "motor bike"


def test_synonym_shared_by_two_classes_names_both():
    with pytest.raises(VocabularyError, match=r"'table' belongs to both 'dining table' and 'desk'"):
        SynonymVocabulary({"dining table": ["dining table", "table"], "desk": ["desk", "table"]})
    with pytest.raises(VocabularyError, match="'motorbike' belongs to both"):
        SynonymVocabulary({"motorbike": ["motor bike"], "bike": ["motorbike"]})
    with pytest.raises(VocabularyError, match="non-empty list"):
        SynonymVocabulary({"dog": []})


def test_inflections_of_one_word_in_two_classes_are_a_shared_synonym():
    with pytest.raises(VocabularyError, match=r"'balls' of class 'toy' and 'ball' of class 'sport'"):
        SynonymVocabulary({"sport": ["ball"], "toy": ["balls"]})
    with pytest.raises(VocabularyError, match=r"'red balls' of class 'b' and 'red ball' of class 'a'"):
        SynonymVocabulary({"a": ["red ball"], "b": ["red balls"]})
    assert SynonymVocabulary({"ball": ["ball", "balls"]}).match("two balls") == [0]  # within one class: fine


def test_a_synonym_without_letters_or_digits_is_refused():
    # tokenised to nothing, it would be found in every caption
    with pytest.raises(
        VocabularyError, match=r"class 'dog' has the synonym '--', which has no letter or digit"
    ):
        SynonymVocabulary({"dog": ["dog", "--"], "cat": ["cat"]})


def test_vocabulary_file(tmp_path):
    f = tmp_path / "v.json"
    f.write_text(json.dumps(VOCAB))
    assert load_vocabulary(f).class_names == list(VOCAB)
    f.write_text('{"dog": ["dog"],\n "cat": }')
    with pytest.raises(VocabularyError, match=r"v.json:2: malformed JSON"):
        load_vocabulary(f)
    with pytest.raises(FileNotFoundError, match="class -> \\[synonyms\\]"):
        load_vocabulary(tmp_path / "none.json")
    assert vocabulary_from_names(["cat", "dog"]).match("two cats") == [0]


def test_toy_world_captions_get_their_generator_labels(tmp_path):
    """The toy world's synonyms.json recovers exactly the classes each generated caption mentions."""
    from dbtr.toyworld.build import build_toyworld

    root = build_toyworld(tmp_path / "tw", num_captions=300, num_val=1, num_test=1)
    vocab = load_vocabulary(root / "synonyms.json")
    for line in (root / "captions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert [vocab.class_names[i] for i in vocab.match(rec["text"])] == rec["labels"], rec["text"]


def test_builtin_vocabularies_cover_the_datasets_in_standard_order():
    from dbtr.text.synonyms import builtin_vocabulary

    voc, coco, nus = (builtin_vocabulary(n) for n in ("voc2007", "coco2014", "nuswide"))
    assert (
        len(voc.class_names) == 20
        and voc.class_names[10] == "diningtable"
        and voc.prompt_names[10] == "dining table"
    )
    assert voc.class_names[-1] == "tvmonitor"
    assert (
        len(coco.class_names) == 80
        and coco.class_names[0] == "person"
        and coco.class_names[-1] == "toothbrush"
    )
    assert len(nus.class_names) == 81 and nus.class_names[0] == "airport" and nus.class_names[-1] == "zebra"
    with pytest.raises(ValueError, match="unknown vocabulary"):
        builtin_vocabulary("imagenet")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A teddy bear sitting next to a bear statue", ["bear", "teddy bear"]),
        ("Two hot dogs and a cell phone on a dining table", ["hot dog", "dining table", "cell phone"]),
        ("A kitchen with a stove, a fridge and a microwave.", ["microwave", "oven", "refrigerator"]),
        ("People skiing down a snowy hill", ["person", "skis"]),
        ("A man riding a wave on top of a surfboard.", ["person", "surfboard"]),
    ],
)
def test_coco_vocabulary_on_hand_labelled_captions(text, expected):
    from dbtr.text.synonyms import builtin_vocabulary

    coco = builtin_vocabulary("coco2014")
    assert [coco.class_names[i] for i in coco.match(text)] == sorted(expected, key=coco.class_names.index)


# --------------------------------------------------------------- TaI-DPT's own lists (data.corpus.vocabulary)
@pytest.mark.parametrize("dataset", ["voc2007", "coco2014", "nuswide"])
def test_taidpt_lists_have_dbtrs_label_space_and_every_synonym_labels_its_class_alone(dataset):
    from dbtr.text.synonyms import builtin_vocabulary

    ours, theirs = builtin_vocabulary(dataset), builtin_vocabulary(f"taidpt_{dataset}")
    assert theirs.class_names == ours.class_names  # same label columns as the dataset readers
    for ci, (cls, syns) in enumerate(theirs.synonyms.items()):
        for syn in syns:  # no synonym is swallowed by another class's longer phrase or shared inflection
            assert theirs.match(f"there is a {syn} here") == [ci], (cls, syn)


def test_taidpt_class_names_are_its_own():
    """TaI-DPT's class names (datasets/data_helpers.py: voc_object_categories, the first synonym of each COCO
    and NUS-WIDE list) are the vocabularies' first synonyms: what data.corpus.prompt_names=vocabulary
    prompts."""
    from dbtr.text.synonyms import builtin_vocabulary

    voc, coco, nus = (builtin_vocabulary(f"taidpt_{n}") for n in ("voc2007", "coco2014", "nuswide"))
    assert voc.prompt_names == voc.class_names  # the devkit names as they are: "diningtable", "tvmonitor"
    assert voc.prompt_names[10] == "diningtable" and voc.prompt_names[13] == "motorbike"
    differ = {c: p for c, p in zip(coco.class_names, coco.prompt_names) if c != p}
    assert differ == {"motorcycle": "motor bike", "airplane": "aeroplane"}
    assert nus.prompt_names == nus.class_names and nus.prompt_names[4] == "birds"
    assert (len(voc.synonyms["bus"]), len(coco.synonyms["hair drier"]), len(nus.synonyms["earthquake"])) == (
        9,
        7,
        4,
    )


@pytest.mark.parametrize(
    "dataset, text, expected",
    [
        # phrases of TaI-DPT's own lists, each labelled by hand from them
        ("voc2007", "a double decker drives past a man on a motor bike", ["bus", "motorbike", "person"]),
        ("voc2007", "two puppies sleep on the couch next to the telly", ["dog", "sofa", "tvmonitor"]),
        ("voc2007", "a bonsai on the dinner table", ["diningtable", "pottedplant"]),
        ("voc2007", "a woman sits on a bench near the railroad", ["chair", "person", "train"]),
        ("voc2007", "an air plane and a dinghy", ["aeroplane", "boat"]),
        ("coco2014", "a teddy bear next to a bear", ["bear", "teddy bear"]),
        ("coco2014", "a hot dog and a knapsack on the dining table", ["backpack", "hot dog", "dining table"]),
        (
            "coco2014",
            "a man holds a tennis racket and a tennis ball",
            ["person", "sports ball", "tennis racket"],
        ),
        ("coco2014", "a woman uses a blow dryer by the icebox", ["person", "hair drier", "refrigerator"]),
        ("coco2014", "she uses a blow dryer", ["hair drier"]),  # "she" is no synonym of person in its list
        ("coco2014", "a motorcycle parked by a fire tap", ["motorcycle", "fire hydrant"]),
        ("nuswide", "swimmers in the sea under the clouds", ["clouds", "ocean", "swimmers"]),
        ("nuswide", "a broken building after the earthquake", ["earthquake"]),
        ("nuswide", "the bride and groom by the lake at night", ["lake", "nighttime", "wedding"]),
        ("nuswide", "troops march down the street", ["military", "street"]),
    ],
)
def test_taidpt_lists_on_hand_labelled_phrases(dataset, text, expected):
    from dbtr.text.synonyms import builtin_vocabulary

    vocab = builtin_vocabulary(f"taidpt_{dataset}")
    assert [vocab.class_names[i] for i in vocab.match(text)] == sorted(expected, key=vocab.class_names.index)
