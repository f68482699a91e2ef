"""quiet=true: no progress bars or info banners on the console, only the final metrics table (and warnings)."""

from __future__ import annotations

import json

from cli_helpers import run_cli

NOISE = ("Epoch", "GPU available", "Test metric", "[INFO]", "Seed set", "encoding")


def test_quiet_train_and_eval_print_little_but_the_metrics(demo_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("dbtr-train", "experiment=tiny_full", f"paths.tiny_dir={demo_dir}", "trainer.max_epochs=2",
                   "quiet=true", "cache_image_features=true", f"hydra.run.dir={run}", cwd=tmp_path)
    m_ap = json.loads((run / "metrics.json").read_text())["test"]["test/mAP"]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) <= 12, proc.stdout
    assert "test metrics (%)" in proc.stdout and f"{m_ap:.2f}" in proc.stdout
    assert not [n for n in NOISE if n in proc.stdout], proc.stdout
    assert "wrote" in (run / "train.log").read_text()  # the run's log file keeps the info records

    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    args = ["data=tiny", f"paths.tiny_dir={demo_dir}"]
    quiet = run_cli("dbtr-eval", ckpt, *args, "quiet=true", f"hydra.run.dir={tmp_path / 'e1'}", cwd=tmp_path).stdout
    loud = run_cli("dbtr-eval", ckpt, *args, f"hydra.run.dir={tmp_path / 'e2'}", cwd=tmp_path).stdout
    e_map = json.loads((tmp_path / "e1" / "metrics.json").read_text())["test"]["test/mAP"]
    assert f"{e_map:.2f}" in quiet and not [n for n in NOISE if n in quiet], quiet
    assert "[INFO]" in loud and len(loud) > 2 * len(quiet)
    for out, folder in ((proc.stdout, run), (quiet, tmp_path / "e1"), (loud, tmp_path / "e2")):
        # one metrics table (ours, not Lightning's as well) and one line naming the run folder
        assert out.count("test metrics (%)") == 1 and "Test metric" not in out, out
        assert out.count("run folder: ") == 1 and f"run folder: {folder}" in out
