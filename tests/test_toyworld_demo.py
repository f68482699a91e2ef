"""The shipped toy-world CLIP and a reduced main job: the realism signatures and the README's claims.

The reduced run (4,000 captions, 200 val and 500 test images, 6 epochs) is the CI-sized version of
`make demo`. Each README claim about trained methods is asserted with a margin of half the smallest gap
measured for it in that same reduced run over head-training seeds 1, 2 and 3 (MEASURED below), so a real
regression fails and seed noise does not. Signature b is asserted at its own thresholds (3x, 60 %; measured
5.2x, 70.3 %). Signature a (local aggregation beats global by 2 mAP) fails on the shipped CLIP (measured -0.35
here, -0.45 to -0.68 on the full worlds) and is reported, not asserted: README "Toy world".
"""

from __future__ import annotations

import json

import pytest

from dbtr.utils.hydra_utils import ASSETS_DIR

TOYCLIP = ASSETS_DIR / "toyclip"
REDUCED = ["data.num_captions=4000", "data.num_val=200", "data.num_test=500", "trainer.max_epochs=6"]
METHODS = ["zsclip", "zsclip_centered", "zsclip_local", "taskres_global", "dual_noattn", "taidpt", "dbtr"]
# Reduced run, shipped toyclip (generator v2), 2-core CPU, 2026-12-02: test-mAP gaps per head seed 1/2/3.
MEASURED: dict[str, tuple[float, ...]] = {
    "taskres_global-zsclip_centered": (2.67, 2.69, 2.69),
    "dual_noattn-zsclip_centered": (2.37, 2.35, 2.38),
    "dbtr-zsclip_centered": (1.14, 1.14, 1.15),
    "dual_noattn-dbtr": (1.24, 1.21, 1.23),
    "dbtr-taidpt": (0.83, 0.93, 0.48),
}
# README "What this shows" claims as (better, worse); each gap is asserted >= half its smallest value.
CLAIMS: tuple[tuple[str, str], ...] = tuple(tuple(k.split("-")) for k in MEASURED)  # type: ignore[misc]


def test_shipped_model_is_small_and_loads_by_path():
    assert (TOYCLIP / "model.safetensors").is_file(), f"the toy-world CLIP is missing from {TOYCLIP}"
    assert (TOYCLIP / "model.safetensors").stat().st_size < 20_000_000
    from dbtr.models.clip import ClipEncoder

    enc = ClipEncoder.from_pretrained(str(TOYCLIP), dense="maskclip")
    assert enc.image_size == 64 and enc.embed_dim == 128 and enc.model.dtype.is_floating_point
    stats = json.loads((TOYCLIP / "pretrain_stats.json").read_text())
    assert stats["world_generator"] == 2 and stats["steps"] > 0
    assert stats["loss_history"][-1][1] < 0.6 * stats["loss_history"][0][1]


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    from dbtr.toyworld.demo import quiet_lightning, run_demo

    quiet_lightning()
    out = tmp_path_factory.mktemp("toyworld")
    overrides = [f"paths.toyworld_dir={out / 'world'}", *REDUCED]
    return out, run_demo(out / "demo", seeds=(1,), methods=METHODS, overrides=overrides, centered=False)


def _half_smallest(key: str) -> float:
    return min(MEASURED[key]) / 2


@pytest.mark.slow
def test_signatures_are_the_demo_runs_numbers(reduced_demo):
    _, summary = reduced_demo
    sig = summary["signatures"]
    # the signature's zsclip / zsclip_local are the demo's runs of those configs (same dense mode here)
    assert sig["zsclip_mAP"] == pytest.approx(summary["methods"]["zsclip"]["mAP"], abs=1e-9)
    assert sig["dense_mode"] == "maskclip"
    assert sig["zsclip_local_mAP"] == pytest.approx(summary["methods"]["zsclip_local"]["mAP"], abs=1e-9)


@pytest.mark.slow
def test_signature_b_zero_shot_attention_finds_the_objects(reduced_demo):
    _, summary = reduced_demo
    sig = summary["signatures"]
    assert sig["mass_in_box"] >= 3.0 * sig["uniform_mass"] and sig["peak_in_box"] >= 60.0, sig


@pytest.mark.slow
def test_signatures_c_and_d_zero_shot_in_range_and_dominated_by_large_objects(reduced_demo):
    _, summary = reduced_demo
    sig = summary["signatures"]
    assert sig["chance_mAP"] + 30 <= sig["zsclip_mAP"] <= 90
    assert sig["zsclip_by_size"]["mAP_small"] <= sig["zsclip_by_size"]["mAP_large"] - 5


@pytest.mark.slow
@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{a}>{b}" for a, b in CLAIMS])
def test_readme_claims_hold_in_the_reduced_run(reduced_demo, claim):
    _, summary = reduced_demo
    better, worse = claim
    gap = summary["methods"][better]["mAP"] - summary["methods"][worse]["mAP"]
    need = _half_smallest(f"{better}-{worse}")
    assert gap >= need, f"{better} - {worse} = {gap:.2f} test mAP; the README's claim needs >= {need:.2f}"


@pytest.mark.slow
def test_demo_writes_the_stable_summary_and_tabulates_with_dbtr_results(reduced_demo):
    from dbtr.cli.results import build_table, collect

    out, summary = reduced_demo
    on_disk = json.loads((out / "demo" / "results.json").read_text())
    for method in METHODS:
        assert {"mAP", "mAP_small", "mAP_medium", "mAP_large"} <= set(on_disk["methods"][method])
    assert {"local_minus_global", "mass_in_box", "uniform_mass", "peak_in_box"} <= set(on_disk["signatures"])
    runs, skipped = collect([str(out / "demo" / "runs")])
    assert not skipped and sorted(r.method for r in runs) == sorted(METHODS)
    rows = {row["method"]: row for row in build_table(runs, ["test/mAP"]).rows}
    for method in METHODS:
        assert rows[method]["cells"][(0, "test/mAP")][0] == summary["methods"][method]["per_seed"]["mAP"]
    assert rows["dbtr"]["made_by"] == "experiment=toyworld model=dbtr " + " ".join(REDUCED)
    assert (out / "demo" / "heatmaps.png").stat().st_size > 1000
