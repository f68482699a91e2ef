"""``metrics.json``: the one record of a run, written by dbtr-train, dbtr-eval and the toy-world demo (all
through ``train()`` / ``evaluate()``) and read by dbtr-results.

A training run records what made it (``choices``: the config-group files, ``overrides``: the command line) and
its test numbers. An evaluation run (``kind="eval"``) records the checkpoint it evaluated and, in ``source``,
the identity of the training run that wrote that checkpoint (stored inside the checkpoint), so dbtr-results
files it under that run instead of mistaking it for one more seed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("dbtr")

FILE_NAME = "metrics.json"
KINDS = ("train", "eval")


class RunRecordError(ValueError):
    """A metrics.json that cannot be read as a run record; the message says why."""


@dataclass
class RunRecord:
    kind: str  # train | eval
    task_name: str
    config: dict[str, Any]  # the resolved config, as in .hydra/config.yaml
    choices: dict[str, Any] = field(
        default_factory=dict
    )  # config-group choices (model: dbtr, data: toyworld)
    overrides: list[str] = field(default_factory=list)  # command-line overrides
    seed: int | None = None
    tags: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)  # test/<metric> -> value (per-class AP as a dict)
    checkpoint: str | None = None  # train: the selected (tested) checkpoint; eval: the evaluated one
    selection: dict[str, Any] = field(default_factory=dict)  # monitor, best_score
    val_last_epoch: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(
        default_factory=dict
    )  # the metric conventions in effect (difficult, top_k)
    source: dict[str, Any] | None = None  # eval: {task_name, choices, overrides, seed} of the training run
    extra: dict[str, Any] = field(default_factory=dict)  # anything else (kept on read, written back flat)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RunRecordError(f"run kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint stores about the run that wrote it (``checkpoint['dbtr']['run']``)."""
        return {
            "task_name": self.task_name,
            "choices": self.choices,
            "overrides": self.overrides,
            "seed": self.seed,
        }

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **out}

    def write(self, run_dir: str | Path) -> Path:
        from dbtr.utils.io import atomic_write_json

        path = atomic_write_json(Path(run_dir) / FILE_NAME, self.to_dict())
        log.info("wrote %s", path)
        return path

    @classmethod
    def from_dict(cls, payload: Any) -> RunRecord:
        if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
            raise RunRecordError(
                "metrics.json has no 'config' section (not written by dbtr-train / dbtr-eval)"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in payload.items() if k in names}
        kind = known.get("kind") or (
            "eval" if (known.get("choices") or {}).get("model") == "from_checkpoint" else "train"
        )  # records written before the kind was stored
        known.update(
            kind=kind,
            task_name=known.get("task_name") or kind,
            seed=known.get("seed", payload["config"].get("seed")),
        )
        return cls(
            **{k: v for k, v in known.items() if v is not None or k in ("source", "checkpoint", "seed")},
            extra={k: v for k, v in payload.items() if k not in names},
        )

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        path = Path(run_dir) / FILE_NAME
        if not path.is_file():
            raise RunRecordError("no metrics.json (the run failed, was killed or is still running)")
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunRecordError(f"metrics.json unreadable: {e}") from None
        return cls.from_dict(payload)
