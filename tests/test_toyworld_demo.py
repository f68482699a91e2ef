"""The shipped toy-world CLIP and a reduced main job: honest zero-shot, the method's gain, localisation.

The reduced run (4,000 captions, 200 val and 500 test images, 6 epochs) is the CI-sized version of
`make demo`. Its margin was chosen from the same reduced run over head-training seeds 1, 2 and 3
(see MEASURED below): the assertion keeps well under the smallest gain seen.
"""

from __future__ import annotations

import json

import pytest

from dbtr.utils.hydra_utils import ASSETS_DIR

TOYCLIP = ASSETS_DIR / "toyclip"
# Reduced run, test mAP for head-training seeds 1/2/3 (shipped toyclip, 2026-11-28, 2-core CPU).
MEASURED = {"zsclip": (82.65, 82.65, 82.65), "dbtr": (86.70, 86.70, 86.67)}
# Half the smallest measured gain (4.02): a real regression fails, run-to-run noise (std 0.03) does not.
MARGIN = 2.0


def test_shipped_model_is_small_and_loads_by_path():
    assert (TOYCLIP / "model.safetensors").is_file(), f"the toy-world CLIP is missing from {TOYCLIP}"
    assert (TOYCLIP / "model.safetensors").stat().st_size < 5_000_000
    from dbtr.models.clip import ClipEncoder

    enc = ClipEncoder.from_pretrained(str(TOYCLIP), dense="naive")
    assert enc.image_size == 64 and enc.embed_dim == 128 and enc.model.dtype.is_floating_point
    stats = json.loads((TOYCLIP / "pretrain_stats.json").read_text())
    assert stats["steps"] > 0 and stats["loss_history"][-1][1] < stats["loss_history"][0][1]


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    from dbtr.toyworld.demo import quiet_lightning, run_demo

    quiet_lightning()
    out = tmp_path_factory.mktemp("toyworld")
    overrides = [
        f"paths.toyworld_dir={out / 'world'}",
        "data.num_captions=4000",
        "data.num_val=200",
        "data.num_test=500",
        "trainer.max_epochs=6",
    ]
    return out, run_demo(out / "demo", seeds=(1,), methods=["zsclip", "dbtr"], overrides=overrides)


@pytest.mark.slow
def test_zero_shot_is_well_above_chance_and_well_below_100(reduced_demo):
    _, summary = reduced_demo
    zs = summary["methods"]["zsclip"]["mAP"][0]
    assert summary["chance_mAP"] + 30 < zs < 95


@pytest.mark.slow
def test_full_method_beats_zero_shot_by_the_measured_margin(reduced_demo):
    _, summary = reduced_demo
    gain = summary["methods"]["dbtr"]["mAP"][0] - summary["methods"]["zsclip"]["mAP"][0]
    assert gain >= MARGIN, f"full method gains {gain:.2f} mAP over zero-shot; expected >= {MARGIN}"


@pytest.mark.slow
def test_local_branch_attends_inside_the_true_boxes(reduced_demo):
    out, summary = reduced_demo
    loc = summary["localization"]
    assert loc["mass_in_box"] > 1.3 * loc["mass_in_box_uniform"]
    assert loc["pointing_accuracy"] > loc["mass_in_box_uniform"]
    assert (out / "demo" / "heatmaps.png").stat().st_size > 1000
    assert "| full method" in (out / "demo" / "results.md").read_text()


@pytest.mark.slow
def test_demo_runs_tabulate_with_dbtr_results(reduced_demo):
    from dbtr.cli.results import build_table, collect

    out, summary = reduced_demo
    runs, skipped = collect([str(out / "demo" / "runs")])
    assert not skipped and sorted(r.method for r in runs) == ["dbtr", "zsclip"]
    rows = {row["method"]: row for row in build_table(runs, ["test/mAP"]).rows}
    for method in ("zsclip", "dbtr"):
        assert rows[method]["cells"][(0, "test/mAP")][0] == summary["methods"][method]["mAP"]
    assert rows["dbtr"]["made_by"] == (
        "experiment=toyworld model=dbtr data.num_captions=4000 data.num_val=200 "
        "data.num_test=500 trainer.max_epochs=6"
    )
