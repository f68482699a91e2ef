"""dbtr's SLURM launcher for Hydra (plugins must live in the ``hydra_plugins`` namespace package).

Hydra imports every module here when it scans for plugins, so this one stays importable without the optional
``slurm`` extra (``pip install dbtr[slurm]``): the launcher is defined only when submitit's is installed.
"""

from __future__ import annotations

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except (
    ImportError
):  # hydra-submitit-launcher not installed: launcher=slurm is unavailable, nothing else breaks
    SlurmLauncher = None

if SlurmLauncher is not None:
    from dbtr.utils.cluster import check_slurm_layout

    class CheckedSlurmLauncher(SlurmLauncher):
        """submitit's SLURM launcher that refuses a task layout not matching the trainer, before submitting.

        (A Hydra callback cannot do this: Hydra turns exceptions raised in callbacks into warnings.)
        """

        def launch(self, job_overrides, initial_job_idx):
            check_slurm_layout(self.config)
            return super().launch(job_overrides, initial_job_idx)
