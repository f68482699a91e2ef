"""Console output: quiet=true prints the run folder and the final metrics table (and real warnings) only; in
every mode Lightning's per-run banners, tips and its own deprecation warnings are silenced."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from cli_helpers import cli_env, run_cli

NOISE = ("Epoch", "GPU available", "Test metric", "[INFO]", "Seed set", "encoding")
LIBRARY_NOISE = (
    "GPU available",
    "TPU available",
    "HPU available",
    "💡 Tip",
    "litlogger",
    "litmodels",
    "LeafSpec",
    "to estimate number of stepping batches",
)


def _warnings_shown_env() -> dict[str, str]:
    """The usual CLI environment, but with Python's default warning filters (cli_env ignores warnings)."""
    env = cli_env()
    env.pop("PYTHONWARNINGS")
    return env


@pytest.mark.slow
def test_quiet_train_and_eval_print_little_but_the_metrics(demo_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        "trainer.max_epochs=2",
        "quiet=true",
        "cache_image_features=true",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env=_warnings_shown_env(),
    )
    m_ap = json.loads((run / "metrics.json").read_text())["test"]["test/mAP"]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) <= 12, proc.stdout
    assert "test metrics (%)" in proc.stdout and f"{m_ap:.2f}" in proc.stdout
    assert not [n for n in NOISE if n in proc.stdout], proc.stdout
    assert f"run folder: {run} (full log: {run / 'train.log'})" in lines  # quiet still says where it went
    assert not [n for n in LIBRARY_NOISE if n in proc.stdout + proc.stderr], proc.stderr
    assert "wrote" in (run / "train.log").read_text()  # the run's log file keeps the info records

    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    args = ["data=tiny", f"paths.tiny_dir={demo_dir}"]
    quiet = run_cli(
        "dbtr-eval", ckpt, *args, "quiet=true", f"hydra.run.dir={tmp_path / 'e1'}", cwd=tmp_path
    ).stdout
    loud = run_cli(
        "dbtr-eval", ckpt, *args, f"hydra.run.dir={tmp_path / 'e2'}", cwd=tmp_path, env=_warnings_shown_env()
    )
    e_map = json.loads((tmp_path / "e1" / "metrics.json").read_text())["test"]["test/mAP"]
    assert f"{e_map:.2f}" in quiet and not [n for n in NOISE if n in quiet], quiet
    assert "[INFO]" in loud.stdout and len(loud.stdout) > 2 * len(quiet)
    assert not [n for n in LIBRARY_NOISE if n in loud.stdout + loud.stderr], loud.stderr
    for out, folder in ((proc.stdout, run), (quiet, tmp_path / "e1"), (loud.stdout, tmp_path / "e2")):
        # one metrics table (ours, not Lightning's as well) and one line naming the run folder
        assert out.count("test metrics (%)") == 1 and "Test metric" not in out, out
        assert out.count("run folder: ") == 1 and f"run folder: {folder}" in out


def test_library_noise_is_dropped_at_its_source_and_real_warnings_kept(caplog):
    from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn

    from dbtr.utils.progress import silence_library_noise

    silence_library_noise()
    silence_library_noise()  # idempotent: one filter per logger
    assert len(logging.getLogger("lightning.pytorch.utilities.rank_zero").filters) <= 1
    with caplog.at_level(logging.INFO):
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing litmodels")
        rank_zero_info("`Trainer.fit` stopped: `max_epochs=2` reached.")
    text = caplog.text
    assert "GPU available" not in text and "Tip" not in text and "max_epochs=2" in text
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        silence_library_noise()  # again inside this catch_warnings, which restores the filters on exit
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=2)
        warnings.warn("a real deprecation of ours", FutureWarning, stacklevel=2)
        rank_zero_warn("a real warning of Lightning")
    messages = [str(w.message) for w in seen]
    assert "a real deprecation of ours" in messages and "LeafSpec" not in " ".join(messages)
    assert "a real warning of Lightning" in messages or "a real warning of Lightning" in caplog.text
