"""Console output in one place: rich progress bars for the slow loops, and the quiet switch.

``quiet=true`` hides every progress bar (ours, Lightning's, Hugging Face's) and drops console log records
below WARNING; the log file of the run (Hydra's ``<run dir>/<task>.log``) still gets everything. The final
metrics table is printed either way.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_quiet = False
_CONSOLE_STREAMS = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def is_quiet() -> bool:
    return _quiet


def set_quiet(quiet: bool) -> None:
    """Apply (or lift) quiet mode for this process."""
    global _quiet
    _quiet = bool(quiet)
    level = logging.WARNING if quiet else logging.NOTSET
    for handler in logging.getLogger().handlers:  # console handlers only: the run's log file stays complete
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)
    for name in ("lightning.pytorch", "lightning.fabric"):  # they add their own console handler without Hydra
        for handler in logging.getLogger(name).handlers:
            handler.setLevel(level)
    try:
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()
    except ImportError:
        pass


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A transient rich progress bar over ``items`` (nothing in quiet mode)."""
    if _quiet:
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, transient=True)


def quiet_trainer_args(callbacks: list) -> tuple[list, dict]:
    """Callbacks and Trainer keyword arguments for the current mode: no progress bar and no summary when quiet
    (Lightning refuses a progress-bar callback together with ``enable_progress_bar=False``)."""
    if not _quiet:
        return callbacks, {}
    from lightning.pytorch.callbacks import ProgressBar

    kept = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    return kept, {"enable_progress_bar": False, "enable_model_summary": False}
