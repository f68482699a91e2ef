"""PR-curve data, the plot files, and the loggers: wandb offline (config, losses, mAP, table, images),
none."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dbtr.metrics import average_precision_per_class, precision_recall_curves
from dbtr.system.viz import (
    OVERLAY_ALPHA,
    crop_boxes,
    heatmap_figure,
    per_class_ap_figure,
    pr_curves_figure,
    read_boxes,
    save_figure,
    top_panels,
)

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
        assert len(precision) == len(
            np.unique(scores[labels[:, c] != 0, c] if difficult == "ignore" else scores[:, c])
        )
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
    curves = precision_recall_curves(
        np.array([[0.9, 0.1, 0.3], [0.2, 0.2, 0.8]]), np.array([[1, 0, 1], [0, 0, 1]])
    )
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    figures = {
        "ap.png": per_class_ap_figure(["a", "b", "c"], ap),
        "pr.png": pr_curves_figure(["a", "b", "c"], curves),
        "heat.png": heatmap_figure([(image, [("a", np.eye(4)), ("b", np.ones((4, 4)) / 16)])]),
    }
    for name, fig in figures.items():
        with Image.open(save_figure(fig, tmp_path / "sub" / name)) as im:
            assert im.format == "PNG" and im.size[0] >= 200
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(figures)  # no temporary leftovers
    with pytest.raises(ValueError, match="AP values"):
        per_class_ap_figure(["a"], ap)
    with pytest.raises(ValueError, match="no image"):
        heatmap_figure([])


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_heatmaps_share_one_colour_scale_with_one_colour_bar_and_draw_the_true_boxes():
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (64, 64), (220, 40, 40))
    names = ["apple", "leaf", "cookie"]
    att = rng.random((3, 4, 4)).astype(np.float32)
    att /= att.sum(axis=(1, 2), keepdims=True)
    att[1] = 0
    att[1, 0, 0] = 1.0  # one concentrated map: the figure's maximum
    boxes = {0: [(4.0, 4.0, 30.0, 30.0)], 2: [(40.0, 40.0, 60.0, 60.0), (2.0, 40.0, 20.0, 60.0)]}
    rows = [
        (image, top_panels(names, np.array([3.0, 2.0, 1.0]), att, k=3, marks=[0, 2], boxes=boxes), boxes),
        (image, top_panels(names, np.array([1.0, 2.0, 3.0]), att, k=2)),
    ]
    fig = heatmap_figure(rows, class_names=names)
    assert len(_colorbars(fig)) == 1
    overlays = [im for ax in fig.axes for im in ax.get_images() if im.get_array().shape == (4, 4)]
    assert len(overlays) == 5 and {im.get_clim() for im in overlays} == {
        (0.0, 1.0)
    }  # one scale: 0 .. the max
    assert all(im.get_alpha() == OVERLAY_ALPHA < 0.6 for im in overlays)  # the image shows through
    from matplotlib.patches import Rectangle

    grid = np.array(fig.axes[:-1]).reshape(2, 4)
    rects = [[sum(isinstance(p, Rectangle) for p in ax.patches) for ax in row] for row in grid]
    # two outlines (white + dark dashes) per box: the image gets all 3 boxes, each panel those of its class
    assert rects[0] == [6, 2, 0, 4] and rects[1] == [0, 0, 0, 0]
    assert sorted(t.get_text() for t in grid[0, 0].texts) == ["apple", "cookie", "cookie"]


def test_pr_curves_have_a_distinct_colour_per_class_and_distinct_styles_past_20():
    from matplotlib.colors import to_hex

    rng = np.random.default_rng(2)
    for n in (3, 12, 20, 33):
        scores, labels = rng.random((40, n)), rng.choice([0, 1], size=(40, n))
        labels[0] = 1
        fig = pr_curves_figure([f"c{i}" for i in range(n)], precision_recall_curves(scores, labels))
        lines = fig.axes[0].get_lines()
        assert len(lines) == n
        styles = {(to_hex(line.get_color()), line.get_linestyle()) for line in lines}
        assert len(styles) == n
        if n <= 20:
            assert len({to_hex(line.get_color()) for line in lines}) == n


def test_true_boxes_follow_the_centre_crop_and_come_from_the_labels_file(tmp_path):
    from dbtr.data.images import ClipImageTransform

    # a 100 x 50 image with a marked 10 x 10 square at (60, 20): after the crop the box must frame the mark
    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[20:30, 60:70] = 255
    crop = np.asarray(ClipImageTransform(32).crop(Image.fromarray(pixels)))
    boxes = crop_boxes(
        [
            {"label": "a", "box": [60, 20, 70, 30]},
            {"label": "zzz", "box": [0, 0, 5, 5]},
            {"label": "a", "box": [0, 0, 10, 10]},
        ],
        (100, 50),
        32,
        ["a"],
    )
    assert list(boxes) == [0] and len(boxes[0]) == 1  # unknown class and cropped-away box dropped
    x0, y0, x1, y1 = boxes[0][0]
    ys, xs = np.nonzero(crop[..., 0] > 128)
    assert x0 - 1 <= xs.min() and xs.max() <= x1 and y0 - 1 <= ys.min() and ys.max() <= y1
    labels = tmp_path / "test.jsonl"
    labels.write_text(
        json.dumps({"file_name": "x.png", "labels": ["a"], "boxes": [{"label": "a", "box": [1, 2, 3, 4]}]})
        + "\n"
        + json.dumps({"file_name": "y.png", "labels": []})
        + "\n"
    )
    assert read_boxes(labels, ["x.png", "y.png"]) == {"x.png": [{"label": "a", "box": [1, 2, 3, 4]}]}


def test_run_folder_has_every_plot(wandb_run):
    for name in PLOTS:
        with Image.open(wandb_run / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300, name


def test_wandb_offline_run_holds_config_losses_map_table_and_plots(wandb_run):
    metrics = json.loads((wandb_run / "metrics.json").read_text())
    (offline,) = (wandb_run / "wandb").glob(
        "offline-run-*"
    )  # offline by default: `wandb sync` uploads it later
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


@pytest.mark.slow
def test_logger_none_trains_and_still_writes_plots(demo_dir, tmp_path, cli):
    run = tmp_path / "run"
    cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=2",
        "logger=none",
        cwd=tmp_path,
    )
    assert json.loads((run / "metrics.json").read_text())["test"]["test/mAP"] > 0
    assert all((run / "plots" / name).is_file() for name in PLOTS)
    assert not (run / "csv").exists() and not (run / "wandb").exists()
