"""User errors and the one boundary that turns them into a clean message and a non-zero exit status.

A *user error* is something the user can fix: a config value, an input file (missing, malformed, not UTF-8),
an output that cannot be written, a checkpoint that does not fit. Every console script prints it as one
paragraph, ``<prog>: error: <what, where, what to do>``, with no traceback, and exits with status 2. Anything
else (a ``TypeError``, an ``IndexError``, ...) is a bug and keeps its full traceback.

What counts (:func:`user_message`): :class:`UserError` and its subclasses (``DataFormatError``,
``ClipWeightsNotFound``, ``CheckpointMismatchError``, ...), ``OSError`` on a named file (read or write), a
``FileNotFoundError`` raised with our own message, ``UnicodeDecodeError``, OmegaConf config errors (a missing
``???`` value, a wrong type), and a target's signature refusing a config key. Hydra's
``InstantiationException`` is unwrapped to the exception the ``_target_`` raised.

``HYDRA_FULL_ERROR=1`` (or ``DBTR_TRACEBACK=1``) re-raises instead, for the full trace, in every script.

Hydra multirun (``-m``): a job that fails on a user error logs the paragraph to its own log file and stderr
and is marked failed; the remaining jobs still run, and at the end Hydra reports the first failed job's
overrides and the paragraph (no traceback) and exits with status 1.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

EXIT_USER_ERROR = 2
_TRACEBACK_VARS = ("HYDRA_FULL_ERROR", "DBTR_TRACEBACK")


class UserError(ValueError):
    """An error the user can fix; its message says what was wrong, where, and what to do.

    A ValueError, so callers (and tests) that catch ValueError for bad values keep working."""


class ConfigError(UserError):
    """A config value or command-line option is not allowed (the message lists the allowed values)."""


def traceback_requested() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in _TRACEBACK_VARS)


def choice_error(key: str, value: Any, allowed: Any) -> ConfigError:
    """``key=value`` is not one of ``allowed``: the message lists them in the form to type."""
    return ConfigError(f"{key}={value} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def unwrap(exc: BaseException) -> BaseException:
    """The exception a Hydra ``_target_`` raised, not the ``InstantiationException`` around it."""
    try:
        from hydra.errors import InstantiationException
    except ImportError:  # pragma: no cover - hydra is a dependency
        return exc
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def user_message(exc: BaseException) -> str | None:
    """The one-paragraph message of a user error, or None for a bug (which keeps its traceback)."""
    outer, exc = exc, unwrap(exc)
    if isinstance(exc, UserError):
        return _without_worker_traceback(str(exc))
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"a text input is not UTF-8 ({exc.reason} at byte {exc.start}): save the file as UTF-8 "
            "(UTF-8 with a byte-order mark is fine)"
        )
    if isinstance(exc, OSError):
        return _os_message(exc)
    if _is_config_error(exc):
        return _config_message(exc)
    if isinstance(exc, TypeError) and outer is not exc and _signature_refusal(exc):
        where = str(outer).rsplit("full_key: ", 1)[-1].strip() if "full_key: " in str(outer) else "the config"
        return f"{where}: {exc} (check the keys under {where} given on the command line or in the config)"
    return None


def _without_worker_traceback(text: str) -> str:
    """A DataLoader worker's exception is re-raised in the main process as "Caught X in DataLoader worker
    process 0.\nOriginal Traceback ...\nX: <message>": keep the message."""
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _os_message(exc: OSError) -> str | None:
    if exc.filename is None:
        # raised by our code (or a library) with a message and no errno: that message is the explanation
        return _without_worker_traceback(str(exc)) if exc.errno is None and str(exc) else None
    verb = "write" if _writing(exc) else "read"
    what = exc.strerror or str(exc)
    hint = {
        errno.EACCES: " (check its permissions, or choose another location)",
        errno.EPERM: " (check its permissions, or choose another location)",
        errno.EROFS: " (the file system is read-only: choose another location)",
        errno.ENOSPC: " (free some space, or choose another location)",
        errno.ENOTDIR: " (a file stands where a folder is needed)",
        errno.EEXIST: " (a file stands where a folder is needed)",
    }.get(exc.errno or -1, "")
    return f"cannot {verb} {_shown_path(exc.filename)}: {what}{hint}"


# dbtr.utils.io writes through a hidden temporary file next to the target (.<name>.<random>.tmp):
# name the target
_ATOMIC_TEMP = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


def _shown_path(filename: Any) -> str:
    path = os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)
    head, tail = os.path.split(path)
    temp = _ATOMIC_TEMP.match(tail)
    return os.path.join(head, temp.group("name")) if temp else path


_WRITE_FRAME = re.compile(r"write|save|dump|mkdir|makedirs|mkstemp|replace|rename|atomic|copy")
_READ_FRAME = re.compile(r"read|load|scandir|listdir|iterdir|glob|stat")


def _writing(exc: OSError) -> bool:
    """Whether the failed call was writing: the innermost frame whose name says read or write decides."""
    from dbtr.utils.io import AtomicWriteError

    if isinstance(exc, AtomicWriteError):
        return True
    if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    tb, names = exc.__traceback__, []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    for name in reversed(names):
        if _WRITE_FRAME.search(name):
            return True
        if _READ_FRAME.search(name):
            return False
    return False


def _config_message(exc: BaseException) -> str:
    from omegaconf.errors import MissingMandatoryValue

    key = getattr(exc, "full_key", None)
    if isinstance(exc, MissingMandatoryValue) and key:
        return f"{key} is required (it is ??? in the config): pass {key}=<value> on the command line"
    return _one_paragraph(str(exc))


def _is_config_error(exc: BaseException) -> bool:
    """OmegaConf errors, and Hydra's composition errors where a script composes its config itself (toy-world
    demo): an override that does not parse, a config group option or key that does not exist."""
    try:
        from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - both are dependencies
        return False
    return isinstance(
        exc,
        (OmegaConfBaseException, ConfigCompositionException, MissingConfigException, OverrideParseException),
    )


_SIGNATURE = re.compile(
    r"got an unexpected keyword argument|missing \d+ required (positional|keyword-only) argument"
)


def _signature_refusal(exc: TypeError) -> bool:
    """While building a ``_target_``: a constructor refused a config key (``+model.head.typo=1``) or lacks
    one."""
    return _SIGNATURE.search(str(exc)) is not None


def _one_paragraph(text: str) -> str:
    """OmegaConf messages are several lines (``full_key: ...``, ``object_type=...``): one line, joined by
    '; '."""
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("object_type=")
    ]
    out = ""
    for line in lines:
        out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def format_error(prog: str, message: str) -> str:
    return f"{prog}: error: {message.rstrip()}"


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """The boundary of an argparse console script: a user error becomes one paragraph on stderr and exit 2."""
    try:
        yield
    except Exception as exc:
        message = None if traceback_requested() else user_message(exc)
        if message is None:
            raise
        print(format_error(prog, message), file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def cli(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of :func:`user_errors` for a ``main(argv)``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with user_errors(prog):
                return fn(*args, **kwargs)

        return wrapped

    return decorate


def hydra_job_failed(prog: str, exc: BaseException, log: logging.Logger) -> BaseException | None:
    """Inside a Hydra task: report a user error and return what to raise instead (None: a bug, re-raise it).

    Single run: SystemExit(2) after the paragraph on stderr. Multirun: a compact Hydra exception, so Hydra
    marks the job failed, runs the other jobs, and finally prints the paragraph (not a traceback) and exits 1.
    """
    message = None if traceback_requested() else user_message(exc)
    if message is None:
        return None
    text = format_error(prog, message)
    _log_to_files(log, text)
    print(text, file=sys.stderr, flush=True)
    if _in_multirun():
        from hydra.errors import CompactHydraException

        return CompactHydraException(text)
    return SystemExit(EXIT_USER_ERROR)


def _log_to_files(log: logging.Logger, text: str) -> None:
    """The run's log file keeps the error too (the console already gets it on stderr, once)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, (), None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # outside a Hydra app
        return False
