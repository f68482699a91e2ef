"""Tests of dbtr.losses against straightforward per-element references, and of the known-label mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dbtr.losses import LOSSES, asymmetric_loss, bce_loss, get_loss, ranking_loss, split_labels


def _random_batch(seed: int, b: int = 6, c: int = 7, p_known: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(b, c, generator=g, dtype=torch.float64).float()
    targets = (torch.rand(b, c, generator=g) < 0.35).float()
    known = torch.rand(b, c, generator=g) < p_known
    return logits, targets, known


# ------------------------------------------------------------------ plain-loop references
def _ranking_reference(z: np.ndarray, y: np.ndarray, k: np.ndarray, margin: float) -> float:
    total = 0.0
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            for j in range(z.shape[1]):
                if k[b, i] and k[b, j] and y[b, i] == 1 and y[b, j] == 0:
                    total += max(0.0, margin - z[b, i] + z[b, j])
    return total / z.shape[0]


def _asl_reference(z, y, k, gamma_neg=2.0, gamma_pos=1.0, clip=0.05, eps=1e-8) -> float:
    total = 0.0
    for b in range(z.shape[0]):
        for c in range(z.shape[1]):
            if not k[b, c]:
                continue
            p = 1.0 / (1.0 + math.exp(-float(z[b, c])))
            if y[b, c] == 1:
                total += (1.0 - p) ** gamma_pos * math.log(max(p, eps))
            else:
                pm = max(p - clip, 0.0) if clip > 0 else p
                total += pm**gamma_neg * math.log(max(1.0 - pm, eps))
    return -total / z.shape[0]


def _np(*ts):
    return [t.double().numpy() if t.is_floating_point() else t.numpy() for t in ts]


# ------------------------------------------------------------------------ ranking loss
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [1.0, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_ranking_loss_matches_loop(seed, margin, masked):
    z, y, k = _random_batch(seed)
    known = k if masked else None
    ref = _ranking_reference(*_np(z, y), k.numpy() if masked else np.ones(z.shape, bool), margin)
    got = ranking_loss(z, y, known, margin=margin)
    assert got.shape == ()
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_ranking_loss_samples_without_pairs_count_in_mean():
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # sample 1 has no negative, hence no pair
    # sample 0: positive z=2, negative z=0 -> max(0, 1 - 2 + 0) = 0
    assert ranking_loss(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), y).item() == 0.0
    # sample 0: positive z=0, negative z=0.5 -> 1.5; the mean still divides by both samples
    assert ranking_loss(torch.tensor([[0.0, 0.5], [0.0, 0.0]]), y).item() == pytest.approx(1.5 / 2)


# ----------------------------------------------------------------------------- ASL
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.05},
        {"gamma_neg": 0.0, "gamma_pos": 0.0, "clip": 0.0},
    ],
)
def test_asl_matches_per_element_reference(seed, masked, kwargs):
    z, y, k = _random_batch(seed)
    z[0, 0] = -4.0  # an easy negative region (p < clip) if the target is 0
    known = k if masked else None
    ref = _asl_reference(*_np(z, y), k.numpy() if masked else np.ones(z.shape, bool), **kwargs)
    got = asymmetric_loss(z, y, known, **kwargs)
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_asl_without_focusing_or_clip_is_summed_bce():
    z, y, _ = _random_batch(11)
    got = asymmetric_loss(z, y, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    want = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_asl_focusing_weights_carry_gradient():
    # With the weight detached the gradient would differ; check against autograd of the reference formula.
    z = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, 0.0]])
    asymmetric_loss(z, y).backward()
    z2 = z.detach().clone().requires_grad_(True)
    p = torch.sigmoid(z2)
    pm = (p[0, 1] - 0.05).clamp(min=0)
    ref = -((1 - p[0, 0]) * torch.log(p[0, 0]) + pm**2 * torch.log(1 - pm))
    ref.backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- BCE
@pytest.mark.parametrize("seed", range(3))
def test_bce_matches_torch_on_known_entries(seed):
    z, y, k = _random_batch(seed)
    got = bce_loss(z, y, k)
    want = F.binary_cross_entropy_with_logits(z[k], y[k])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert bce_loss(z, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(z, y).item(), rel=1e-6)


def test_bce_nothing_known_is_zero_and_on_graph():
    z = torch.randn(3, 4, requires_grad=True)
    loss = bce_loss(z, torch.ones(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(z.grad) == 0


# ------------------------------------------------------------------ mask semantics, all losses
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unknown_entries_get_zero_gradient_and_no_influence(name):
    loss_fn = get_loss(name)
    z, y, k = _random_batch(5, b=8, c=6, p_known=0.6)
    # every sample keeps a known positive and a known negative so the ranking loss has pairs
    y[:, 0], y[:, 1], k[:, :2] = 1.0, 0.0, True
    k[:, 2] = False
    z[:, 2] = torch.tensor([50.0, -50.0] * 4)  # extreme logits on an unknown column

    z = z.requires_grad_(True)
    loss = loss_fn(z, y, k)
    loss.backward()
    assert torch.all(z.grad[~k] == 0)
    assert torch.count_nonzero(z.grad[k]) > 0

    z_changed = z.detach().clone()
    z_changed[~k] = torch.randn(int((~k).sum())) * 100
    assert torch.equal(loss_fn(z_changed, y, k), loss.detach())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_accept_half_precision_logits(name):
    z, y, k = _random_batch(3)
    full = get_loss(name)(z, y, k)
    half = get_loss(name)(z.to(torch.bfloat16), y, k)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05, abs=0.05)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shape_mismatch_raises(name):
    with pytest.raises(ValueError, match="shape"):
        get_loss(name)(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="known"):
        get_loss(name)(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


# ------------------------------------------------------------------------- split_labels
def test_split_labels_signed():
    labels = torch.tensor([[1, 0, -1], [-1, 1, 0]], dtype=torch.int8)
    targets, known = split_labels(labels)
    assert targets.dtype == torch.float32 and known.dtype == torch.bool
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert known.tolist() == [[True, False, True], [True, True, False]]


def test_split_labels_binary_and_numpy():
    labels = np.array([[1, 0, 0], [0, 1, 1]])
    targets, known = split_labels(labels)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    assert bool(known.all())
    # a signed batch that by chance holds no -1 can be forced
    targets, known = split_labels(labels, signed=True)
    assert known.tolist() == [[True, False, False], [False, True, True]]
    with pytest.raises(ValueError, match="-1"):
        split_labels(np.array([[1, -1]]), signed=False)
    with pytest.raises(ValueError, match="bad value"):
        split_labels(torch.tensor([[1, 2]]))


# ----------------------------------------------------------------------------- registry
def test_get_loss():
    assert get_loss("ranking") is ranking_loss
    assert get_loss("asl") is asymmetric_loss
    assert get_loss("bce") is bce_loss
    with pytest.raises(ValueError, match=r"focal.*asl.*bce.*ranking"):
        get_loss("focal")
