"""The number ``dbtr-train`` returns to a Hydra sweeper (Optuna): the model-selection metric, never the
test."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dbtr")
DEFAULT_METRIC = "val/mAP"


def optimized_value(
    name: str | None, test: dict[str, Any], selection: dict[str, Any], val_last: dict[str, Any]
) -> float | None:
    """``name`` (default ``val/mAP``) from, in order: the checkpoint selection (its best score over epochs),
    the last validation epoch, the test metrics. An explicitly requested metric that the run did not produce
    is an error (a sweeper cannot rank a trial without it); the default just gives ``None``."""
    key = name or DEFAULT_METRIC
    if selection.get("monitor") == key and selection.get("best_score") is not None:
        return float(selection["best_score"])
    if isinstance(val_last.get(key), (int, float)):
        return float(val_last[key])
    if isinstance(test.get(key), (int, float)):
        if key.startswith("test/"):
            log.warning("optimized_metric=%s selects hyper-parameters on the test split; use val/mAP", key)
        return float(test[key])
    if name is None:
        return None
    produced = sorted(k for d in (val_last, test) for k, v in d.items() if isinstance(v, (int, float)))
    raise ValueError(
        f"optimized_metric={name} was not produced by this run (a training-free model or no validation split "
        f"gives no val/ metrics); available: {produced}"
    )
