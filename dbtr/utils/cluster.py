"""SLURM jobs through Hydra's submitit launcher: one SLURM task per Lightning device, checked before
submitting.

Lightning runs one process per device and, under SLURM, lets SLURM start them (SLURMEnvironment): so
``hydra.launcher.tasks_per_node`` must equal ``trainer.devices`` and ``hydra.launcher.nodes`` must equal
``trainer.num_nodes``. Lightning notices a mismatch only once the job runs on the cluster; this check refuses
it at submission time (``hydra_plugins/dbtr_launcher``: the launcher of ``launcher=slurm``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from dbtr.utils.errors import UserError


class SlurmLayoutError(UserError):
    """The SLURM task layout does not match the Lightning trainer's devices and nodes."""


def _get(node: DictConfig, key: str) -> Any:
    try:
        return node.get(key)
    except (
        Exception
    ) as err:  # an interpolation that resolves to the wrong type, e.g. devices=auto into an int
        raise SlurmLayoutError(
            f"hydra.launcher.{key} could not be resolved ({err}); under SLURM trainer.devices and "
            "trainer.num_nodes "
            "must be integers (one SLURM task per device)"
        ) from None


def slurm_layout_problems(launcher: DictConfig, trainer: DictConfig) -> list[str]:
    """What is wrong with running ``trainer`` as the SLURM job ``launcher`` describes (empty if nothing)."""
    devices, num_nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    tasks, nodes, gpus = (
        _get(launcher, "tasks_per_node"),
        _get(launcher, "nodes"),
        _get(launcher, "gpus_per_node"),
    )
    problems = []
    if isinstance(devices, bool) or not isinstance(devices, int):
        problems.append(
            f"trainer.devices={devices!r} must be a number of devices per node (SLURM starts one task each)"
        )
    elif tasks != devices:
        problems.append(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: they must be equal "
            "(Lightning expects one SLURM task per device)"
        )
    if nodes != num_nodes:
        problems.append(f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}: they must be equal")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and isinstance(devices, int) and (gpus or 0) < devices:
        problems.append(f"hydra.launcher.gpus_per_node={gpus} is fewer than trainer.devices={devices} GPUs")
    return problems


def check_slurm_layout(config: DictConfig) -> None:
    problems = slurm_layout_problems(config.hydra.launcher, config.trainer)
    if problems:
        raise SlurmLayoutError(
            "SLURM layout does not match the trainer: "
            + "; ".join(problems)
            + ". Keep the defaults of launcher=slurm (tasks_per_node=${trainer.devices}, "
            "nodes=${trainer.num_nodes}) "
            "and set trainer.devices / trainer.num_nodes instead."
        )
