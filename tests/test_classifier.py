from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbtr.text.names import validate_class_names
from dbtr.text.templates import IMAGENET_TEMPLATES, get_templates
from dbtr.zeroshot.classifier import build_class_embeddings


def test_template_ensemble_is_mean_of_normalised_then_renormalised(encoder):
    names = ["red", "blue"]
    templates = ["a photo of a {}.", "a drawing of the {}.", "{} thing"]
    got = build_class_embeddings(encoder, names, templates)
    for i, name in enumerate(names):
        embs = []
        for t in templates:
            tok = encoder.tokenize([t.format(name)])
            embs.append(F.normalize(encoder.model.get_text_features(**tok).pooler_output[0], dim=-1))
        ref = F.normalize(torch.stack(embs).mean(0), dim=-1)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


def test_prompt_names_write_a_class_as_another_text(encoder):
    templates = ["a photo of a {}.", "{} thing"]
    got = build_class_embeddings(
        encoder, ["red", "diningtable"], templates, prompt_names={"red": "purple box"}
    )
    torch.testing.assert_close(got[0], build_class_embeddings(encoder, ["purple box"], templates)[0])
    # classes without an entry keep their label name, VOC's devkit names written as words
    torch.testing.assert_close(got[1], build_class_embeddings(encoder, ["dining table"], templates)[0])
    verbatim = build_class_embeddings(
        encoder, ["diningtable"], templates, prompt_names={"diningtable": "diningtable"}
    )
    assert not torch.allclose(verbatim[0], got[1], atol=1e-4)


def test_imagenet_set_has_80_distinct_templates():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all("{}" in t for t in IMAGENET_TEMPLATES)
    assert get_templates("simple") == ("a photo of a {}.",)


@pytest.mark.parametrize(
    "names, match",
    [
        ([], "no class names"),
        (["cat", ""], "empty class name"),
        (["cat", "dog", "cat"], "duplicated.*'cat'.*0 and 2"),
    ],
)
def test_bad_class_lists(names, match):
    with pytest.raises(ValueError, match=match):
        validate_class_names(names)


def test_bad_templates():
    with pytest.raises(ValueError, match="placeholder"):
        get_templates(["no placeholder here"])
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("nope")
