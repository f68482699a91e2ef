"""The head's parameter-free attention (identities + chunked max pool) against the explicit formulation it
replaced: outputs and gradients equal to float32 round-off (docs/method.md §3.4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dbtr.models.heads as heads
from dbtr.models.heads import DualBranchHead, masked_max, masked_mean, masked_softmax, spatial_aggregation


def _reference_pfa(local, classes, mask, temperature):
    """The explicit formulation: (B, C, D) attended text and (B, N, D) attended locals."""
    sim = local @ classes.t() / temperature
    m = None if mask is None else mask[..., None]
    over_space = masked_softmax(sim, m, dim=1)
    over_classes = torch.softmax(sim, dim=2)
    text_attended = over_space.transpose(1, 2) @ local
    local_attended = over_classes @ classes
    pooled = masked_mean(local_attended, m, dim=1) + masked_max(local_attended, m, dim=1)
    return text_attended, pooled


def _reference_forward(h: DualBranchHead, f_g, feats, mask, modality):
    """DualBranchHead.forward as it was before the PFA identities (same parameters, no noise)."""
    f_g, feats = f_g.float(), feats.float()

    def pfa(query, classes):
        text_att, pooled = _reference_pfa(feats, classes, mask, h.pfa_temperature)
        z = h.logit_scale * (
            h.beta2 * torch.einsum("bd,bcd->bc", query, text_att) + h.beta3 * pooled @ classes.t()
        )
        return z - z.mean(dim=1, keepdim=True) if h.pfa_center else z

    t_g = h.global_classifier(h.class_embeds)
    z_g = h.logit_scale * f_g @ t_g.t()
    if h.pfa in ("global", "both"):
        z_g = z_g + pfa(f_g, t_g)
    z_l = None
    if h.use_local:
        t_l = h.local_classifier(h.class_embeds)
        tau = h.tau_text if modality == "text" else h.tau_image
        z_l = spatial_aggregation(feats @ t_l.t(), mask, tau, h.logit_scale)[0]
        if h.pfa in ("local", "both"):
            m = None if mask is None else mask[..., None]
            query = f_g if h.pfa_local_query == "global" else F.normalize(masked_mean(feats, m, 1), dim=-1)
            z_l = z_l + pfa(query, t_l)
    score = z_g if z_l is None else h.merge_weight * z_g + (1.0 - h.merge_weight) * z_l
    return score, z_g, z_l


def _case(b, n, c, d, masked, seed):
    g = torch.Generator().manual_seed(seed)
    f_g = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    feats = F.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    t0 = torch.randn(c, d, generator=g)
    mask = None
    if masked:
        lengths = torch.randint(1, n + 1, (b,), generator=g)
        lengths[0] = 0 if b > 2 else lengths[0]  # a caption without valid tokens pools to 0
        mask = torch.arange(n)[None] < lengths[:, None]
    return f_g, feats, t0, mask, g


def _head(c, d, t0, g, **kw):
    h = DualBranchHead(c, d, **kw)
    h.set_class_embeddings(t0)
    with torch.no_grad():  # non-zero residuals, so T_b != T0 and the gradients are generic
        for p in h.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return h


def _grads(outputs, tensors, seed):
    g = torch.Generator().manual_seed(seed + 100)
    total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs if o is not None)
    return torch.autograd.grad(total, tensors, allow_unused=True)


@pytest.mark.parametrize("shape", [(4, 7, 5, 16), (9, 3, 11, 8), (2, 22, 80, 32)])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize(
    "pfa, center, query",
    [("both", True, "mean"), ("both", False, "global"), ("global", True, "mean"), ("local", False, "mean")],
)
@pytest.mark.parametrize("modality", ["text", "image"])
def test_pfa_identities_match_the_explicit_formulation(
    shape, masked, pfa, center, query, modality, monkeypatch
):
    b, n, c, d = shape
    monkeypatch.setattr(heads, "_MAX_POOL_CHUNK", 2 * n * d)  # several chunks of 2 samples
    f_g, feats, t0, mask, g = _case(b, n, c, d, masked, seed=sum(shape))
    h = _head(c, d, t0, g, pfa=pfa, pfa_center=center, pfa_local_query=query, beta3=0.7)
    feats.requires_grad_(True)
    f_g.requires_grad_(True)
    out = h(f_g, feats, mask, modality=modality)
    want = _reference_forward(h, f_g, feats, mask, modality)
    for got, ref in zip((out.logits, out.logits_global, out.logits_local), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    tensors = [f_g, feats, *h.parameters()]
    for got, ref in zip(
        _grads((out.logits, out.logits_local), tensors, 0), _grads((want[0], want[2]), tensors, 0)
    ):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_pfa_saves_no_new_batch_by_positions_by_dim_tensor():
    """For the backward, the PFA keeps (B, N, C) weights and (B, D) indices: besides the features themselves
    (saved by ``F T^T`` anyway), nothing of size B N D (the explicit formulation saved two such products)."""
    b, n, c, d = 64, 22, 8, 256
    f_g, feats, t0, mask, g = _case(b, n, c, d, True, seed=1)
    h = _head(c, d, t0, g, pfa="both")
    saved = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h(f_g, feats, mask, modality="text").logits.sum().backward()
    big = [size for size, ptr in saved if size >= b * n * d and ptr != feats.data_ptr()]
    assert saved and not big
