"""Shared fixtures: everything offline and on the CPU, with a small random CLIP saved and loaded by path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from cli_helpers import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The tiny fixture layout (classes, captions, images, labels, random CLIP folder), generated once per
    session."""
    from dbtr.testing.fixtures import make_tiny_dataset

    return make_tiny_dataset(
        tmp_path_factory.mktemp("demo"), seed=0, num_captions=96, num_val=24, num_test=32
    )


@pytest.fixture(scope="session")
def clip_dir(demo_dir) -> Path:
    return demo_dir / "clip"


@pytest.fixture()
def encoder(clip_dir):
    from dbtr.models.clip import ClipEncoder

    torch.manual_seed(0)
    return ClipEncoder.from_pretrained(str(clip_dir), dense="clearclip")


@pytest.fixture(scope="session")
def cli():
    """:func:`cli_helpers.run_cli`, for tests that take their runner as a fixture."""
    return run_cli


@pytest.fixture(scope="session")
def wandb_run(demo_dir, tmp_path_factory) -> Path:
    """A short dbtr-train of the full method on the tiny data, logged to wandb in offline mode (no
    network)."""
    root = tmp_path_factory.mktemp("wandb_run")
    run = root / "run"
    wandb_dirs = {k: str(root / k.lower()) for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=3",
        "seed=3",
        "logger=wandb",
        cwd=root,
        env={"WANDB_MODE": "offline", **wandb_dirs},
    )
    return run
