"""Hydra multirun, the Optuna search config and the SLURM launcher config (composed and checked, never
submitted)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cli_helpers import run_cli
from dbtr.utils.cluster import SlurmLayoutError, check_slurm_layout
from dbtr.utils.hydra_utils import CONFIG_DIR
from dbtr.utils.objective import optimized_value
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name="train.yaml", overrides=overrides, return_hydra_config=True)


@pytest.mark.slow
def test_two_seed_multirun_writes_one_run_per_seed(demo_dir, tmp_path):
    sweep = tmp_path / "multi"
    run_cli(
        "dbtr-train",
        "-m",
        "experiment=tiny_full",
        "seed=1,2",
        "trainer.max_epochs=2",
        "quiet=true",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    runs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [r["seed"] for r in runs] == [1, 2]
    assert all(0 < r["test"]["test/mAP"] <= 100 and r["test"]["test/num_images"] == 32 for r in runs)
    heads = [
        torch.load(sweep / str(i) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for i in (0, 1)
    ]
    key = "head.global_classifier.residual"
    assert not torch.equal(heads[0][key], heads[1][key])  # the seed reached training (caption order)


def test_optuna_search_config_composes():
    cfg = _compose(["hparams_search=dbtr_optuna", "experiment=tiny_full"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/mAP" and cfg.hydra.mode.name == "MULTIRUN"
    assert set(sweeper.params) >= {"model.optimizer.lr", "model.head.alpha_global"}
    # every searched key exists in the composed config, so each trial's overrides apply
    for key in sweeper.params:
        node = cfg
        for part in key.split("."):
            node = node[part]


@pytest.mark.slow
def test_optuna_two_trials_maximise_validation_map(demo_dir, tmp_path):
    """Two Optuna trials on tiny data: the study's best value is the best trial's validation selection
    score."""
    sweep = tmp_path / "optuna"
    run_cli(
        "dbtr-train",
        "-m",
        "hparams_search=dbtr_optuna",
        "experiment=tiny_full",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "trainer.max_epochs=2",
        "quiet=true",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    trials = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    lrs = [t["config"]["model"]["optimizer"]["lr"] for t in trials]
    assert lrs[0] != lrs[1] and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    scores = [t["selection"]["best_score"] for t in trials]
    assert result["best_value"] == pytest.approx(max(scores), abs=1e-9)
    assert max(scores) != pytest.approx(max(t["test"]["test/mAP"] for t in trials), abs=1e-9)  # not the test


def test_objective_is_the_selection_metric_not_the_test():
    sel = {"monitor": "val/mAP", "best_score": 71.0}
    assert optimized_value(None, {"test/mAP": 90.0}, sel, {"val/mAP": 65.0}) == 71.0
    assert optimized_value("val/mAP", {}, {}, {"val/mAP": 65.0}) == 65.0  # no checkpoint callback: last epoch
    assert optimized_value(None, {"test/mAP": 90.0}, {}, {}) is None
    with pytest.raises(
        ValueError, match="optimized_metric=val/mAP was not produced.*available: \\['test/mAP'\\]"
    ):
        optimized_value("val/mAP", {"test/mAP": 90.0}, {}, {})


SLURM = [
    "launcher=slurm",
    "trainer=ddp",
    "trainer.devices=4",
    "trainer.num_nodes=2",
    "hydra.launcher.partition=gpu",
]


def test_slurm_launcher_follows_the_trainer_layout(tmp_path, monkeypatch):
    cfg = _compose(SLURM + [f"hydra.sweep.dir={tmp_path}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.dbtr_launcher.checked_slurm.CheckedSlurmLauncher"
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == (4, 2, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    check_slurm_layout(cfg)  # a consistent layout passes

    # the launcher builds (no cluster needed) and its parameters give the expected sbatch header
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend srun exists

    plugin = instantiate(launcher)
    assert isinstance(plugin, SlurmLauncher)
    params = {k: v for k, v in plugin.params.items() if k not in ("submitit_folder", "max_num_timeout")}
    base = {
        "timeout_min",
        "cpus_per_task",
        "gpus_per_node",
        "tasks_per_node",
        "mem_gb",
        "nodes",
        "name",
        "stderr_to_stdout",
    }
    executor = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("--ntasks-per-node=4", "--nodes=2", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {line}" in sbatch


@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra.launcher.tasks_per_node=8", "tasks_per_node=8 but trainer.devices=4: they must be equal"),
        ("hydra.launcher.nodes=1", "nodes=1 but trainer.num_nodes=2: they must be equal"),
        ("trainer.devices=auto", "must be integers"),
    ],
)
def test_slurm_layout_mismatch_is_refused_before_submitting(override, message):
    cfg = _compose(SLURM + [override])
    with pytest.raises(SlurmLayoutError, match=message):
        check_slurm_layout(cfg)


@pytest.mark.slow
def test_slurm_mismatch_fails_from_the_cli_without_submitting(demo_dir, tmp_path):
    proc = run_cli(
        "dbtr-train",
        "-m",
        *SLURM[:-1],
        "hydra.launcher.tasks_per_node=2",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "tasks_per_node=2 but trainer.devices=4" in proc.stderr
    assert not (tmp_path / "s" / ".submitit").exists()
