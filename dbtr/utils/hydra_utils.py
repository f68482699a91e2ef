"""Hydra glue kept in one place: instantiation, callbacks/loggers from dict groups, run wrapping."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dbtr.utils.errors import hydra_job_failed

log = logging.getLogger("dbtr")

# Configs live in the repository's top-level conf/ (a source checkout or `pip install -e .`); an absolute path
# makes the console scripts independent of the working directory. Elsewhere pass --config-dir.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# Files shipped inside the package (the toy-world CLIP), addressable from configs as ${dbtr_asset:toyclip}.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
if not OmegaConf.has_resolver("dbtr_asset"):
    OmegaConf.register_new_resolver("dbtr_asset", lambda name: str(ASSETS_DIR / name))
# Absolute paths in the saved config, so metrics.json / .hydra/config.yaml stay usable from another folder.
if not OmegaConf.has_resolver("dbtr_abspath"):
    OmegaConf.register_new_resolver(
        "dbtr_abspath", lambda path: os.path.abspath(os.path.expanduser(str(path)))
    )


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """The single call site of ``hydra.utils.instantiate`` (Hydra 1.4 adds a target allow-list here)."""
    from hydra.utils import instantiate as _instantiate

    return _instantiate(cfg, _convert_="all", **kwargs)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` node of a dict group (callbacks, logger); ``None`` or empty gives []."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def task_wrapper(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log failures with the output folder and always close wandb, so one failed job does not break a
    multirun.

    A user error (:mod:`dbtr.utils.errors`) is one paragraph and exit status 2, not a traceback; a bug keeps
    its traceback."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig):
        start = time.perf_counter()
        try:
            return fn(cfg)
        except Exception as exc:
            instead = hydra_job_failed(_prog_name(), exc, log)
            if instead is None:
                log.exception("run failed; outputs so far are in %s", _output_dir())
                raise
            raise instead from None
        finally:
            log.info("run took %.1f s; outputs in %s", time.perf_counter() - start, _output_dir())
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            except ImportError:
                pass

    return wrapped


def override_key(override: str) -> str:
    """``+model.head.alpha=0.9`` -> ``model.head.alpha``: the config key a command-line override sets."""
    return override.split("=", 1)[0].lstrip("+~")


def run_identity() -> dict[str, Any]:
    """What made this run, for metrics.json: the config-group choices (``model: dbtr``) and the command-line
    overrides. The resolved config alone does not say which ``model=`` file was chosen. {} outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except Exception:  # outside a Hydra app (tests calling train(cfg) directly)
        return {}
    choices = {
        k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items() if not k.startswith("hydra/")
    }
    return {"choices": choices, "overrides": list(hc.overrides.task)}


def _prog_name() -> str:
    """``dbtr-train`` for the console script; the module's job name under ``python -m dbtr.cli.train``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("dbtr-") else f"dbtr ({Path(name).stem or 'run'})"


def _output_dir() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # outside a Hydra app (tests calling train(cfg) directly)
        return str(Path.cwd())
