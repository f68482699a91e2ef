"""The local branch's spatial attention as exposed for heatmaps: the head's own softmax, on the patch grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dbtr.models.heads import DualBranchHead
from dbtr.system.lit_module import DbtrLitModule, attention_grid


def _head(**kwargs) -> DualBranchHead:
    head = DualBranchHead(5, 16, **kwargs)
    with torch.no_grad():
        if head.local_classifier.residual is not None:
            head.local_classifier.residual.normal_(0.0, 0.3)
    head.set_class_embeddings(torch.randn(5, 16))
    return head


def test_local_attention_is_the_forward_spatial_softmax():
    torch.manual_seed(0)
    head = _head(pfa="both")
    g, loc = F.normalize(torch.randn(3, 16), dim=-1), F.normalize(torch.randn(3, 9, 16), dim=-1)
    att = head.local_attention(loc)
    assert torch.equal(att, head(g, loc).local_attention)
    t_l = F.normalize(head.class_embeds + 0.5 * head.local_classifier.residual, dim=-1)
    torch.testing.assert_close(att, torch.softmax(head.tau_image * loc @ t_l.t(), dim=1))
    torch.testing.assert_close(att.sum(1), torch.ones(3, 5))


def test_local_attention_on_text_uses_tau_text_and_ignores_padding():
    torch.manual_seed(1)
    head = _head(pfa="none")
    loc = F.normalize(torch.randn(2, 6, 16), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    att = head.local_attention(loc, mask, modality="text")
    assert torch.equal(
        att, head(F.normalize(torch.randn(2, 16), dim=-1), loc, mask, modality="text").local_attention
    )
    assert att[0, 3:].abs().sum() == 0
    t_l = F.normalize(head.class_embeds + 0.5 * head.local_classifier.residual, dim=-1)
    torch.testing.assert_close(att[0, :3], torch.softmax(head.tau_text * loc[0, :3] @ t_l.t(), dim=0))


def test_local_attention_needs_a_local_branch():
    head = _head(use_local=False, pfa="none")
    with pytest.raises(ValueError, match="no local branch"):
        head.local_attention(torch.randn(1, 4, 16))


def test_attention_grid_is_row_major_and_rejects_non_square():
    att = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    with pytest.raises(ValueError, match="square grid"):
        attention_grid(att)
    att = torch.randn(2, 12, 3)[:, :9]
    grid = attention_grid(att)
    for n in range(9):
        assert torch.equal(grid[:, :, n // 3, n % 3], att[:, n, :])


def test_model_attention_maps_are_the_heads_maps_on_the_patch_grid(encoder):
    torch.manual_seed(2)
    names = ["red", "green", "blue", "yellow", "purple", "orange"]
    model = DbtrLitModule(clip={"name_or_path": "unused"}, class_names=names, encoder=encoder).eval()
    with torch.no_grad():
        model.head.local_classifier.residual.normal_(0.0, 0.3)
    pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    maps = model.attention_maps(pixels)
    local = model(pixels).local_attention
    g = math.isqrt(local.shape[1])
    assert maps.shape == (2, len(names), g, g) and g > 1
    torch.testing.assert_close(maps, local.permute(0, 2, 1).reshape(2, len(names), g, g))
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(2, len(names)))
