"""PR-curve data, the plot files, and the loggers: wandb offline (config, losses, mAP, table, images), none."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dbtr.metrics import average_precision_per_class, precision_recall_curves
from dbtr.viz import heatmap_figure, per_class_ap_figure, pr_curves_figure, save_figure

PLOTS = ("per_class_ap.png", "pr_curves.png", "heatmaps.png")


@pytest.mark.parametrize("difficult", ["negative", "ignore"])
def test_pr_curves_are_the_points_the_ap_sums(difficult):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(60, 4)).astype(float)  # many ties: one point per distinct score
    labels = rng.choice([-1, 0, 1], size=(60, 4), p=[0.5, 0.2, 0.3])
    labels[:, 3] = -1
    ap = average_precision_per_class(scores, labels, difficult=difficult)
    curves = precision_recall_curves(scores, labels, difficult=difficult)
    assert curves[3] is None and np.isnan(ap[3])
    for c in range(3):
        precision, recall = curves[c]
        assert len(precision) == len(np.unique(scores[labels[:, c] != 0, c] if difficult == "ignore" else scores[:, c]))
        assert np.all(np.diff(recall) >= 0) and recall[-1] == 1.0
        assert np.sum(np.diff(recall, prepend=0.0) * precision) == pytest.approx(ap[c], abs=1e-12)


def test_pr_curves_match_sklearn():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=(50, 3)).round(1), rng.choice([0, 1], size=(50, 3))
    for c, (precision, recall) in enumerate(precision_recall_curves(scores, labels)):
        sk_p, sk_r, _ = precision_recall_curve(labels[:, c], scores[:, c])
        n = len(sk_p) - 1  # sklearn appends (P=1, R=0) and may stop at the first full recall
        np.testing.assert_allclose(precision[:n], sk_p[:-1][::-1])
        np.testing.assert_allclose(recall[:n], sk_r[:-1][::-1])


def test_figures_are_written_as_png(tmp_path):
    ap = [0.9, float("nan"), 0.4]
    curves = precision_recall_curves(np.array([[0.9, 0.1, 0.3], [0.2, 0.2, 0.8]]), np.array([[1, 0, 1], [0, 0, 1]]))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    figures = {"ap.png": per_class_ap_figure(["a", "b", "c"], ap), "pr.png": pr_curves_figure(["a", "b", "c"], curves),
               "heat.png": heatmap_figure([(image, [("a", np.eye(4)), ("b", np.ones((4, 4)) / 16)])])}
    for name, fig in figures.items():
        with Image.open(save_figure(fig, tmp_path / "sub" / name)) as im:
            assert im.format == "PNG" and im.size[0] >= 200
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(figures)  # no temporary leftovers
    with pytest.raises(ValueError, match="AP values"):
        per_class_ap_figure(["a"], ap)
    with pytest.raises(ValueError, match="no image"):
        heatmap_figure([])


def test_run_folder_has_every_plot(wandb_run):
    for name in PLOTS:
        with Image.open(wandb_run / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300, name


def test_wandb_offline_run_holds_config_losses_map_table_and_plots(wandb_run):
    metrics = json.loads((wandb_run / "metrics.json").read_text())
    (offline,) = (wandb_run / "wandb").glob("offline-run-*")  # offline by default: `wandb sync` uploads it later
    (table,) = offline.glob("files/media/table/test/per_class_AP_*.table.json")
    rows = json.loads(table.read_text())
    assert rows["columns"] == ["class", "AP"]
    assert dict(rows["data"]) == metrics["test"]["test/per_class_AP"]
    logged = sorted(p.name.rsplit("_", 2)[0] for p in offline.glob("files/media/images/plots/*.png"))
    assert logged == sorted(p.removesuffix(".png") for p in PLOTS)
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    for key in (b"train/loss", b"val/mAP", b"test/mAP", b"cache_caption_features", b"model_checkpoint"):
        assert key in data, key  # losses, metrics and the resolved config (its keys) are in the run's records


def test_logger_none_trains_and_still_writes_plots(demo_dir, tmp_path, cli):
    run = tmp_path / "run"
    cli("dbtr-train", "experiment=tiny_full", f"paths.tiny_dir={demo_dir}", f"hydra.run.dir={run}",
        "trainer.max_epochs=2", "logger=none", cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text())["test"]["test/mAP"] > 0
    assert all((run / "plots" / name).is_file() for name in PLOTS)
    assert not (run / "csv").exists() and not (run / "wandb").exists()
