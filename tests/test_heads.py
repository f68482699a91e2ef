"""Head equations against straightforward per-sample, per-class loop references (docs/method.md §3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dbtr.models.heads import DualBranchHead, TaskResidual, parameter_free_attention, spatial_aggregation

B, N, C, D = 3, 7, 5, 16


def _rand(seed=0, mask=True):
    g = torch.Generator().manual_seed(seed)
    f_g = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    feats = F.normalize(torch.randn(B, N, D, generator=g), dim=-1)
    t0 = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    m = None
    if mask:
        lengths = [7, 4, 2]
        m = torch.tensor([[j < n for j in range(N)] for n in lengths])
    return f_g, feats, t0, m


def _valid(m, b):
    return list(range(N)) if m is None else [j for j in range(N) if m[b, j]]


def ref_spatial(feats, t, m, tau, s):
    out = torch.zeros(B, C)
    for b in range(B):
        idx = _valid(m, b)
        for c in range(C):
            sims = [float(feats[b, j] @ t[c]) for j in idx]
            z = sum(math.exp(tau * a) for a in sims)
            out[b, c] = sum(s * a * math.exp(tau * a) / z for a in sims)
    return out


def ref_pfa(query, feats, t, m, temp, s, beta2, beta3, center=False):
    out = torch.zeros(B, C)
    for b in range(B):
        idx = _valid(m, b)
        A = torch.tensor([[float(feats[b, j] @ t[c]) / temp for c in range(C)] for j in idx])  # (n, C)
        # direction 1: per class, softmax over positions -> attended text
        term2 = torch.zeros(C)
        for c in range(C):
            w = torch.exp(A[:, c]) / torch.exp(A[:, c]).sum()
            t_att = sum(w[k] * feats[b, j] for k, j in enumerate(idx))
            term2[c] = query[b] @ t_att
        # direction 2: per position, softmax over classes -> text-aware locals, mean + max pooled
        fa = torch.stack(
            [
                sum((torch.exp(A[k]) / torch.exp(A[k]).sum())[c] * t[c] for c in range(C))
                for k in range(len(idx))
            ]
        )
        pooled = fa.mean(0) + fa.max(0).values
        term3 = torch.stack([pooled @ t[c] for c in range(C)])
        out[b] = s * (beta2 * term2 + beta3 * term3)
        if center:
            out[b] = out[b] - out[b].mean()
    return out


def test_task_residual_equation_and_zero_init():
    t0 = F.normalize(torch.randn(C, D), dim=-1)
    res = TaskResidual(C, D, alpha=0.5)
    torch.testing.assert_close(res(t0), t0)  # zero-initialised: starts at T0
    with torch.no_grad():
        res.residual.normal_()
    expected = torch.stack(
        [(t0[c] + 0.5 * res.residual[c]) / (t0[c] + 0.5 * res.residual[c]).norm() for c in range(C)]
    )
    torch.testing.assert_close(res(t0), expected)
    assert TaskResidual(C, D, enabled=False)(t0) is t0


@pytest.mark.parametrize("use_mask", [True, False])
def test_spatial_aggregation_matches_loop(use_mask):
    _, feats, t0, m = _rand(1, use_mask)
    got, weights = spatial_aggregation(feats @ t0.t(), m, tau=40.0, scale=4.0)
    torch.testing.assert_close(got, ref_spatial(feats, t0, m, 40.0, 4.0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weights.sum(1), torch.ones(B, C))
    if use_mask:
        assert float(weights[~m].abs().sum()) == 0.0


@pytest.mark.parametrize("use_mask", [True, False])
def test_parameter_free_attention_both_directions(use_mask):
    f_g, feats, t0, m = _rand(2, use_mask)
    text_att, pooled = parameter_free_attention(feats, t0, m, temperature=0.5)
    z2 = torch.einsum("bd,bcd->bc", f_g, text_att)
    z3 = pooled @ t0.t()
    got = 4.0 * (1.0 * z2 + 0.1 * z3)
    torch.testing.assert_close(got, ref_pfa(f_g, feats, t0, m, 0.5, 4.0, 1.0, 0.1), atol=1e-4, rtol=1e-4)


def test_padding_tokens_do_not_change_outputs():
    f_g, feats, t0, m = _rand(3, True)
    head = DualBranchHead(C, D, pfa="both")
    head.set_class_embeddings(t0)
    out = head(f_g, feats, m, modality="text")
    garbage = feats.clone()
    garbage[~m] = F.normalize(torch.randn(int((~m).sum()), D), dim=-1) * 5
    out2 = head(f_g, garbage, m, modality="text")
    torch.testing.assert_close(out.logits, out2.logits)


def test_full_head_composes_the_equations():
    f_g, feats, t0, m = _rand(4, True)
    head = DualBranchHead(C, D, pfa="both", merge_weight=0.3, beta2=0.7, beta3=0.05, tau_text=50.0)
    head.set_class_embeddings(t0)
    with torch.no_grad():
        head.global_classifier.residual.normal_(0, 0.3)
        head.local_classifier.residual.normal_(0, 0.3)
    t_g = F.normalize(t0 + 0.5 * head.global_classifier.residual, dim=-1).detach()
    t_l = F.normalize(t0 + 0.5 * head.local_classifier.residual, dim=-1).detach()
    z_g = 4.0 * f_g @ t_g.t() + ref_pfa(f_g, feats, t_g, m, 0.5, 4.0, 0.7, 0.05, center=True)
    q_l = torch.stack([F.normalize(feats[b, _valid(m, b)].mean(0), dim=0) for b in range(B)])
    z_l = ref_spatial(feats, t_l, m, 50.0, 4.0) + ref_pfa(
        q_l, feats, t_l, m, 0.5, 4.0, 0.7, 0.05, center=True
    )
    out = head(f_g, feats, m, modality="text")
    torch.testing.assert_close(out.logits_global, z_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits_local, z_l, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits, 0.3 * z_g + 0.7 * z_l, atol=1e-4, rtol=1e-4)


def test_image_modality_uses_image_temperature():
    f_g, feats, t0, _ = _rand(5, False)
    head = DualBranchHead(C, D, pfa="none", tau_text=50.0, tau_image=4.0)
    head.set_class_embeddings(t0)
    out = head(f_g, feats, None, modality="image")
    torch.testing.assert_close(out.logits_local, ref_spatial(feats, t0, None, 4.0, 4.0), atol=1e-4, rtol=1e-4)


def test_baseline_switches():
    f_g, feats, t0, _ = _rand(6, False)
    zs = DualBranchHead(
        C, D, global_residual=False, local_residual=False, use_local=False, pfa="none", merge_weight=1.0
    )
    zs.set_class_embeddings(t0)
    out = zs(f_g, feats)
    torch.testing.assert_close(out.logits, 4.0 * f_g @ t0.t())
    assert out.logits_local is None and not zs.trainable
    calip = DualBranchHead(
        C, D, global_residual=False, local_residual=False, use_local=False, pfa="global", merge_weight=1.0
    )
    calip.set_class_embeddings(t0)
    torch.testing.assert_close(
        calip(f_g, feats).logits,
        4.0 * f_g @ t0.t() + ref_pfa(f_g, feats, t0, None, 0.5, 4.0, 1.0, 0.1, center=True),
        atol=1e-4,
        rtol=1e-4,
    )
    raw = DualBranchHead(
        C, D, global_residual=False, use_local=False, pfa="global", merge_weight=1.0, pfa_center=False
    )
    raw.set_class_embeddings(t0)
    torch.testing.assert_close(
        raw(f_g, feats).logits,
        4.0 * f_g @ t0.t() + ref_pfa(f_g, feats, t0, None, 0.5, 4.0, 1.0, 0.1),
        atol=1e-4,
        rtol=1e-4,
    )
    centred = DualBranchHead(
        C, D, global_residual=False, use_local=False, pfa="none", merge_weight=1.0, center_scores=True
    )
    centred.set_class_embeddings(t0)
    z = 4.0 * f_g @ t0.t()
    torch.testing.assert_close(centred(f_g, feats).logits, z - z.mean(1, keepdim=True))
    taskres = DualBranchHead(C, D, local_residual=False, use_local=False, pfa="none", merge_weight=1.0)
    assert [n for n, _ in taskres.named_parameters()] == ["global_classifier.residual"]
    full = DualBranchHead(C, D)
    assert sum(p.numel() for p in full.parameters()) == 2 * C * D


def test_feature_noise_only_on_text_in_training():
    f_g, feats, t0, m = _rand(7, True)
    head = DualBranchHead(C, D, feature_noise_std=0.1)
    head.set_class_embeddings(t0)
    head.eval()
    torch.testing.assert_close(head(f_g, feats, m, "text").logits, head(f_g, feats, m, "text").logits)
    head.train()
    assert not torch.allclose(head(f_g, feats, m, "text").logits, head(f_g, feats, m, "text").logits)
    torch.testing.assert_close(head(f_g, feats, None, "image").logits, head(f_g, feats, None, "image").logits)


def test_gradients_reach_both_residuals_through_attention():
    f_g, feats, t0, m = _rand(8, True)
    head = DualBranchHead(C, D)
    head.set_class_embeddings(t0)
    out = head(f_g, feats, m, "text")
    (out.logits_global.sum() + out.logits_local.sum()).backward()
    assert head.global_classifier.residual.grad.abs().sum() > 0
    assert head.local_classifier.residual.grad.abs().sum() > 0


def test_bad_settings_and_unset_embeddings():
    with pytest.raises(ValueError, match="pfa must be one of"):
        DualBranchHead(C, D, pfa="sideways")
    with pytest.raises(ValueError, match="needs the local branch"):
        DualBranchHead(C, D, use_local=False, pfa="both")
    head = DualBranchHead(C, D)
    with pytest.raises(RuntimeError, match="set_class_embeddings"):
        head(torch.randn(1, D), torch.randn(1, 2, D))
    with pytest.raises(ValueError, match=r"\(5, 16\)"):
        head.set_class_embeddings(torch.randn(4, D))
