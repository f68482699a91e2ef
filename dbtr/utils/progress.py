"""Console output in one place: rich progress bars for the slow loops, the quiet switch, and library noise.

``quiet=true`` hides every progress bar (ours, Lightning's, Hugging Face's) and drops console log records
below WARNING; the log file of the run (Hydra's ``<run dir>/<task>.log``) still gets everything. One line
names the run folder, and the final metrics table is printed either way.

In every mode :func:`silence_library_noise` drops what the libraries print on each run without it saying
anything about the run: Lightning's accelerator banners (GPU/TPU/HPU available), its add-on tips, and a
deprecation inside Lightning itself. Real warnings are kept.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_quiet = False
_silenced = False

# Lightning's info lines that are the same on every run (matched at the start of the message)
_BANNERS = re.compile(
    r"(GPU|TPU|HPU|IPU) available|💡 Tip:|Loading `\w+` to estimate number of stepping batches"
)
# Lightning routes rank_zero_info through these loggers (whichever module was imported last sets it)
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
# lightning/pytorch/utilities/_pytree.py calls a torch API deprecated in torch 2.10: not ours to fix,
# twice a run
_LIBRARY_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _BANNERS.match(record.getMessage())


def silence_library_noise() -> None:
    """Drop Lightning's per-run banners and tips and the library deprecations above (idempotent)."""
    global _silenced
    if not _silenced:
        _silenced = True
        for name in _RANK_ZERO_LOGGERS:
            logging.getLogger(name).addFilter(_DropBanners())
    for (
        message
    ) in _LIBRARY_DEPRECATIONS:  # re-adding a filter moves it to the front instead of duplicating it
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)


def _run_folder() -> tuple[str, str | None] | None:
    """The Hydra run folder and the run's log file, None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        folder = HydraConfig.get().runtime.output_dir
    except Exception:  # not inside a Hydra app (a test calling train(cfg) directly)
        return None
    logs = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return folder, (logs[0] if logs else None)


def run_folder_line(output_dir) -> str:
    """``run folder: <dir>`` (with the run's log file when Hydra writes one): the one line naming a run's
    outputs."""
    run = _run_folder()
    log_file = run[1] if run is not None else None
    return f"run folder: {output_dir}" + (f" (full log: {log_file})" if log_file else "")


_CONSOLE_STREAMS = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def is_quiet() -> bool:
    return _quiet


def set_quiet(quiet: bool) -> None:
    """Apply (or lift) quiet mode for this process; every CLI calls it first (it also silences library
    noise)."""
    global _quiet
    _quiet = bool(quiet)
    silence_library_noise()
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
