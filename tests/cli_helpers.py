"""Running the console scripts in subprocesses, the way a user does: the one runner every CLI test uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def command(name: str) -> list[str]:
    """``dbtr-x`` from the venv, else ``python -m dbtr.x`` (a checkout that was never pip-installed)."""
    exe = BIN / name
    module = {"dbtr-data": "stats", "dbtr-toyworld": "toyworld.demo"}.get(name, name.split("-", 1)[1])
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"dbtr.{module}"]


def cli_env(**extra: str) -> dict[str, str]:
    """Offline, no wandb upload, no warning noise in the captured output; ``extra`` wins."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


def run_cli(
    name: str,
    *args: str,
    cwd: Path,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run console script ``name`` with ``args`` in ``cwd``, output captured. ``env`` adds to :func:`cli_env`.
    With ``check``, a non-zero exit fails the test and shows the end of both streams."""
    proc = subprocess.run(
        [*command(name), *args],
        cwd=cwd,
        env=cli_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc
