"""dbtr: dual-branch task residuals with parameter-free attention for zero-shot multi-label recognition.

Public API (lazy, so ``import dbtr`` stays cheap and does not pull in Lightning):

    model, transform = dbtr.load_checkpoint("run/checkpoints/last.ckpt")   # the model and its preprocessing
    from dbtr import DbtrLitModule, ClipEncoder, DualBranchHead, mean_average_precision
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_checkpoint": "dbtr.system.checkpoint",
    "LoadedModel": "dbtr.system.checkpoint",
    "Preprocessing": "dbtr.system.checkpoint",
    "RunRecord": "dbtr.system.run_record",
    "DbtrLitModule": "dbtr.system.lit_module",
    "ClipEncoder": "dbtr.models.clip",
    "DualBranchHead": "dbtr.models.heads",
    "TextToImageDataModule": "dbtr.data.datamodule",
    "build_class_embeddings": "dbtr.zeroshot.classifier",
    "mean_average_precision": "dbtr.metrics",
    "multilabel_f1": "dbtr.metrics",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dbtr' has no attribute {name!r}")
