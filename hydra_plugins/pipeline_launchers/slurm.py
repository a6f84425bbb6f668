"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): see pipeline/runtime/slurm.py."""

from pipeline.runtime import slurm


class SlurmLauncher(slurm.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with the pipeline's additions."""
