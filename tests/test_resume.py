"""Resuming a killed run: same final weights as an uninterrupted run; checkpoints atomic and weights-only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import cli_env, command, run_cli

EPOCHS = 16  # tiny epochs take ~0.1 s: enough of them that the kill lands mid-run


def _args(demo_dir: Path, run: Path, *extra: str) -> list[str]:
    # feature noise makes training draw from the global RNG, which a checkpoint does not restore by itself
    return [
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={run}",
        "seed=5",
        f"trainer.max_epochs={EPOCHS}",
        "model.head.feature_noise_std=0.05",
        "quiet=true",
        *extra,
    ]


def _heads(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == EPOCHS - 1
    return ckpt["state_dict"]


def _epoch_of(last: Path) -> int:
    try:  # written atomically, so a file that exists is complete
        return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
    except FileNotFoundError:
        return -1


@pytest.mark.slow
def test_killed_run_resumed_from_last_matches_uninterrupted_run(demo_dir, tmp_path):
    """SIGKILL after an epoch >= 1 checkpoint, restart with ckpt_path=last in the same run folder: the final
    residuals are bitwise equal to a run that was never interrupted (CPU, same seed)."""
    full = tmp_path / "full"
    run_cli("dbtr-train", *_args(demo_dir, full), cwd=tmp_path)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command("dbtr-train"), *_args(demo_dir, killed)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last, deadline, epoch = killed / "checkpoints" / "last.ckpt", time.monotonic() + 300, -1
    try:
        while epoch < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            epoch = _epoch_of(last)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended before it was killed:\n{err.decode()[-3000:]}"
    stopped_at = _epoch_of(last)
    assert 1 <= stopped_at < EPOCHS - 1 and not (killed / "metrics.json").exists()

    run_cli("dbtr-train", *_args(demo_dir, killed, "ckpt_path=last"), cwd=tmp_path)
    want, got = _heads(full), _heads(killed)
    assert set(got) == set(want) and got
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs after resuming from epoch {stopped_at}"
    m_full = json.loads((full / "metrics.json").read_text())["test"]
    m_resumed = json.loads((killed / "metrics.json").read_text())["test"]
    assert m_resumed["test/mAP"] == m_full["test/mAP"]


@pytest.mark.slow
def test_resume_last_without_checkpoint_fails_clearly(demo_dir, tmp_path):
    proc = run_cli(
        "dbtr-train", *_args(demo_dir, tmp_path / "fresh", "ckpt_path=last"), cwd=tmp_path, check=False
    )
    assert proc.returncode != 0
    assert "ckpt_path=last but" in proc.stderr and "hydra.run.dir=<the run folder to resume>" in proc.stderr


@pytest.mark.slow
def test_resume_from_missing_path_fails_clearly(demo_dir, tmp_path):
    proc = run_cli(
        "dbtr-train",
        *_args(demo_dir, tmp_path / "r", f"ckpt_path={tmp_path / 'nope.ckpt'}"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "no such checkpoint file" in proc.stderr


@pytest.fixture(scope="module")
def two_epochs(demo_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("two_epochs") / "run"
    run_cli("dbtr-train", *_args(demo_dir, run, "trainer.max_epochs=2"), cwd=run.parent)
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_class_order(two_epochs, demo_dir, tmp_path):
    names = (demo_dir / "classes.txt").read_text().split()
    reordered = tmp_path / "classes.txt"
    reordered.write_text("\n".join(reversed(names)) + "\n")
    proc = run_cli(
        "dbtr-train",
        *_args(demo_dir, tmp_path / "r", f"ckpt_path={two_epochs}", f"data.classes={reordered}"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"ckpt_path={two_epochs}" in proc.stderr and "same names in a different order" in proc.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


@pytest.mark.slow
def test_init_from_refuses_a_checkpoint_of_another_clip(two_epochs, demo_dir, tmp_path):
    from dbtr.models.tiny import save_random_clip

    other = tmp_path / "clip_other"
    save_random_clip(other, ["a red square"], seed=7, vision_image_size=32)
    proc = run_cli(
        "dbtr-train",
        *_args(demo_dir, tmp_path / "i", f"model.init_from={two_epochs}", f"clip.name_or_path={other}"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"model.init_from={two_epochs}" in proc.stderr and "was trained on another CLIP" in proc.stderr
