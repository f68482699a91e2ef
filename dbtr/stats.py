"""Inspect a caption corpus without a model: per-class table and ``dataset_stats.json``.

    dbtr-data                                           # the default data config (the toy world)
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
    """The corpus report of a datamodule's training captions (built by synonym matching or read from JSON lines)."""
    from dbtr.text.corpus import CorpusReport

    datamodule.setup("fit")
    if datamodule.corpus_report is not None:
        return datamodule.corpus_report
    rec = datamodule.captions
    return CorpusReport.from_labels(datamodule.class_names, rec.labels, len(rec.texts) + sum(rec.dropped.values()),
                                    rec.dropped)


def run_stats(cfg: DictConfig) -> dict:
    from rich.console import Console

    from dbtr.text.corpus import report_table

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    report = caption_stats(datamodule)
    Console().print(report_table(report))
    missing = report.as_dict()["classes_without_caption"]
    if missing:
        log.warning("%d of %d classes have no training caption: %s", len(missing), len(report.classes), missing)
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.paths.output_dir) / "dataset_stats.json"
    atomic_write_json(out, report.as_dict())
    log.info("wrote %s", out)
    return report.as_dict()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="stats.yaml")
def main(cfg: DictConfig) -> None:
    task_wrapper(run_stats)(cfg)


if __name__ == "__main__":
    main()
