"""The main job: every method of the paper's table on the toy world, in one process, with shared caches.

    dbtr-toyworld                     # = python -m dbtr.toyworld.demo; writes .toyworld/demo/
    dbtr-toyworld --seeds 1 2 3       # mean +- std over head-training seeds

Each method and seed is one ``dbtr-train experiment=toyworld model=<name> seed=<s>`` run: the same configs and
the same :func:`dbtr.cli.train.train` (trained on captions only where it has residuals, selected on the
validation images by val mAP, tested once on the held-out test images), written to
``<out>/runs/<method>/seed<s>/``. CLIP is frozen, so the caption and image features come from the on-disk
cache (``cache_dir``, under the toy-world folder) after the first run, for the demo and for any later
``dbtr-train experiment=toyworld``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbtr.utils.errors import cli

METHODS: tuple[tuple[str, str], ...] = (
    ("zsclip", "zero-shot CLIP (global)"),
    ("zsclip_centered", "zero-shot CLIP, centred per image"),
    ("zsclip_local", "zero-shot global + local"),
    ("calip", "CALIP (training-free attention)"),
    ("sparc", "SPARC (training-free score normalisation)"),
    ("tagclip", "TagCLIP (training-free, patch-level)"),
    ("taskres_global", "TaskRes, global only"),
    ("dual_noattn", "dual branch, no attention"),
    ("taidpt", "TaI-DPT (double-grained prompts)"),
    ("dbtr", "full method (dual branch + PFA)"),
)


def compose_config(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    from dbtr.utils.hydra_utils import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name="train.yaml", overrides=list(overrides))


# Settings that change what a run prints and writes, never its numbers: one progress line per run instead.
QUIET_RUN = ("quiet=true", "logger=none", "~callbacks.eval_plots")


def run_method(
    method: str, seed: int, run_dir: Path, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], Any]:
    """``dbtr-train experiment=toyworld model=<method> seed=<seed> <overrides>`` into ``run_dir``: the test
    metrics (plus the selected epoch) and the tested model."""
    from dbtr.cli.train import train

    identity = ["experiment=toyworld", f"model={method}", f"seed={seed}", *overrides]
    cfg = compose_config([*identity, *QUIET_RUN, f"paths.output_dir={run_dir}"])
    choices = {"experiment": "toyworld", "model": method, "data": "toyworld", "clip": "toyworld"}
    metrics, objects = train(cfg, identity={"choices": choices, "overrides": identity})
    result = dict(metrics)
    ckpt = objects["trainer"].checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and objects["model"].head.trainable else ""
    result["best_epoch"] = (
        int(torch.load(best, map_location="cpu", weights_only=True)["epoch"]) if best else None
    )
    return result, objects["model"]


def localization(
    model, datamodule, limit: int | None = None
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Local-branch attention on the test images vs their boxes; also returns the attention and the scores
    (one pass over the test split serves the numbers and the heatmap sheet)."""
    from dbtr.toyworld.localization import localization_scores
    from dbtr.utils.files import iter_jsonl

    boxes = [rec.get("boxes", []) for _, rec in iter_jsonl(datamodule.test_labels)]
    atts, scores = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            out = model(batch)
            atts.append(out.local_attention)
            scores.append(out.logits)
    attention = torch.cat(atts).numpy()
    labels = datamodule.test_records.labels
    n = limit or len(boxes)
    scores_np = torch.cat(scores).numpy()
    loc = localization_scores(
        attention[:n], labels[:n], boxes[:n], datamodule.class_names, datamodule.image_size
    )
    return loc, attention, scores_np


def write_heatmaps(
    path: Path, model_attention: np.ndarray, scores: np.ndarray, datamodule, count: int = 6
) -> Path:
    from dbtr.data.images import load_image
    from dbtr.system.lit_module import attention_grid
    from dbtr.system.viz import crop_boxes, heatmap_figure, read_boxes, save_figure

    rows = []
    records = datamodule.test_records
    names = datamodule.class_names
    all_boxes = read_boxes(datamodule.test_labels, records.file_names[:count])
    for i in range(count):
        image = load_image(records.root / records.file_names[i])
        boxes = crop_boxes(all_boxes.get(records.file_names[i], []), image.size, min(image.size), names)
        true = np.flatnonzero(records.labels[i] == 1).tolist()
        top = [c for c in np.argsort(-scores[i]).tolist() if c not in true][:1]
        grid = attention_grid(torch.from_numpy(model_attention[i : i + 1]))[0].numpy()  # (C, g, g)
        panels = [
            (names[c] + ("" if c in true else " (wrong)"), grid[c], boxes.get(c, [])) for c in true + top
        ]
        rows.append((image, panels, boxes))
    title = "local-branch attention: true classes (boxes: ground truth), then the best wrong one"
    return save_figure(heatmap_figure(rows, title=title, class_names=names), path)


def summarise(values: list[float]) -> str:
    from dbtr.cli.results import format_mean_std  # the same mean ± sample std as dbtr-results, without the n

    return format_mean_std(values, show_n=False)


SIZES = ("mAP_small", "mAP_medium", "mAP_large")
REPORTED = ("mAP", *SIZES, "CF1@3", "OF1@3")
CENTERED = "model.head.center_scores=true"


def world_overrides(world_seed: int) -> list[str]:
    """``data.seed`` selects the world (folder ``<paths.toyworld_dir>/world<seed>``); 0 is the default."""
    return [f"data.seed={world_seed}"] if world_seed else []


def _finite(value) -> float | None:
    return None if value is None or math.isnan(float(value)) else float(value)


def _method_entry(description: str, config: str, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": description, "config": config}
    for key in REPORTED:  # None where undefined (a size bucket without positives): JSON has no NaN
        values = [_finite(r.get(f"test/{key}")) for r in per_seed]
        entry[key] = None if None in values else float(np.mean(values))
        entry.setdefault("per_seed", {})[key] = values
    entry["best_epoch"] = [r["best_epoch"] for r in per_seed]
    return entry


def run_demo(
    out: Path,
    seeds: Sequence[int] = (1,),
    methods: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    world_seed: int = 0,
    heatmaps: bool = True,
    centered: bool = True,
    progress=print,
) -> dict[str, Any]:
    """Every method (and, with ``centered``, each trained one again with ``model.head.center_scores=true``)
    on one world; the realism signatures first. Writes ``results.json`` and ``results.md`` in ``out``."""
    from dbtr.toyworld.signatures import load, measure, verdicts
    from dbtr.toyworld.world import GENERATOR_VERSION
    from dbtr.utils.io import atomic_write_json, atomic_write_text

    methods = list(methods or [m for m, _ in METHODS])
    names = dict(METHODS)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    t0 = time.perf_counter()
    datamodule, encoder, _ = load(None, None, world_seed, overrides)
    overrides = [*world_overrides(world_seed), *overrides]
    timings["generation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    signatures = measure(datamodule, encoder, overrides)
    signatures["verdicts"] = verdicts(signatures)
    timings["signatures_s"] = time.perf_counter() - t0
    progress(
        f"signatures: local - global {signatures['local_minus_global']:+.2f} mAP (dense "
        f"{signatures['dense_mode']}), attention mass in box {signatures['mass_in_box']:.1f}% (uniform "
        f"{signatures['uniform_mass']:.1f}%), peak in box {signatures['peak_in_box']:.1f}%"
    )

    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    full_model, done = None, 0
    total = len(methods) * len(seeds)
    for method in methods:
        variants = [(method, [])]
        per_variant: dict[str, list[dict[str, Any]]] = {}
        while variants:
            name, extra = variants.pop(0)
            for seed in seeds:
                run_t0 = time.perf_counter()
                run_dir = out / "runs" / name / f"seed{seed}"
                result, model = run_method(method, seed, run_dir, [*overrides, *extra])
                done += 1
                progress(
                    f"[{done}/{total}] {name:<24} seed {seed}: test mAP {result['test/mAP']:.2f} "
                    f"({time.perf_counter() - run_t0:.1f} s; {time.perf_counter() - start:.0f} s elapsed)"
                )
                per_variant.setdefault(name, []).append(result)
                trained = bool(model.head.trainable)
                if method == "dbtr" and not extra and full_model is None:
                    full_model = model
                if centered and not extra and seed == seeds[0] and model.head.trainable:
                    variants.append((f"{method}_centered", [CENTERED]))
                    total += len(seeds)
        config = f"experiment=toyworld model={method}"
        results[method] = _method_entry(names.get(method, method), config, per_variant[method])
        results[method]["trained"] = trained
        if f"{method}_centered" in per_variant:
            results[method]["centered"] = _method_entry(
                f"{names.get(method, method)}, centred",
                f"{config} {CENTERED}",
                per_variant[f"{method}_centered"],
            )
    if "zsclip_centered" in results:
        for entry in results.values():
            if entry["trained"]:
                entry["minus_zsclip_centered"] = entry["mAP"] - results["zsclip_centered"]["mAP"]
    free = [m for m, e in results.items() if not e["trained"]]
    if free:  # the honest bar for a trained method: the best training-free model of this run
        best = max(free, key=lambda m: results[m]["mAP"])
        for entry in results.values():
            if entry["trained"]:
                entry["best_training_free"] = best
                entry["minus_best_training_free"] = entry["mAP"] - results[best]["mAP"]
    timings["training_and_evaluation_s"] = time.perf_counter() - t0

    loc = None
    if full_model is not None:
        t0 = time.perf_counter()
        dm = full_model.trainer.datamodule  # the tested run's data, test features cached
        loc, attention, scores = localization(full_model, dm)
        if heatmaps:
            write_heatmaps(out / "heatmaps.png", attention, scores, dm)
        timings["localization_s"] = time.perf_counter() - t0

    summary = {
        "generator": GENERATOR_VERSION,
        "world_seed": world_seed,
        "seeds": list(seeds),
        "chance_mAP": signatures["chance_mAP"],
        "methods": results,
        "signatures": signatures,
        "localization": loc,
        "timings": timings,
        "overrides": list(overrides),
        "num_test_images": signatures["num_test_images"],
        "num_val_images": len(datamodule.val_records.file_names),
        "num_captions": datamodule.spec["num_captions"],
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", markdown_table(summary))
    return summary


def chance_map(labels: np.ndarray, draws: int = 20, seed: int = 0) -> float:
    """Expected mAP of random scores (mean over ``draws`` random score matrices)."""
    from dbtr.metrics import mean_average_precision

    rng = np.random.default_rng(seed)
    return float(np.mean([mean_average_precision(rng.random(labels.shape), labels) for _ in range(draws)]))


def _cell(entry: dict[str, Any], key: str) -> str:
    values = entry["per_seed"][key]
    return "n/a" if None in values else summarise(values)


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per method: mAP, per-size mAPs, F1s, and for trained methods the two honest comparisons."""
    rows = []
    for r in summary["methods"].values():
        diff, best = r.get("minus_zsclip_centered"), r.get("minus_best_training_free")
        centred = r.get("centered")
        rows.append(
            [r["description"], *(_cell(r, k) for k in REPORTED)]
            + ["" if diff is None else f"{diff:+.2f}"]
            + ["" if best is None else f"{best:+.2f} ({r['best_training_free']})"]
            + ["" if centred is None else f"{centred['mAP']:.2f} ({centred['mAP'] - r['mAP']:+.2f})"]
        )
    return rows


TABLE_HEADER = (
    "method", "mAP", "small", "medium", "large", "CF1@3", "OF1@3", "vs ZS centred", "vs best training-free",
    "centred itself",
)  # fmt: skip


def markdown_table(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    sig = summary["signatures"]
    lines = [
        f"Toy world (generator v{summary['generator']}, world seed {summary['world_seed']}): "
        f"{summary['num_test_images']} test images, head-training seeds {seeds}; chance mAP "
        f"{summary['chance_mAP']:.2f}. Per-size columns: test mAP over objects whose largest instance is "
        "small (< 5 % of the canvas), medium or large (>= 20 %). 'vs ZS centred': mAP minus zero-shot CLIP "
        "centred per image; 'vs best training-free': minus the best training-free model of this run "
        "(named); 'centred itself': the same method run with model.head.center_scores=true.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    by = sig["zsclip_by_size"]
    lines += [
        "",
        f"Realism signatures (training-free, shipped CLIP): local aggregation minus global zero-shot "
        f"{sig['local_minus_global']:+.2f} test mAP (dense mode {sig['dense_mode']}, chosen on val); "
        f"zero-shot local attention on the true classes: {sig['mass_in_box']:.1f}% of its mass inside the "
        f"boxes (uniform map {sig['uniform_mass']:.1f}%), peak inside a box {sig['peak_in_box']:.1f}% of "
        "the time; "
        f"global zero-shot mAP small / medium / large {by['mAP_small']:.1f} / {by['mAP_medium']:.1f} / "
        f"{by['mAP_large']:.1f}. Verdicts: "
        + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in sig["verdicts"].items())
        + ".",
    ]
    loc = summary.get("localization")
    if loc:
        lines += [
            "",
            f"Local-branch attention of the trained full method on the true classes ({loc['pairs']} "
            f"image-class pairs): {loc['mass_in_box']:.1f}% of the mass inside the object boxes (uniform "
            f"map: {loc['mass_in_box_uniform']:.1f}%); the peak falls inside a box "
            f"{loc['pointing_accuracy']:.1f}% of the time.",
        ]
    t = summary["timings"]
    lines += [
        "",
        "Wall time: "
        + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in t.items()),
    ]
    return "\n".join(lines) + "\n"


def quiet_lightning() -> None:
    """Dozens of short fits would each print accelerator banners and tips; keep the table readable."""
    for name in (
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
        "lightning.pytorch.accelerators.cuda",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per reloaded checkpoint otherwise


@cli("dbtr-toyworld")
def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default <paths.toyworld_dir>/demo, or demo_world<S> with --world-seed S)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="head-training seeds")
    p.add_argument(
        "--world-seed",
        type=int,
        default=0,
        help="another world from the same distribution (scenes and captions; the shipped CLIP stays)",
    )
    p.add_argument("--methods", nargs="+", default=None, choices=[m for m, _ in METHODS])
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument(
        "--no-centered", action="store_true", help="skip the trained methods' center_scores=true runs"
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.optimizer.lr=1e-3")
    a = p.parse_args(argv)
    quiet_lightning()
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    base = Path(compose_config(["experiment=toyworld", *a.overrides]).paths.toyworld_dir)
    out = a.out or base / ("demo" if a.world_seed == 0 else f"demo_world{a.world_seed}")
    start = time.perf_counter()
    print(
        f"toy world (world seed {a.world_seed}): {len(a.methods or METHODS)} methods x {len(a.seeds)} "
        f"seed(s), runs in {out}/runs",
        flush=True,
    )
    summary = run_demo(
        out,
        a.seeds,
        a.methods,
        a.overrides,
        world_seed=a.world_seed,
        heatmaps=not a.no_heatmaps,
        centered=not a.no_centered,
        progress=lambda msg: print(msg, flush=True),
    )
    table = Table(
        title=f"toy world, test split ({summary['num_test_images']} images), "
        f"chance mAP {summary['chance_mAP']:.1f}"
    )
    for col in TABLE_HEADER:
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in table_rows(summary):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(markdown_table(summary).split("\n\n", 2)[-1].strip())
    console.print(
        f"total {time.perf_counter() - start:.1f} s; results in {out}/results.json and results.md"
        + (f", heatmaps in {out}/heatmaps.png" if (out / "heatmaps.png").exists() else "")
    )


if __name__ == "__main__":
    main()
