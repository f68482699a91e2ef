"""The console entry points end to end on generated data (CPU): dbtr-train then dbtr-eval on the demo data,
and dbtr-toyworld on a tiny world (the reduced and full demos are the slow tests in test_toyworld_demo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=3",
        "seed=3",
        cwd=run.parent,
    )
    return run


def test_train_writes_run_folder_and_metrics(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert (trained / ".hydra" / "config.yaml").is_file()
    test = metrics["test"]
    for key in ("test/mAP", "test/mAP_global", "test/mAP_local", "test/CF1@3", "test/OF1@3"):
        assert 0.0 <= test[key] <= 100.0, key
    assert len(test["test/per_class_AP"]) == 6 and test["test/num_images"] == 32
    assert metrics["selection"]["monitor"] == "val/mAP"
    assert Path(metrics["checkpoint"]).is_file() and (trained / "checkpoints" / "last.ckpt").is_file()
    assert metrics["timings"]["cache_captions_s"] > 0


def test_checkpoint_holds_only_heads_and_plain_hparams(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == {"head.global_classifier.residual", "head.local_classifier.residual"}
    assert ckpt["state_dict"]["head.global_classifier.residual"].shape == (6, 32)
    assert ckpt["state_dict"]["head.global_classifier.residual"].abs().sum() > 0  # it trained
    hp = ckpt["hyper_parameters"]
    assert hp["class_names"][0] == "red" and hp["clip"]["name_or_path"].endswith("clip")
    assert "encoder" not in hp


def test_load_from_checkpoint_without_hydra_reproduces_eval(trained, demo_dir):
    from dbtr import DbtrLitModule
    from dbtr.data.images import ClipImageTransform, ImageDataset, read_image_jsonl
    from dbtr.metrics import mean_average_precision

    model = DbtrLitModule.load_from_checkpoint(
        json.loads((trained / "metrics.json").read_text())["checkpoint"]
    )
    records = read_image_jsonl(demo_dir / "images", demo_dir / "test.jsonl", model.class_names)
    ds = ImageDataset(records, ClipImageTransform(32))
    batch = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    with torch.no_grad():
        scores = model(batch).logits
    expected = json.loads((trained / "metrics.json").read_text())["test"]["test/mAP"]
    assert mean_average_precision(scores, records.labels) == pytest.approx(expected, abs=1e-6)


def test_eval_cli_matches_train_test(trained, demo_dir, tmp_path):
    ckpt = json.loads((trained / "metrics.json").read_text())["checkpoint"]
    run_cli(
        "dbtr-eval",
        f"ckpt_path={ckpt}",
        "data=tiny",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    want = json.loads((trained / "metrics.json").read_text())["test"]
    assert got["test/mAP"] == pytest.approx(want["test/mAP"], abs=1e-9)
    assert got["test/per_class_AP"] == want["test/per_class_AP"]
    assert (tmp_path / "eval" / "plots" / "pr_curves.png").is_file()  # dbtr-eval draws the test plots too


@pytest.mark.slow
def test_eval_refuses_other_class_list(trained, demo_dir, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\nyellow\npurple\nbrown\n")
    labels = tmp_path / "test.jsonl"
    labels.write_text((demo_dir / "test.jsonl").read_text().replace('"orange"', '"brown"'))
    proc = run_cli(
        "dbtr-eval",
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        "data=tiny",
        f"paths.tiny_dir={demo_dir}",
        f"data.classes={classes}",
        f"data.test_labels={labels}",
        f"hydra.run.dir={tmp_path / 'e'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "trained on 6 classes" in proc.stderr and "only in checkpoint: ['orange']" in proc.stderr


@pytest.mark.slow
def test_eval_refuses_clip_with_other_embedding_size(trained, demo_dir, tmp_path):
    from dbtr.models.tiny import save_random_clip

    other = tmp_path / "clip48"
    shutil.copytree(demo_dir / "clip", other)
    save_random_clip(other, ["a red square"], projection_dim=48, vision_image_size=32)
    proc = run_cli(
        "dbtr-eval",
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        "data=tiny",
        f"paths.tiny_dir={demo_dir}",
        f"clip.name_or_path={other}",
        f"hydra.run.dir={tmp_path / 'e'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "CLIP projection dim 48" in proc.stderr and "embedding size 32" in proc.stderr


def test_training_free_baseline_skips_fit(demo_dir, tmp_path):
    run_cli(
        "dbtr-train",
        "experiment=tiny_zsclip",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={tmp_path / 'zs'}",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert metrics["checkpoint"] is None and "fit_s" not in metrics["timings"]
    assert "test/mAP_local" not in metrics["test"] and 0 < metrics["test"]["test/mAP"] <= 100


@pytest.mark.slow
def test_eval_refuses_another_clip_of_the_same_size_unless_allowed(trained, demo_dir, tmp_path):
    from dbtr.models.tiny import save_random_clip

    other = tmp_path / "clip_other"
    save_random_clip(other, ["a red square"], seed=7, vision_image_size=32)
    args = [
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        "data=tiny",
        f"paths.tiny_dir={demo_dir}",
        f"clip.name_or_path={other}",
    ]
    proc = run_cli("dbtr-eval", *args, f"hydra.run.dir={tmp_path / 'e1'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "not the one the residuals were trained on" in proc.stderr
    proc = run_cli(
        "dbtr-eval",
        *args,
        "data.image_size=48",
        "allow_mismatch=true",
        f"hydra.run.dir={tmp_path / 'e2'}",
        cwd=tmp_path,
    )
    assert (tmp_path / "e2" / "metrics.json").is_file()
    assert "image preprocessing differs" in proc.stderr + proc.stdout


def test_toyworld_cli_on_a_tiny_world(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(
        "dbtr-toyworld",
        "--methods",
        "zsclip",
        "dbtr",
        "--out",
        str(out),
        f"paths.toyworld_dir={tmp_path / 'world'}",
        "data.num_captions=300",
        "data.num_val=20",
        "data.num_test=40",
        "trainer.max_epochs=2",
        cwd=tmp_path,
    )
    summary = json.loads((out / "results.json").read_text())
    assert summary["num_test_images"] == 40 and summary["num_captions"] == 300 and summary["seeds"] == [1]
    assert summary["generator"] == 2 and summary["world_seed"] == 0
    zs, full = summary["methods"]["zsclip"]["mAP"], summary["methods"]["dbtr"]["mAP"]
    assert summary["chance_mAP"] + 10 < zs < 100 and 0 < full <= 100  # the shipped toy CLIP, far above chance
    sig = summary["signatures"]
    assert sig["zsclip_mAP"] == pytest.approx(zs)  # the signatures' heads are the zsclip run's, exactly
    assert {"local_minus_global", "mass_in_box", "uniform_mass", "peak_in_box"} <= set(sig)
    assert f"{zs:.2f}" in proc.stdout and "toy world, test split (40 images)" in proc.stdout
    md = (out / "results.md").read_text()
    assert "| full method" in md and "Realism signatures" in md
    assert (out / "heatmaps.png").stat().st_size > 1000
    # the trained method also ran centred, in its own run folder; the training-free one did not
    assert summary["methods"]["dbtr"]["centered"]["config"].endswith("model.head.center_scores=true")
    assert "centered" not in summary["methods"]["zsclip"]
    for method, value in (("zsclip", zs), ("dbtr", full)):  # one run folder per method and seed, as tabulated
        test = json.loads((out / "runs" / method / "seed1" / "metrics.json").read_text())["test"]
        assert test["test/mAP"] == value
        for size in ("small", "medium", "large"):  # the toy world's labels carry boxes
            assert test[f"test/mAP_{size}"] == summary["methods"][method][f"mAP_{size}"]
    assert (out / "runs" / "dbtr_centered" / "seed1" / "metrics.json").is_file()


@pytest.mark.slow
def test_eval_keeps_the_checkpoints_clip_settings_and_refuses_model_overrides(demo_dir, tmp_path):
    """An experiment's clip group does not replace the dense mode the checkpoint was trained with, the record
    says what was used, and a model override (which could not apply) is refused instead of recorded."""
    run = tmp_path / "maskclip"
    run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=2",
        "clip.dense=maskclip",
        cwd=tmp_path,
    )
    trained = json.loads((run / "metrics.json").read_text())
    common = [f"ckpt_path={trained['checkpoint']}", "experiment=tiny_full", f"paths.tiny_dir={demo_dir}"]
    run_cli("dbtr-eval", *common, f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    got = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert got["config"]["clip"]["dense"] == "maskclip"
    assert got["test"]["test/mAP"] == pytest.approx(trained["test"]["test/mAP"], abs=1e-9)
    proc = run_cli(
        "dbtr-eval",
        *common,
        "+model.head.alpha=0.9",
        f"hydra.run.dir={tmp_path / 'e2'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot apply +model.head.alpha=0.9" in proc.stderr and "model.evaluation" in proc.stderr
    assert not (tmp_path / "e2" / "metrics.json").exists()
    explicit = run_cli(
        "dbtr-eval", *common, "clip.dense=naive", f"hydra.run.dir={tmp_path / 'e3'}", cwd=tmp_path
    )
    assert json.loads((tmp_path / "e3" / "metrics.json").read_text())["config"]["clip"]["dense"] == "naive", (
        explicit
    )
