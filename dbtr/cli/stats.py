"""Inspect a dataset without a model: per-class table and ``dataset_stats.json``.

Benchmark image datasets report the images of ``data.split``; other data configs report their training
captions.

    dbtr-data data=voc2007 data.root=/data/VOCdevkit/VOC2007 data.split=test
    dbtr-data data=nuswide data.root=/data/nuswide data.split=Test verify_images=false
    dbtr-data                                           # the default data config (the toy world's captions)
    dbtr-data data=corpus data.corpus.vocabulary=coco2014 \\
      'data.corpus.sources=[{type: coco_captions, path: annotations/captions_train2017.json}]' out=stats.json
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dbtr.utils.hydra_utils import CONFIG_DIR, instantiate, task_wrapper
from dbtr.utils.io import atomic_write_json

log = logging.getLogger("dbtr")


def caption_stats(datamodule) -> dict:
    """The corpus report of a datamodule's training captions (built by synonym matching or read from JSON
    lines)."""
    from dbtr.data.corpus import CorpusReport

    datamodule.setup("fit")
    if datamodule.corpus_report is not None:
        return datamodule.corpus_report
    rec = datamodule.captions
    return CorpusReport.from_labels(
        datamodule.class_names, rec.labels, len(rec.texts) + sum(rec.dropped.values()), rec.dropped
    )


def image_stats(datamodule, verify: bool, output_dir: Path) -> dict:
    """Counts of one native split; with ``verify`` every image is decoded and undecodable ones are listed.

    Also writes ``evaluated_<split>.txt``: pass it back as ``data.image_list`` to freeze the evaluated images.
    """
    from dbtr.data.benchmarks.protocol import write_image_list
    from dbtr.data.images import describe

    datamodule.test_records = datamodule.read_images("test")
    if verify:
        datamodule.image_size = datamodule.image_size or 224  # decoding check only: no model is loaded
        datamodule.scan_images("test")
    records = datamodule.test_records
    stats = {
        "dataset": datamodule.name,
        "split": datamodule.split,
        "root": str(datamodule.root),
        "images_verified": bool(verify),
        **describe(records),
    }
    listed = write_image_list(output_dir / f"evaluated_{datamodule.split}.txt", records)
    log.info(
        "wrote %s (%d images): pass data.image_list=%s to evaluate exactly these",
        listed,
        len(records),
        listed,
    )
    return stats


def image_table(stats: dict):
    from rich.table import Table

    table = Table(
        title=f"{stats['dataset']} {stats['split']}: {stats['num_items']} images, "
        f"{stats['missing_images']} missing, {len(stats['skipped'])} undecodable"
    )
    for col in ("class", "positives", "difficult / unknown"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, pos, dif in zip(stats["classes"], stats["positives"], stats["difficult"]):
        table.add_row(name, str(pos), str(dif))
    return table


def run_stats(cfg: DictConfig) -> dict:
    from rich.console import Console

    from dbtr.data.benchmarks.datamodule import BenchmarkDataModule
    from dbtr.data.corpus import report_table

    datamodule = instantiate(cfg.data)
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.paths.output_dir) / "dataset_stats.json"
    if isinstance(datamodule, BenchmarkDataModule):
        stats = image_stats(datamodule, bool(cfg.get("verify_images", True)), out.parent)
        Console().print(image_table(stats))
        empty = [c for c, n in zip(stats["classes"], stats["positives"]) if n == 0]
        if empty:
            log.warning("%d classes have no positive image in %s: %s", len(empty), stats["split"], empty[:10])
        atomic_write_json(out, stats)
        log.info("wrote %s", out)
        return stats
    datamodule.prepare_data()
    report = caption_stats(datamodule)
    Console().print(report_table(report))
    missing = report.as_dict()["classes_without_caption"]
    if missing:
        log.warning(
            "%d of %d classes have no training caption: %s", len(missing), len(report.classes), missing
        )
    atomic_write_json(out, report.as_dict())
    log.info("wrote %s", out)
    return report.as_dict()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="stats.yaml")
def main(cfg: DictConfig) -> None:
    task_wrapper(run_stats)(cfg)


if __name__ == "__main__":
    main()
