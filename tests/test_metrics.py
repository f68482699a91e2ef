"""Tests of dbtr.metrics: published TaI-DPT numbers, sklearn-exact AP, hand-computed F1, the collector."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from dbtr.metrics import (
    ScoreCollector,
    average_precision_per_class,
    evaluate_scores,
    mean_average_precision,
    multilabel_f1,
    relative_threshold_predictions,
)

REFERENCE_NAME = "taidpt_voc2007_test_predictions.npz"


def _reference_path() -> Path:
    override = os.environ.get("DBTR_REFERENCE_DIR")
    if override:
        return Path(override) / REFERENCE_NAME
    return Path(__file__).resolve().parent / "data/reference" / REFERENCE_NAME


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    path = _reference_path()
    if not path.is_file():
        # Shipped in tests/data/reference: its absence is a broken checkout, not a reason to skip.
        pytest.fail(
            f"reference predictions not found at {path} "
            f"(set DBTR_REFERENCE_DIR to the folder holding {REFERENCE_NAME})"
        )
    with np.load(path) as d:
        data = {k: d[k] for k in ("labels", "global_scores", "local_scores")}
    data["merged_scores"] = 0.5 * data["global_scores"].astype(np.float64) + 0.5 * data[
        "local_scores"
    ].astype(np.float64)
    return data


def _sklearn_ap(scores: np.ndarray, positive: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    out = []
    for c in range(scores.shape[1]):
        rows = slice(None) if valid is None else valid[:, c]
        y, s = positive[rows, c], scores[rows, c]
        out.append(average_precision_score(y, s) if y.any() else np.nan)
    return np.array(out)


# ------------------------------------------------------------------ published numbers
@pytest.mark.parametrize(
    ("key", "published"),
    [("global_scores", 86.08), ("local_scores", 73.51), ("merged_scores", 88.07)],
)
def test_reference_map_matches_published(reference, key, published):
    value = mean_average_precision(reference[key], reference["labels"], difficult="negative")
    assert round(value, 2) == published


def test_reference_ignore_convention_matches_sklearn(reference):
    labels, scores = reference["labels"], reference["merged_scores"]
    value = mean_average_precision(scores, labels, difficult="ignore")
    assert value > 88.07
    expected = 100.0 * _sklearn_ap(scores, labels == 1, labels != 0).mean()
    assert value == pytest.approx(expected, abs=1e-9)


def test_reference_torch_input(reference):
    labels = torch.from_numpy(reference["labels"])
    value = mean_average_precision(torch.from_numpy(reference["global_scores"]), labels)
    assert value == mean_average_precision(reference["global_scores"], reference["labels"])


# ----------------------------------------------------------------------- AP vs sklearn
@pytest.mark.parametrize("seed", range(5))
def test_ap_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 7
    scores = np.round(rng.normal(size=(n, c)), 1)  # about 40 distinct values: plenty of ties
    labels = rng.choice([-1, 0, 1], size=(n, c), p=[0.7, 0.1, 0.2])
    ap_neg = average_precision_per_class(scores, labels, difficult="negative")
    np.testing.assert_allclose(ap_neg, _sklearn_ap(scores, labels == 1), rtol=0, atol=1e-12)
    ap_ign = average_precision_per_class(scores, labels, difficult="ignore")
    np.testing.assert_allclose(ap_ign, _sklearn_ap(scores, labels == 1, labels != 0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_ap_matches_sklearn_binary_labels_coarse_ties(seed):
    rng = np.random.default_rng(100 + seed)
    scores = rng.integers(0, 4, size=(200, 5)).astype(np.float64)  # only 4 distinct values
    labels = (rng.random((200, 5)) < 0.3).astype(np.int64)
    ap = average_precision_per_class(scores, labels)
    np.testing.assert_allclose(ap, _sklearn_ap(scores, labels == 1), rtol=0, atol=1e-12)
    # With {0,1} labels the difficult option has nothing to act on.
    np.testing.assert_array_equal(ap, average_precision_per_class(scores, labels, difficult="ignore"))


def test_ap_perfect_and_all_tied():
    labels = np.array([[1], [1], [0], [0]])
    assert average_precision_per_class(np.array([[4.0], [3.0], [2.0], [1.0]]), labels)[0] == 1.0
    # one threshold holding everything: AP = prevalence
    assert average_precision_per_class(np.zeros((4, 1)), labels)[0] == 0.5


def test_torch_and_numpy_inputs_agree_and_half_precision_works():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(64, 6)).astype(np.float32)
    labels = rng.choice([-1, 0, 1], size=(64, 6), p=[0.6, 0.1, 0.3]).astype(np.int8)
    ref = average_precision_per_class(scores, labels)
    np.testing.assert_array_equal(
        ref, average_precision_per_class(torch.from_numpy(scores), torch.from_numpy(labels))
    )
    for dtype in (torch.bfloat16, torch.float16):
        s = torch.from_numpy(scores).to(dtype)
        got = average_precision_per_class(s, torch.from_numpy(labels))
        np.testing.assert_array_equal(got, average_precision_per_class(s.float().numpy(), labels))
        assert np.all((got >= 0) & (got <= 1))


# ----------------------------------------------------------- classes without positives
def test_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.5], [0.4, 0.6, 0.7]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    ap = average_precision_per_class(scores, labels)
    assert np.isnan(ap[2]) and not np.isnan(ap[:2]).any()
    with pytest.warns(UserWarning, match=r"1 of 3 classes.*\[2\]"):
        value = mean_average_precision(scores, labels)
    assert value == pytest.approx(100.0 * np.mean(ap[:2]))
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, np.zeros_like(labels))


def test_ignore_can_remove_all_positives_of_a_class():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    labels = np.array([[1, 0], [-1, 1], [-1, 0]])  # class 1: a positive and two difficult
    assert not np.isnan(average_precision_per_class(scores, labels, difficult="negative")).any()
    labels[1, 1] = 0  # now class 1 has only difficult entries
    ap = average_precision_per_class(scores, labels, difficult="ignore")
    assert ap[0] == 1.0 and np.isnan(ap[1])


# --------------------------------------------------------------------------- validation
def test_validation_errors():
    s = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"bad value\(s\): 2\.0"):
        average_precision_per_class(s, np.array([[1, 0], [2, -1], [0, 1]]))
    with pytest.raises(ValueError, match=r"0\.5"):
        mean_average_precision(s, np.array([[1, 0], [0.5, -1], [0, 1]]))
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 2\)"):
        average_precision_per_class(s, np.ones((2, 2)))
    bad = s.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        average_precision_per_class(bad, np.ones((3, 2)))
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="inf"):
        mean_average_precision(bad, np.ones((3, 2)))
    with pytest.raises(ValueError, match="difficult"):
        average_precision_per_class(s, np.ones((3, 2)), difficult="exclude")
    with pytest.raises(ValueError, match="difficult"):
        multilabel_f1(s, np.ones((3, 2)), top_k=1, difficult="drop")


# --------------------------------------------------------------------------------- F1
# 4 images x 3 classes; image 2 ties classes 0 and 1 (top-1 must pick class 0, the lower index).
F1_SCORES = np.array(
    [
        [0.9, 0.5, 0.1],
        [0.2, 0.8, 0.6],
        [0.7, 0.7, 0.3],
        [0.1, 0.3, 0.4],
    ]
)
F1_LABELS = np.array(
    [
        [1, 0, 0],
        [0, 1, 1],
        [0, 1, 0],
        [1, 0, 0],
    ]
)


def _expected(nc, np_, ng) -> dict[str, float]:
    """The six numbers from hand-written per-class counts (Np = 0 already written as 1)."""
    nc, np_, ng = map(np.asarray, (nc, np_, ng))
    cp, cr = np.mean(nc / np_), np.mean(nc / ng)
    op, or_ = nc.sum() / np_.sum(), nc.sum() / ng.sum()
    return {
        "CP": 100 * cp,
        "CR": 100 * cr,
        "CF1": 100 * 2 * cp * cr / (cp + cr),
        "OP": 100 * op,
        "OR": 100 * or_,
        "OF1": 100 * 2 * op * or_ / (op + or_),
    }


def _assert_f1(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-10), key


def test_f1_top1_hand_computed():
    # predicted: img0->c0, img1->c1, img2->c0 (tie), img3->c2
    # c0: Nc=1 Np=2 Ng=2 | c1: Nc=1 Np=1 Ng=2 | c2: Nc=0 Np=1 Ng=1
    got = multilabel_f1(F1_SCORES, F1_LABELS, top_k=1)
    _assert_f1(got, _expected([1, 1, 0], [2, 1, 1], [2, 2, 1]))
    # CP = (1/2 + 1 + 0)/3, CR = (1/2 + 1/2 + 0)/3, OP = 2/4, OR = 2/5
    _assert_f1(got, {"CP": 50.0, "CR": 100 / 3, "CF1": 40.0, "OP": 50.0, "OR": 40.0, "OF1": 400 / 9})


def test_f1_top2_hand_computed():
    # predicted: img0 {c0,c1}, img1 {c1,c2}, img2 {c0,c1}, img3 {c2,c1}
    # c0: Nc=1 Np=2 Ng=2 | c1: Nc=2 Np=4 Ng=2 | c2: Nc=1 Np=2 Ng=1
    got = multilabel_f1(F1_SCORES, F1_LABELS, top_k=2)
    _assert_f1(got, _expected([1, 2, 1], [2, 4, 2], [2, 2, 1]))
    _assert_f1(got, {"CP": 50.0, "CR": 250 / 3, "CF1": 62.5, "OP": 50.0, "OR": 80.0, "OF1": 800 / 13})


def test_f1_threshold_hand_computed_never_predicted_class_has_precision_zero():
    # score >= 0.65: img0 {c0}, img1 {c1}, img2 {c0,c1}, img3 {}; class 2 is never predicted.
    # c0: Nc=1 Np=2 Ng=2 | c1: Nc=2 Np=2 Ng=2 | c2: Nc=0 Np=0->1 Ng=1
    got = multilabel_f1(F1_SCORES, F1_LABELS, threshold=0.65)
    _assert_f1(got, _expected([1, 2, 0], [2, 2, 1], [2, 2, 1]))
    # OP = 3 / (2 + 2 + 1): the Np = 0 -> 1 substitution also enters OP (ML-GCN / TaI-DPT code)
    _assert_f1(got, {"CP": 50.0, "CR": 50.0, "CF1": 50.0, "OP": 60.0, "OR": 60.0, "OF1": 60.0})
    # threshold is inclusive: 0.7 still selects image 2's tied pair
    assert multilabel_f1(F1_SCORES, F1_LABELS, threshold=0.7)["OP"] == pytest.approx(60.0)


def test_f1_nothing_predicted_is_zero_not_nan():
    got = multilabel_f1(F1_SCORES, F1_LABELS, threshold=10.0)
    assert got == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}


def test_f1_difficult_conventions_hand_computed():
    signed = np.where(F1_LABELS == 1, 1, -1)
    signed[2, 0] = 0  # image 2, class 0 is difficult; top-1 predicts it there
    # "negative": the same counts as the {0,1} labels
    _assert_f1(multilabel_f1(F1_SCORES, signed, top_k=1), _expected([1, 1, 0], [2, 1, 1], [2, 2, 1]))
    # "ignore": the prediction at (2, 0) no longer counts -> c0: Nc=1 Np=1 Ng=2
    got = multilabel_f1(F1_SCORES, signed, top_k=1, difficult="ignore")
    _assert_f1(got, _expected([1, 1, 0], [1, 1, 1], [2, 2, 1]))
    _assert_f1(got, {"CP": 200 / 3, "CR": 100 / 3, "CF1": 400 / 9, "OP": 200 / 3, "OR": 40.0, "OF1": 50.0})


def test_f1_difficult_positive_under_ignore():
    signed = np.where(F1_LABELS == 1, 1, -1)
    signed[3, 0] = 0  # image 3's class-0 positive becomes difficult
    # negative: c0 Ng 2 -> 1; ignore: the same Ng, and image 3 predicts c2 so Np is unchanged
    want = _expected([1, 1, 0], [2, 1, 1], [1, 2, 1])
    _assert_f1(multilabel_f1(F1_SCORES, signed, top_k=1), want)
    _assert_f1(multilabel_f1(F1_SCORES, signed, top_k=1, difficult="ignore"), want)


def test_f1_class_without_positive_left_out_of_class_means():
    labels = F1_LABELS.copy()
    labels[1, 2] = 0  # class 2 has no positive now; top-1 still predicts it once (image 3)
    with pytest.warns(UserWarning, match=r"class indices \[2\]"):
        got = multilabel_f1(F1_SCORES, labels, top_k=1)
    # class means over c0, c1 only; overall counts keep c2's false positive
    _assert_f1(got, {"CP": 75.0, "CR": 50.0, "CF1": 60.0, "OP": 50.0, "OR": 50.0, "OF1": 50.0})
    with pytest.raises(ValueError, match="no class has a positive"):
        multilabel_f1(F1_SCORES, np.zeros_like(labels), top_k=1)


def test_f1_argument_validation():
    with pytest.raises(ValueError, match="exactly one"):
        multilabel_f1(F1_SCORES, F1_LABELS)
    with pytest.raises(ValueError, match="exactly one"):
        multilabel_f1(F1_SCORES, F1_LABELS, top_k=1, threshold=0.5)
    with pytest.raises(ValueError, match="top_k"):
        multilabel_f1(F1_SCORES, F1_LABELS, top_k=4)
    with pytest.raises(ValueError, match="top_k"):
        multilabel_f1(F1_SCORES, F1_LABELS, top_k=0)
    with pytest.raises(ValueError, match="predictions"):
        multilabel_f1(F1_SCORES, F1_LABELS, predictions=np.ones((4, 2), dtype=bool))


def test_relative_threshold_predictions():
    scores = np.array([[0.0, 1.0, 2.0], [-3.0, -1.0, 1.0], [5.0, 5.0, 5.0]])
    pred = relative_threshold_predictions(scores, ratio=0.5)
    np.testing.assert_array_equal(pred, [[False, False, True], [False, False, True], [False, False, False]])
    np.testing.assert_array_equal(relative_threshold_predictions(scores, ratio=0.0)[0], [False, True, True])
    # scale- and shift-free: the same on transformed logits, and from torch input
    np.testing.assert_array_equal(relative_threshold_predictions(torch.tensor(3 * scores + 7)), pred)
    with pytest.raises(ValueError, match="ratio"):
        relative_threshold_predictions(scores, ratio=1.5)


def test_f1_with_prediction_matrix():
    pred = F1_SCORES >= 0.65
    assert multilabel_f1(F1_SCORES, F1_LABELS, predictions=pred) == multilabel_f1(
        F1_SCORES, F1_LABELS, threshold=0.65
    )
    rel = relative_threshold_predictions(F1_SCORES)
    got = multilabel_f1(F1_SCORES, F1_LABELS, predictions=torch.from_numpy(rel))
    assert got == multilabel_f1(F1_SCORES, F1_LABELS, predictions=rel)


def test_evaluate_scores_keys_and_values():
    out = evaluate_scores(torch.tensor(F1_SCORES), torch.tensor(F1_LABELS), top_k=(1, 2))
    assert set(out) == {"mAP"} | {f"{m}@{k}" for k in (1, 2) for m in ("CP", "CR", "CF1", "OP", "OR", "OF1")}
    assert out["mAP"] == mean_average_precision(F1_SCORES, F1_LABELS)
    assert out["CF1@1"] == pytest.approx(40.0) and out["OF1@2"] == pytest.approx(800 / 13)
    assert all(isinstance(v, float) for v in out.values())


# ----------------------------------------------------------------- torchmetrics pitfall
def test_torchmetrics_per_batch_sigmoid_pitfall():
    from torchmetrics.classification import MultilabelAveragePrecision

    labels = torch.tensor(
        [
            [1, 0, 0, 1],
            [0, 1, 0, 0],
            [1, 1, 1, 0],
            [0, 0, 1, 1],
            [1, 0, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 0, 1],
            [1, 1, 0, 0],
        ]
    )
    # batch 1 happens to lie in [0, 1], batch 2 does not: torchmetrics squashes only batch 2
    scores = torch.tensor(
        [
            [0.9, 0.2, 0.1, 0.8],
            [0.3, 0.7, 0.4, 0.2],
            [0.6, 0.6, 0.9, 0.1],
            [0.2, 0.1, 0.5, 0.3],
            [2.0, -1.0, -0.5, 0.4],
            [-1.0, 1.5, 0.9, 0.3],
            [0.1, 0.2, -0.3, 1.2],
            [0.5, 0.7, 0.0, -2.0],
        ]
    )
    exact = 100.0 * _sklearn_ap(scores.double().numpy(), labels.numpy() == 1).mean()
    ours = mean_average_precision(scores, labels)
    assert ours == pytest.approx(exact, abs=1e-12)

    tm = MultilabelAveragePrecision(num_labels=4, average="macro", thresholds=None)
    collector = ScoreCollector()
    for sl in (slice(0, 4), slice(4, 8)):
        tm.update(scores[sl], labels[sl])
        collector.update(scores[sl], labels[sl])
    tm_value = 100.0 * float(tm.compute())
    # torchmetrics 1.9 measured: 94.58 vs the exact 96.67
    assert abs(tm_value - exact) > 1.0, (
        "torchmetrics no longer mixes sigmoid/raw batches: revisit ScoreCollector's note"
    )
    assert mean_average_precision(*collector.compute()) == pytest.approx(exact, abs=1e-12)


# ------------------------------------------------------------------------ ScoreCollector
def test_score_collector_concatenates_and_resets():
    collector = ScoreCollector()
    s1, y1 = torch.randn(3, 5, dtype=torch.bfloat16), torch.tensor([[1, 0, -1, 1, 0]] * 3)
    s2, y2 = torch.randn(2, 5), torch.tensor([[0, 1, 1, -1, -1]] * 2)
    collector.update(s1, y1)
    collector.update(s2, y2)
    scores, labels = collector.compute()
    assert scores.dtype == torch.float32 and labels.dtype == torch.int8
    assert scores.device.type == "cpu" and labels.device.type == "cpu"
    torch.testing.assert_close(scores, torch.cat([s1.float(), s2]), rtol=0, atol=0)
    torch.testing.assert_close(labels, torch.cat([y1, y2]).to(torch.int8), rtol=0, atol=0)
    assert collector.update_count == 2

    collector.reset()
    assert collector.update_count == 0
    collector.update(s2, y2)
    scores, labels = collector.compute()
    torch.testing.assert_close(scores, s2, rtol=0, atol=0)
    assert labels.shape == (2, 5)


def test_score_collector_rejects_bad_shapes_and_keeps_no_grad():
    collector = ScoreCollector()
    with pytest.raises(ValueError, match="B, C"):
        collector.update(torch.zeros(2, 3), torch.zeros(2, 4))
    logits = torch.randn(2, 3, requires_grad=True)
    collector.update(logits * 2, torch.ones(2, 3))
    scores, _ = collector.compute()
    assert not scores.requires_grad


def test_score_collector_forward_is_per_batch_and_reset_clears_the_indices():
    """Lightning calls ``collector(batch)``: that returns the batch alone and still adds it to the epoch; a
    second epoch after reset() starts empty, indices included (else the dedup would mix in the old epoch)."""
    c = ScoreCollector()
    a, b = torch.randn(2, 3), torch.randn(1, 3)
    ya, yb = torch.tensor([[1, -1, 1], [-1, 1, -1]]), torch.tensor([[1, 1, -1]])
    batch_scores, batch_labels = c(a, ya, torch.tensor([0, 1]))
    torch.testing.assert_close(batch_scores, a)
    torch.testing.assert_close(batch_labels, ya.to(torch.int8))
    torch.testing.assert_close(c(b, yb, torch.tensor([2]))[0], b)
    torch.testing.assert_close(c.compute()[0], torch.cat([a, b]))

    c.reset()
    c.update(b, yb)  # this epoch without indices: nothing from the first epoch's may survive the reset
    torch.testing.assert_close(c.compute()[0], b)
    c.update(a, ya, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="indices were given for some batches only"):
        c.compute()


def test_no_spurious_warnings_on_clean_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_scores(F1_SCORES, F1_LABELS, top_k=(1, 2, 3))


def test_score_collector_drops_ddp_padding_repeats_by_index():
    c = ScoreCollector()
    scores = torch.arange(12, dtype=torch.float32).view(4, 3)
    labels = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
    # two "ranks" worth of batches, out of order, with sample 0 repeated as DistributedSampler padding
    c.update(scores[[2, 0]], labels[[2, 0]], torch.tensor([2, 0]))
    c.update(scores[[1, 3, 0]], labels[[1, 3, 0]], torch.tensor([1, 3, 0]))
    got_s, got_l = c.compute()
    torch.testing.assert_close(got_s, scores)
    torch.testing.assert_close(got_l, labels.to(torch.int8))


def test_evaluate_scores_returns_the_per_class_ap_its_map_averages():
    rng = np.random.default_rng(3)
    scores, labels = rng.random((40, 5)), np.where(rng.random((40, 5)) < 0.3, 1, -1)
    out = evaluate_scores(scores, labels, per_class=True)
    np.testing.assert_array_equal(out["AP"], average_precision_per_class(scores, labels))
    assert out["mAP"] == pytest.approx(100 * out["AP"].mean()) == mean_average_precision(scores, labels)
    assert "AP" not in evaluate_scores(scores, labels)
