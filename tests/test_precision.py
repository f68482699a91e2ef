"""A bf16 CLIP (clip.dtype=bfloat16, for accelerators) or autocast leaves the head in float32: its parameters,
its logits, and results close to the all-fp32 model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dbtr.models.heads import DualBranchHead
from dbtr.system.lit_module import DbtrLitModule

NAMES = ["cat", "dog", "car", "tree"]


def _model(clip_dir, dtype: str) -> DbtrLitModule:
    torch.manual_seed(0)
    model = DbtrLitModule(
        clip={"name_or_path": str(clip_dir), "dtype": dtype},
        class_names=NAMES,
        templates="simple",
        head={"pfa": "both"},
    )
    with torch.no_grad():  # the same non-zero residuals in both models
        g = torch.Generator().manual_seed(1)
        for p in model.head.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_bf16_clip_keeps_the_head_fp32_and_close_to_fp32(clip_dir):
    fp32, bf16 = _model(clip_dir, "float32"), _model(clip_dir, "bfloat16")
    assert next(bf16.encoder.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.head.parameters())
    size = fp32.encoder.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = fp32(pixels), bf16(pixels)
    for a, b in (
        (got.logits, want.logits),
        (got.logits_global, want.logits_global),
        (got.logits_local, want.logits_local),
    ):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() < 0.05 * b.abs().max()  # bf16 features (8-bit mantissa), fp32 head
    assert bf16.head.class_embeds.dtype == torch.float32


def test_autocast_does_not_lower_the_head_precision():
    g = torch.Generator().manual_seed(0)
    head = DualBranchHead(5, 16, pfa="both")
    head.set_class_embeddings(torch.randn(5, 16, generator=g))
    f_g = F.normalize(torch.randn(4, 16, generator=g), dim=-1).bfloat16()
    feats = F.normalize(torch.randn(4, 6, 16, generator=g), dim=-1).bfloat16()
    want = head(f_g, feats, modality="image").logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(f_g, feats, modality="image").logits
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
