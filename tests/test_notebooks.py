"""Notebooks: committed without outputs, and the checkpoint explorer runs end to end on a trained run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert any(p.name == "01-explore-checkpoint.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_carries_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} hold outputs or execution counts (clear them before committing)"
    )


@pytest.mark.slow
def test_explore_checkpoint_notebook_reproduces_the_runs_test_map(wandb_run, demo_dir, monkeypatch):
    from nbclient import NotebookClient

    metrics = json.loads((wandb_run / "metrics.json").read_text())
    monkeypatch.setenv("DBTR_CKPT", metrics["checkpoint"])
    monkeypatch.setenv("DBTR_DATA", str(demo_dir))
    monkeypatch.setenv("DBTR_NUM_HEATMAPS", "2")
    path = next(p for p in NOTEBOOKS if p.name == "01-explore-checkpoint.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    found = re.search(r"test mAP: ([\d.]+) over (\d+) images", text)
    assert found, text[-2000:]
    assert float(found.group(1)) == pytest.approx(metrics["test"]["test/mAP"], abs=1e-3)
    assert int(found.group(2)) == metrics["test"]["test/num_images"]
    pngs = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    assert len(pngs) == 3  # per-class AP, PR curves, heatmaps
