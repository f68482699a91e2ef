"""Research protocols: every experiment file runs a tiny version end to end on native-layout fixtures; the
ZSL/GZSL F1@k, the masked partial-label loss, unseen-class residuals and the text/image ensemble are checked
against direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dbtr.data.benchmarks import synthetic
from dbtr.losses import get_loss, split_labels
from dbtr.metrics import f1_at_k, mean_average_precision, minmax

EXPERIMENTS = (
    "voc2007_captions",
    "coco2014_captions",
    "nuswide_captions",
    "voc2007_partial",
    "coco2014_partial",
    "nuswide_partial",
    "coco2014_seen_unseen",
    "nuswide_seen_unseen",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """VOCdevkit/VOC2007, coco/ and nuswide/ in their native layouts under one paths.data_dir."""
    root = tmp_path_factory.mktemp("benchmarks")
    synthetic.random_voc2007(root, num_trainval=24, num_test=12)
    synthetic.random_coco2014(root / "coco", num_train=24, num_val=12)
    synthetic.random_nuswide(root / "nuswide", num_train=24, num_test=12)
    # a small caption corpus for the *_captions runs: two sentences per class of each vocabulary
    # (not C x 81 templates)
    from dbtr.text.synonyms import BUILTIN_VOCABULARIES, builtin_vocabulary

    names = sorted({n for v in BUILTIN_VOCABULARIES for n in builtin_vocabulary(v).prompt_names})
    (root / "captions.txt").write_text("".join(f"a photo of a {n}.\na {n} in the wild.\n" for n in names))
    return root


def tiny_overrides(data_dir: Path, demo_dir: Path, out: Path) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        "clip=tiny",
        f"paths.tiny_dir={demo_dir}",
        f"data.corpus.sources=[{{type: text_lines, path: {data_dir / 'captions.txt'}}}]",
        "data.corpus.class_sentences=null",
        "trainer.max_epochs=2",
        "model.templates=simple",
        "data.val_size=6",
        "data.num_workers=0",
        "data.batch_size=64",
        f"cache_dir={out.parent / 'cache'}",
        f"paths.output_dir={out}",
        "logger=none",
        "callbacks=none",
    ]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_tiny_version(experiment, data_dir, demo_dir, tmp_path):
    from dbtr.cli.train import train
    from dbtr.toyworld.demo import compose_config

    cfg = compose_config([f"experiment={experiment}", *tiny_overrides(data_dir, demo_dir, tmp_path / "run")])
    assert cfg.task_name == experiment and cfg.trainer.max_epochs == 2
    metrics, objects = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    dm = objects["datamodule"]
    assert saved["test"]["test/mAP"] == pytest.approx(metrics["test/mAP"]) and 0 < metrics["test/mAP"] <= 100
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["val"]["num_items"] == 6
    if experiment.endswith("_captions"):
        assert dm.train_on == "captions" and (tmp_path / "run" / "corpus_report.json").is_file()
    else:
        assert dm.train_on == "images" and len(dm.train_records) == 18  # 24 training images minus 6 held out
    if experiment.endswith("_partial"):
        known = (dm.train_records.labels != 0).mean()
        assert 0.3 < known < 0.7 and Path(cfg.data.partial_file).is_file()
    if experiment.endswith("_seen_unseen"):
        unseen = dm.class_subsets["unseen"]
        cols = [dm.class_names.index(c) for c in unseen]
        assert (dm.train_records.labels[:, cols] == 0).all()  # no unseen label reaches training
        for key in (
            "test/unseen/mAP",
            "test/unseen/F1@3",
            "test/unseen/F1@5",
            "test/F1@3",
            "test/F1@5",
            "test/seen/mAP",
        ):
            assert key in metrics
        model = objects["model"]
        np.testing.assert_allclose(
            model.head.global_classifier(model.head.class_embeds)[cols].detach().numpy(),
            model.head.class_embeds[cols].numpy(),
            atol=1e-6,
        )  # unseen keep T0


@pytest.mark.slow
def test_partial_then_ensemble_through_the_cli(data_dir, demo_dir, tmp_path):
    """The text-only model inside the ensemble reproduces its own run's test mAP on the same cached
    features."""
    from cli_helpers import run_cli

    common = [
        o for o in tiny_overrides(data_dir, demo_dir, tmp_path / "x") if not o.startswith("paths.output_dir")
    ]
    run_cli(
        "dbtr-train", "experiment=voc2007_captions", *common, f"hydra.run.dir={tmp_path / 'zs'}", cwd=tmp_path
    )
    zs = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    ckpt = zs["checkpoint"]
    run_cli(
        "dbtr-train",
        "experiment=voc2007_partial",
        *common,
        "data.label_proportion=0.3",
        f"model.init_from='{ckpt}'",
        f"model.ensemble.text_ckpt='{ckpt}'",
        "model.ensemble.rate=0.7",
        f"hydra.run.dir={tmp_path / 'partial'}",
        cwd=tmp_path,
    )
    test = json.loads((tmp_path / "partial" / "metrics.json").read_text())["test"]
    assert test["test/mAP_text"] == pytest.approx(zs["test"]["test/mAP"], abs=1e-4)
    assert {"test/mAP", "test/mAP_ensemble"} <= set(test)


# ------------------------------------------------------------------------------------------------ units
def test_f1_at_k_matches_hand_computation():
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.2, 0.1, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]])
    labels = np.array([[1, -1, 1, -1], [-1, -1, 1, 1], [-1, -1, -1, 1]])
    # top-2: {0,1}, {2,3}, {0,1} -> correct 1 + 2 + 0 = 3 of 6 predictions; positives 5
    out = f1_at_k(scores, labels, 2)
    p, r = 3 / 6, 3 / 5
    assert out["P"] == pytest.approx(100 * p) and out["R"] == pytest.approx(100 * r)
    assert out["F1"] == pytest.approx(100 * 2 * p * r / (p + r))
    with pytest.raises(ValueError, match="k=5 must lie in"):
        f1_at_k(scores, labels, 5)


@pytest.mark.parametrize("loss", ["ranking", "asl", "bce"])
def test_partial_label_loss_ignores_unknown_labels(loss):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor(
        [
            [1, 0, -1, -1, 0],
            [0, 1, -1, 0, -1],
            [1, -1, 0, 0, 1],
            [-1, 1, 0, -1, 0],
            [0, 0, 1, -1, -1],
            [1, 0, 0, 0, -1],
        ]
    )
    targets, known = split_labels(labels, signed=True)
    get_loss(loss)(logits, targets, known).backward()
    assert (logits.grad[labels == 0] == 0).all() and (logits.grad[labels != 0] != 0).any()
    # and the value does not depend on what the unknown entries would have been
    other = torch.where(labels == 0, torch.ones_like(labels), labels)
    logits2 = logits.detach().clone()
    t2, k2 = split_labels(torch.where(labels == 0, 0, other), signed=True)
    assert torch.equal(k2, known) and torch.allclose(
        get_loss(loss)(logits2, t2, k2), get_loss(loss)(logits2, targets, known)
    )


def _module(encoder, classes, **kw):
    from dbtr.system.lit_module import DbtrLitModule

    model = DbtrLitModule(
        clip={"name_or_path": "unused"}, class_names=classes, encoder=encoder, templates="simple", **kw
    )
    model.ensure_class_embeddings()
    return model


def test_ensemble_equals_direct_minmax_combination(encoder):
    classes = ["red", "green", "blue", "yellow"]
    model, text = (
        _module(encoder, classes, ensemble={"text_ckpt": "x", "rate": 0.8}),
        _module(encoder, classes),
    )
    torch.manual_seed(1)
    for m in (model, text):
        m.head.global_classifier.residual.data.normal_(0, 0.3)
        m.head.local_classifier.residual.data.normal_(0, 0.3)
    object.__setattr__(model, "text_model", text)
    d = encoder.embed_dim
    batch = {
        "image_embeds": torch.nn.functional.normalize(torch.randn(12, d), dim=-1),
        "patch_embeds": torch.nn.functional.normalize(torch.randn(12, 9, d), dim=-1),
        "labels": torch.tensor(np.where(np.random.default_rng(0).random((12, 4)) < 0.4, 1, -1)),
        "index": torch.arange(12),
    }
    model._eval_step("test", batch)
    result = model._eval_epoch_end("test")
    with torch.no_grad():
        a = text.head(batch["image_embeds"], batch["patch_embeds"]).logits
        b = model.head(batch["image_embeds"], batch["patch_embeds"]).logits
    direct = 0.2 * (a - a.min()) / (a.max() - a.min()) + 0.8 * (b - b.min()) / (b.max() - b.min())
    assert torch.allclose(minmax(a), (a - a.min()) / (a.max() - a.min()))
    assert result["test/mAP_ensemble"] == pytest.approx(
        mean_average_precision(direct, batch["labels"]), abs=1e-9
    )
    assert result["test/mAP_text"] == pytest.approx(mean_average_precision(a, batch["labels"]), abs=1e-9)


def test_residual_classes_are_checked_against_subsets_and_names(encoder):
    classes = ["red", "green", "blue", "yellow"]
    subsets = {"seen": ["red", "green"], "unseen": ["blue", "yellow"]}
    listed = _module(encoder, classes, residual_classes=["yellow", "red"])
    assert listed.head.global_classifier.row_mask.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"residual_classes='seen' is not one of the class subsets \[\]"):
        _module(encoder, classes, residual_classes="seen")
    with pytest.raises(
        ValueError, match=r"residual_classes names classes that are not in class_names: \['pink'\]"
    ):
        _module(encoder, classes, class_subsets=subsets, residual_classes=["red", "pink"])


def test_unseen_classes_keep_t0_and_the_generator_transfers(encoder):
    classes = ["red", "green", "blue", "yellow"]
    subsets = {"seen": ["red", "green"], "unseen": ["blue", "yellow"]}
    model = _module(encoder, classes, class_subsets=subsets, residual_classes="seen")
    with torch.no_grad():
        model.head.global_classifier.residual.add_(0.5)  # as if trained: every row moved
    t0, t = model.head.class_embeds, model.head.global_classifier(model.head.class_embeds)
    assert torch.allclose(t[2:], t0[2:]) and not torch.allclose(t[:2], t0[:2])
    gen = _module(encoder, classes, class_subsets=subsets, head={"residual_generator": 16})
    assert torch.allclose(
        gen.head.global_classifier(gen.head.class_embeds), gen.head.class_embeds
    )  # zero-init
    opt = torch.optim.SGD(gen.head.parameters(), lr=0.5)
    x = torch.nn.functional.normalize(torch.randn(8, encoder.embed_dim), dim=-1)
    labels = torch.tensor([[1, -1, 0, 0]] * 4 + [[-1, 1, 0, 0]] * 4)  # seen labels only
    for _ in range(3):
        out = gen.head(x, x[:, None, :].expand(8, 4, -1))
        loss = sum(gen.branch_losses(out, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = gen.head.global_classifier(gen.head.class_embeds) - gen.head.class_embeds
    assert moved[2:].abs().sum() > 0  # unseen names get g(T0) learned from seen labels


def test_zsl_requires_a_partitioning_split():
    from dbtr.data.benchmarks.datamodule import VOC2007DataModule

    with pytest.raises(ValueError, match="train_classes=seen needs data.class_split"):
        VOC2007DataModule("/nonexistent", train_classes="seen")


@pytest.mark.slow
def test_label_proportion_sweep_is_one_multirun_command(data_dir, demo_dir, tmp_path):
    from cli_helpers import run_cli

    common = [
        o for o in tiny_overrides(data_dir, demo_dir, tmp_path / "x") if not o.startswith("paths.output_dir")
    ]
    run_cli(
        "dbtr-train",
        "-m",
        "experiment=voc2007_partial",
        *common,
        "data.label_proportion=0.2,0.6",
        f"data.partial_file={tmp_path}/masks/p${{data.label_proportion}}.npz",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    props = [json.loads(r.read_text())["config"]["data"]["label_proportion"] for r in runs]
    assert sorted(props) == [0.2, 0.6] and len(list((tmp_path / "masks").glob("*.npz"))) == 2
