"""The main job: every method of the paper's table on the toy world, in one process, with shared caches.

    dbtr-toyworld                     # = python -m dbtr.toyworld.demo; writes .toyworld/demo/
    dbtr-toyworld --seeds 1 2 3       # mean +- std over head-training seeds

Each method is the Hydra config ``model=<name>`` composed with ``experiment=toyworld`` (the same configs
``dbtr-train`` uses), trained on captions only where it has residuals, selected on the validation images
(best epoch by val mAP), and tested once on the held-out test images. CLIP is frozen, so caption and
image features are computed once and shared by all methods and seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dbtr.utils.errors import cli

METHODS: tuple[tuple[str, str], ...] = (
    ("zsclip", "zero-shot CLIP (global)"),
    ("zsclip_centered", "zero-shot CLIP, centred per image"),
    ("zsclip_local", "zero-shot global + local"),
    ("calip", "CALIP (training-free attention)"),
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


def fit_and_test(cfg, encoder, datamodule, run_dir: Path, class_embeds: dict | None = None) -> tuple[dict[str, Any], Any]:
    """Train (if the method has residuals) with selection on val mAP, then test the selected weights."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dbtr.models.lit_module import DbtrLitModule
    from dbtr.utils.hydra_utils import instantiate

    L.seed_everything(cfg.seed, workers=True)
    model: DbtrLitModule = instantiate(cfg.model, class_names=datamodule.class_names, encoder=encoder)
    # T0 depends only on CLIP, classes and templates: share it across methods and seeds
    key = repr(cfg.model.templates)
    if class_embeds is not None and key in class_embeds:
        model.head.set_class_embeddings(class_embeds[key])
    model.ensure_class_embeddings()
    if class_embeds is not None:
        class_embeds[key] = model.head.class_embeds.clone()
    ckpt = ModelCheckpoint(dirpath=run_dir, monitor="val/mAP", mode="max", save_top_k=1, filename="best")
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs, accelerator="cpu", devices=1, logger=False, callbacks=[ckpt],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )
    best_epoch = None
    if model.head.trainable:
        trainer.fit(model, datamodule=datamodule)
        t0 = model.head.class_embeds.clone()
        model = DbtrLitModule.load_from_checkpoint(ckpt.best_model_path, encoder=encoder)
        model.head.set_class_embeddings(t0)
        best_epoch = int(torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["epoch"])
    trainer.test(model, datamodule=datamodule, verbose=False)
    result = dict(model.results["test"])
    result["best_epoch"] = best_epoch
    return result, model


def localization(model, datamodule, limit: int | None = None) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Local-branch attention on the test images vs their boxes; also returns the attention and the scores
    (one pass over the test split serves the numbers and the heatmap sheet)."""
    from dbtr.data.labels import iter_jsonl
    from dbtr.toyworld.localization import localization_scores

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
    loc = localization_scores(attention[:n], labels[:n], boxes[:n], datamodule.class_names, datamodule.image_size)
    return loc, attention, scores_np


def write_heatmaps(path: Path, model_attention: np.ndarray, scores: np.ndarray, datamodule, count: int = 6) -> Path:
    from dbtr.data.images import load_image
    from dbtr.models.lit_module import attention_grid
    from dbtr.viz import heatmap_figure, save_figure

    rows = []
    records = datamodule.test_records
    for i in range(count):
        image = load_image(records.root / records.file_names[i])
        true = np.flatnonzero(records.labels[i] == 1).tolist()
        top = [c for c in np.argsort(-scores[i]).tolist() if c not in true][:1]
        grid = attention_grid(torch.from_numpy(model_attention[i : i + 1]))[0].numpy()  # (C, g, g)
        panels = [(datamodule.class_names[c] + ("" if c in true else " (wrong)"), grid[c]) for c in true + top]
        rows.append((image, panels))
    return save_figure(heatmap_figure(rows, title="local-branch attention: true classes, then the best wrong one"), path)


def write_run_metrics(run_dir: Path, cfg, method: str, overrides: list[str], result: dict, class_names) -> None:
    """A metrics.json per method and seed, shaped like dbtr-train's, so `dbtr-results <out>/runs` tabulates them."""
    from omegaconf import OmegaConf

    from dbtr.utils.io import atomic_write_json

    # paths.output_dir needs a Hydra run to resolve: store the groups that define the method and the protocol
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("clip", "data", "model")}
    config["trainer"] = {"max_epochs": cfg.trainer.max_epochs}
    atomic_write_json(run_dir / "metrics.json", {
        "task_name": cfg.task_name, "seed": cfg.seed, "class_names": list(class_names),
        "test": {k: v for k, v in result.items() if k != "best_epoch"}, "best_epoch": result["best_epoch"],
        "config": {**config, "seed": cfg.seed}, "overrides": overrides,
        "choices": {"experiment": "toyworld", "model": method, "data": "toyworld", "clip": "toyworld"},
    })


def summarise(values: list[float]) -> str:
    from dbtr.results import format_mean_std  # the same mean ± sample std as dbtr-results, without the n

    return format_mean_std(values, show_n=False)


def run_demo(out: Path, seeds: Sequence[int] = (1,), methods: Sequence[str] | None = None,
             overrides: Sequence[str] = (), heatmaps: bool = True) -> dict[str, Any]:
    from dbtr.data.captions import encode_caption_features
    from dbtr.models.clip import ClipEncoder
    from dbtr.utils.hydra_utils import instantiate
    from dbtr.utils.io import atomic_write_json, atomic_write_text

    methods = list(methods or [m for m, _ in METHODS])
    names = dict(METHODS)
    timings: dict[str, float] = {}
    base = compose_config(["experiment=toyworld", *overrides])

    t0 = time.perf_counter()
    datamodule = instantiate(base.data)
    datamodule.prepare_data()
    timings["generation_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    encoder = ClipEncoder.from_pretrained(base.clip.name_or_path, dense=base.clip.dense)
    datamodule.attach_encoder(encoder)
    datamodule.setup("fit")
    datamodule.setup("test")
    datamodule.set_caption_features(encode_caption_features(encoder, datamodule.captions.texts))
    datamodule.cache_image_features(encoder)
    timings["caching_s"] = time.perf_counter() - t0

    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    full_model, class_embeds = None, {}
    for method in methods:
        per_seed = []
        for seed in seeds:
            run_overrides = ["experiment=toyworld", f"model={method}", f"seed={seed}", *overrides]
            cfg = compose_config(run_overrides)
            run_dir = out / "runs" / method / f"seed{seed}"
            result, model = fit_and_test(cfg, encoder, datamodule, run_dir, class_embeds)
            write_run_metrics(run_dir, cfg, method, run_overrides, result, datamodule.class_names)
            per_seed.append(result)
            if method == "dbtr" and full_model is None:
                full_model = model
        results[method] = {
            "description": names.get(method, method),
            "mAP": [r["test/mAP"] for r in per_seed],
            "CF1@3": [r["test/CF1@3"] for r in per_seed],
            "OF1@3": [r["test/OF1@3"] for r in per_seed],
            "best_epoch": [r["best_epoch"] for r in per_seed],
            "config": f"experiment=toyworld model={method}",
        }
    timings["training_and_evaluation_s"] = time.perf_counter() - t0

    loc = None
    if full_model is not None:
        t0 = time.perf_counter()
        loc, attention, scores = localization(full_model, datamodule)
        if heatmaps:
            write_heatmaps(out / "heatmaps.png", attention, scores, datamodule)
        timings["localization_s"] = time.perf_counter() - t0

    summary = {"seeds": list(seeds), "chance_mAP": chance_map(datamodule.test_records.labels), "methods": results,
               "localization": loc, "timings": timings, "overrides": list(overrides),
               "num_test_images": len(datamodule.test_records.file_names),
               "num_val_images": len(datamodule.val_records.file_names), "num_captions": len(datamodule.captions.texts)}
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", markdown_table(summary))
    return summary


def chance_map(labels: np.ndarray, draws: int = 20, seed: int = 0) -> float:
    """Expected mAP of random scores (mean over ``draws`` random score matrices)."""
    from dbtr.metrics import mean_average_precision

    rng = np.random.default_rng(seed)
    return float(np.mean([mean_average_precision(rng.random(labels.shape), labels) for _ in range(draws)]))


def markdown_table(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [
        f"Toy world: {summary['num_test_images']} test images, {len(summary['methods'])} methods, "
        f"head-training seeds {seeds}; chance mAP {summary['chance_mAP']:.2f}.",
        "",
        "| method | mAP | CF1@3 | OF1@3 | config |",
        "|---|---|---|---|---|",
    ]
    for name, r in summary["methods"].items():
        lines.append(f"| {r['description']} | {summarise(r['mAP'])} | {summarise(r['CF1@3'])} | {summarise(r['OF1@3'])} "
                     f"| `{r['config']}` |")
    loc = summary.get("localization")
    if loc:
        lines += ["", f"Local-branch attention of the full method on the true classes ({loc['pairs']} image-class pairs): "
                  f"{loc['mass_in_box']:.1f}% of the mass inside the object boxes (uniform map: "
                  f"{loc['mass_in_box_uniform']:.1f}%); the peak falls inside a box {loc['pointing_accuracy']:.1f}% of the time."]
    t = summary["timings"]
    lines += ["", "Wall time: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in t.items())]
    return "\n".join(lines) + "\n"


def quiet_lightning() -> None:
    """Dozens of short fits would each print accelerator banners and tips; keep the table readable."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per reloaded checkpoint otherwise


@cli("dbtr-toyworld")
def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default <paths.toyworld_dir>/demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--methods", nargs="+", default=None, choices=[m for m, _ in METHODS])
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.optimizer.lr=1e-3")
    a = p.parse_args(argv)
    quiet_lightning()
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    out = a.out or Path(compose_config(["experiment=toyworld", *a.overrides]).paths.toyworld_dir) / "demo"
    start = time.perf_counter()
    summary = run_demo(out, a.seeds, a.methods, a.overrides, heatmaps=not a.no_heatmaps)
    table = Table(title=f"toy world, test split ({summary['num_test_images']} images), chance mAP {summary['chance_mAP']:.1f}")
    for col in ("method", "mAP", "CF1@3", "OF1@3"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in summary["methods"].values():
        table.add_row(r["description"], summarise(r["mAP"]), summarise(r["CF1@3"]), summarise(r["OF1@3"]))
    console = Console()
    console.print(table)
    console.print(markdown_table(summary).split("\n\n", 2)[-1].strip())
    console.print(f"total {time.perf_counter() - start:.1f} s; results in {out}/results.md" +
                  (f", heatmaps in {out}/heatmaps.png" if (out / "heatmaps.png").exists() else ""))


if __name__ == "__main__":
    main()
