"""SPARC (dbtr/zeroshot/sparc.py, docs/sparc.md): its equations against per-element references written here
(sklearn's PCA, as SPARC's own code uses), its co-occurrence and string-matching rules, its config errors, and
``model=sparc`` end to end through dbtr-train and dbtr-eval, recomputed independently from the tiny CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from cli_helpers import run_cli
from dbtr.utils.errors import ConfigError
from dbtr.zeroshot.sparc import (
    SparcScorer,
    build_compound_prompts,
    cooccurring_combinations,
    match_classes,
    sparc_scores,
    sparc_settings,
)


# ----------------------------------------------------------------------------------- the references
def _mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5


def reference_sparc(base, simple, compound, members, rows=True, weight=0.5):
    """SPARC's run_SPARC.py, element by element: row standardisation (compounds by the bare names' row
    statistics), column standardisation, per class the sorted compound scores plus the single score, sklearn
    PCA's first component (sign by its mean, L1-normalised), averaged with the single score."""
    base, simple, compound = (np.asarray(x, dtype=np.float64) for x in (base, simple, compound))
    n_img, n_cls = base.shape
    s = [[float(v) for v in row] for row in base]
    if rows:
        s = [[(v - _mean_sd(row)[0]) / _mean_sd(row)[1] for v in row] for row in s]
    q = []
    for n in range(n_img):
        mu, sd = _mean_sd([float(v) for v in simple[n]])
        q.append([(float(v) - mu) / sd for v in compound[n]])

    def by_column(m):
        cols = [_mean_sd([m[n][j] for n in range(n_img)]) for j in range(len(m[0]))]
        return [[(m[n][j] - cols[j][0]) / cols[j][1] for j in range(len(m[0]))] for n in range(n_img)]

    s = by_column(s)
    q = by_column(q) if compound.shape[1] else q
    out = np.zeros((n_img, n_cls))
    for c in range(n_cls):
        single = np.array([s[n][c] for n in range(n_img)])
        if not members[c]:
            out[:, c] = single
            continue
        x = np.array([sorted(q[n][p] for p in members[c]) + [s[n][c]] for n in range(n_img)])
        d = PCA().fit(x).components_[0]
        d = -d if np.mean(d) < 0 else d
        d = d / np.sum(np.abs(d))
        out[:, c] = weight * single + (1 - weight) * (x @ d)
    return out, np.array(s)


def reference_combinations(y, pair_t, triplet_t):
    """SPARC's generate_..._prompts rule by counting rows."""
    y = np.asarray(y, dtype=bool)
    m, c = y.shape

    def count(*cols):
        return sum(all(y[r, k] for k in cols) for r in range(m))

    pairs = [
        (i, j) for i in range(c) for j in range(i + 1, c) if count(i) and count(i, j) / count(i) > pair_t
    ]
    triplets: dict = {}
    for i, j in pairs:
        best, best_p = None, -np.inf
        for k in range(c):
            p = count(i, j, k) / count(i, j)
            if k not in (i, j) and p > triplet_t and p > best_p:
                best, best_p = k, p
        if best is None:
            continue
        if (i, best, j) in triplets:
            if best_p > triplets[(i, best, j)]:
                del triplets[(i, best, j)]
                triplets[(i, j, best)] = best_p
        else:
            triplets[(i, j, best)] = best_p
    return pairs, list(triplets)


# ----------------------------------------------------------------------------------- the equations
@pytest.mark.parametrize("rows, weight", [(True, 0.5), (False, 0.5), (True, 0.25)])
def test_sparc_scores_match_the_reference(rows, weight):
    rng = np.random.default_rng(3)
    n, c = 40, 4
    base = rng.normal(size=(n, c)) * 3 + rng.normal(size=(n, 1))  # an image bias the row step removes
    simple = 0.2 + 0.05 * rng.normal(size=(n, c))
    compound = 0.2 + 0.05 * rng.normal(size=(n, 6)) + 0.03 * rng.normal(size=(n, 1))
    members = [[0, 1, 4], [0, 2, 3, 5], [1], []]  # class 3: no compound prompt -> the standardised score
    want, want_debiased = reference_sparc(base, simple, compound, members, rows, weight)
    got, debiased = sparc_scores(
        torch.tensor(base), torch.tensor(simple), torch.tensor(compound), members, rows, weight
    )
    np.testing.assert_allclose(debiased.numpy(), want_debiased, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got[:, 3].numpy(), want_debiased[:, 3], rtol=0, atol=1e-12)
    # a function giving each class's columns is the same computation without the (N, P) matrix
    by_class, _ = sparc_scores(
        torch.tensor(base), torch.tensor(simple), lambda k: torch.tensor(compound[:, members[k]]), members
    )
    if rows and weight == 0.5:
        np.testing.assert_allclose(by_class.numpy(), want, rtol=0, atol=1e-10)


def test_sparc_refuses_a_single_image():
    with pytest.raises(ValueError, match="at least 2"):
        sparc_scores(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 2), [[0], [1], []])


# ----------------------------------------------------------------------------------- compound prompts
def test_cooccurrence_rule_on_a_hand_counted_example():
    rows = [[1, 1, 0, 0]] * 10 + [[0, 1, 1, 0]] * 5 + [[1, 1, 1, 0]] * 5 + [[0, 0, 0, 1]] * 2
    pairs, triplets = cooccurring_combinations(np.array(rows, dtype=bool))
    # P(1|0) = 1, P(2|0) = 1/3, P(2|1) = 1/2; class 3 never co-occurs
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    # (0,1) -> 2 with P = 1/3; (0,2) -> 1 with P = 1 replaces it; (1,2) -> 0
    assert triplets == [(0, 2, 1), (1, 2, 0)]
    prompts = build_compound_prompts(["a", "b", "c", "d"], "cooccurrence", np.array(rows) == 1)
    assert prompts.texts == ["a and b", "a and c", "b and c", "a, c, and b", "b, c, and a"]
    assert prompts.members == [[0, 1, 3, 4], [0, 2, 3, 4], [1, 2, 3, 4], []]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cooccurrence_rule_matches_the_counting_reference(seed):
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 3, size=(120, 1))
    y = (rng.random((120, 7)) < 0.15) | (rng.random((120, 7)) < 0.5) & (np.arange(7) % 3 == topic)
    assert cooccurring_combinations(y, 0.2137, 0.1234) == reference_combinations(y, 0.2137, 0.1234)


def test_all_pairs_and_given_sentences():
    names = ["dog", "hot dog", "person", "pottedplant"]
    extra = ["two hot dogs and a dog", "people near a potted plant", "a catalog", "dog and hot dog"]
    prompts = build_compound_prompts(names, "all_pairs", extra=extra)
    assert prompts.texts[:3] == ["dog and hot dog", "dog and person", "dog and potted plant"]
    assert len(prompts.texts) == 6 + 2  # the repeated pair is not added twice; the catalog names no class
    assert prompts.members[0] == [0, 1, 2, 6] and prompts.members[1] == [0, 3, 4, 6]
    assert prompts.members[2] == [1, 3, 5, 7] and prompts.members[3] == [2, 4, 5, 7]


def test_string_matching_is_whole_words_longest_first_with_plurals():
    names = ["dog", "hot dog", "person", "mouse", "cat"]
    assert sorted(match_classes("Two hot-dogs, one dog.", names)) == [0, 1]
    assert match_classes("a hot dog stand", names) == [1]  # "dog" inside "hot dog" is not a dog
    assert sorted(match_classes("people and mice", names)) == [2, 3]
    assert match_classes("a catalog of catnip", names) == []


# ----------------------------------------------------------------------------------- settings
def test_settings_off_by_default_and_errors_name_the_key(tmp_path):
    assert sparc_settings(None) is None and sparc_settings({"enabled": False}) is None
    assert sparc_settings({"enabled": True, "base_weight": None})["base_weight"] == 0.5
    with pytest.raises(ConfigError, match=r"no key\(s\) \['weight'\]"):
        sparc_settings({"enabled": True, "weight": 0.5})
    with pytest.raises(ConfigError, match="compounds=pairs is not allowed; choose one of: cooccurrence"):
        sparc_settings({"enabled": True, "compounds": "pairs"})
    with pytest.raises(ConfigError, match="pair_threshold must be a probability"):
        sparc_settings({"enabled": True, "pair_threshold": 1.5})
    with pytest.raises(FileNotFoundError, match="sparc.prompts=.*no such file"):
        SparcScorer(sparc_settings({"enabled": True, "prompts": str(tmp_path / "none.txt")}), ["a", "b"])
    scorer = SparcScorer(sparc_settings({"enabled": True}), ["a", "b"])
    with pytest.raises(ConfigError, match="compounds=cooccurrence counts class co-occurrence"):
        scorer.check_sources(None)


# ----------------------------------------------------------------------------------- end to end
def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"]


def test_model_sparc_through_dbtr_train_matches_an_independent_recomputation(demo_dir, tmp_path):
    """dbtr-train model=sparc on the tiny data; then everything again from the tiny CLIP by hand."""
    from dbtr.data.captions import read_caption_jsonl
    from dbtr.data.images import ClipImageTransform, ImageDataset, read_image_jsonl
    from dbtr.metrics import mean_average_precision
    from dbtr.models.clip import ClipEncoder
    from dbtr.zeroshot.classifier import build_class_embeddings

    run = tmp_path / "sparc"
    args = ["experiment=tiny_zsclip", f"paths.tiny_dir={demo_dir}", "logger=none"]
    run_cli("dbtr-train", *args, "model=sparc", f"hydra.run.dir={run}", cwd=tmp_path)
    got = _metrics(run)

    names = (demo_dir / "classes.txt").read_text().split()
    encoder = ClipEncoder.from_pretrained(str(demo_dir / "clip"))
    records = read_image_jsonl(demo_dir / "images", demo_dir / "test.jsonl", names)
    ds = ImageDataset(records, ClipImageTransform(encoder.image_size))
    with torch.no_grad():
        images = encoder.encode_image(
            torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
        ).image_embeds
    base = 4.0 * images @ build_class_embeddings(encoder, names, "imagenet").t()
    caption_labels = read_caption_jsonl(demo_dir / "captions.jsonl", names).labels == 1
    pairs, triplets = reference_combinations(caption_labels, 0.05, 0.025)
    texts = [f"{names[i]} and {names[j]}" for i, j in pairs]
    texts += [f"{names[i]}, {names[j]}, and {names[k]}" for i, j, k in triplets]
    members = [[p for p, combo in enumerate([*pairs, *triplets]) if c in combo] for c in range(len(names))]
    assert all(members), "every tiny class co-occurs with another in the captions"
    simple = images @ encoder.encode_texts(names).t()
    compound = images @ encoder.encode_texts(texts).t()
    want, debiased = reference_sparc(base.numpy(), simple.numpy(), compound.numpy(), members)

    assert got["test/mAP"] == pytest.approx(mean_average_precision(want, records.labels), abs=1e-6)
    assert got["test/mAP_debiased"] == pytest.approx(
        mean_average_precision(debiased, records.labels), abs=1e-6
    )
    assert got["test/mAP_base"] == pytest.approx(mean_average_precision(base, records.labels), abs=1e-6)
    assert got["test/mAP_base"] == got["test/mAP_global"]  # a global-only model: base = its global branch


@pytest.mark.slow  # 34 s: trains a model, then two dbtr-eval runs
def test_sparc_on_other_models_posthoc(demo_dir, tmp_path):
    """SPARC as a flag on another training-free model, and on a trained checkpoint through dbtr-eval."""
    common = ["data=tiny", "clip=tiny", f"paths.tiny_dir={demo_dir}", "logger=none", "callbacks=none"]
    plain, posthoc = tmp_path / "local", tmp_path / "local_sparc"
    run_cli(
        "dbtr-train", *common, "model=zsclip_local", "train=false", f"hydra.run.dir={plain}", cwd=tmp_path
    )
    run_cli(
        "dbtr-train",
        *common,
        "model=zsclip_local",
        "train=false",
        "model.evaluation.sparc.enabled=true",
        "model.evaluation.sparc.compounds=all_pairs",
        f"hydra.run.dir={posthoc}",
        cwd=tmp_path,
    )
    assert _metrics(posthoc)["test/mAP_base"] == pytest.approx(_metrics(plain)["test/mAP"], abs=1e-9)
    assert _metrics(posthoc)["test/mAP_local"] == pytest.approx(_metrics(plain)["test/mAP_local"], abs=1e-9)

    trained = tmp_path / "trained"
    run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        *common[2:4],  # the default callbacks: they name the checkpoint without "=" (a Hydra override)
        "trainer.max_epochs=1",
        "model.evaluation.sparc.enabled=true",  # selection on SPARC's validation mAP, as it is tested
        f"hydra.run.dir={trained}",
        cwd=tmp_path,
    )
    record = json.loads((trained / "metrics.json").read_text())
    assert {"val/mAP_base", "val/mAP_debiased"} <= set(record["val_last_epoch"])
    ckpt = record["checkpoint"]
    evals = {}
    # the dotted form on dbtr-eval: the keys not given (compounds, thresholds) stay as stored
    for name, extra in (("off", "false"), ("on", "true")):
        evals[name] = tmp_path / f"eval_{name}"
        run_cli(
            "dbtr-eval",
            f"ckpt_path={ckpt}",
            *common[:3],
            f"model.evaluation.sparc.enabled={extra}",
            f"hydra.run.dir={evals[name]}",
            cwd=tmp_path,
        )
    on, off = _metrics(evals["on"]), _metrics(evals["off"])
    assert on["test/mAP"] == pytest.approx(_metrics(trained)["test/mAP"], abs=1e-9)  # stored with the model
    assert on["test/mAP_base"] == pytest.approx(off["test/mAP"], abs=1e-9) and "test/mAP_base" not in off


def test_cooccurrence_needs_captions(demo_dir, tmp_path):
    proc = run_cli(
        "dbtr-train",
        "experiment=tiny_zsclip",
        f"paths.tiny_dir={demo_dir}",
        "model=sparc",
        "data.train_captions=null",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "compounds=cooccurrence counts class co-occurrence in the training captions" in proc.stderr


def test_row_collector_rows_align_with_the_scores():
    """Repeated samples (DDP padding) are dropped and rows come back in the scores' order."""
    from dbtr.metrics import RowCollector, ScoreCollector

    scores, rows = ScoreCollector(), RowCollector()
    for idx in ([3, 1], [0, 2], [3]):
        i = torch.tensor(idx)
        scores.update(i[:, None].float().repeat(1, 2), torch.ones(len(idx), 2), i)
        rows.update(10 * i[:, None].float().repeat(1, 5), i)
    s, _ = scores.compute()
    np.testing.assert_array_equal(rows.compute()[:, 0].numpy(), 10 * s[:, 0].numpy())
    assert rows.compute().shape == (4, 5)


def test_compound_prompts_write_classes_as_the_model_prompts_them():
    """With a model's prompt names (TaI-DPT's vocabulary), SPARC's compounds and string matching use the same
    class texts as T0, not the label names."""
    from dbtr.zeroshot.sparc import build_compound_prompts, match_classes

    names = ["diningtable", "dog"]
    plain = build_compound_prompts(names, "all_pairs")
    own = build_compound_prompts(names, "all_pairs", prompt_names={"diningtable": "diningtable"})
    assert "dining table" in plain.texts[0] and "diningtable" not in plain.texts[0]
    assert "diningtable" in own.texts[0] and "dining table" not in own.texts[0]
    assert match_classes("a diningtable and a dog", names, {"diningtable": "diningtable"}) == [0, 1]
    assert match_classes("a diningtable and a dog", names) == [1]
