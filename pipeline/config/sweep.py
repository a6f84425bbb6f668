"""Checks of a -m sweep as a whole, made once before its first job starts: a sweeper that
optimises the jobs' return value gets one from every job, and no two jobs share a job dir."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.config import keys as config_keys
from pipeline.errors import UserError


def check_optimising_sweeper(config: DictConfig) -> None:
    """A sweeper that optimises the jobs' return value (Optuna) needs one from every job: an
    objective, of the right direction, and for val_accuracy a val split. Checked once, before
    the first trial, rather than failing the study at its first job."""
    sweeper = OmegaConf.select(config, "hydra.sweeper", default=None) or {}
    if "optuna" not in str(sweeper.get("_target_", "")).lower():
        return
    objective = config.objective
    if not objective:
        raise UserError(
            "hydra/sweeper=optuna optimises the jobs' objective: pass objective=val_accuracy"
        )
    direction = sweeper.get("direction")
    directions = list(direction) if OmegaConf.is_list(direction) else [direction]
    if any(str(d).lower().rsplit(".", 1)[-1] != "maximize" for d in directions):
        raise UserError(
            f"objective={objective} is an accuracy but hydra.sweeper.direction={direction}; "
            "pass hydra.sweeper.direction=maximize (the hparams_search configs set it)"
        )
    # (a search over the val split itself, in the sweeper's params or on the command line)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = set((sweeper.get("params") or {}).keys())
    given = list(OmegaConf.select(config, "hydra.overrides.task") or [])
    for override in OverridesParser.create().parse_overrides(given):
        if override.is_sweep_override():
            params.add(override.key_or_group)
    swept_val = {"data.val_per_class", "data.val_dir"} & params
    data = config.data
    if objective == "val_accuracy" and not swept_val:
        has_val = bool(data.val_per_class) or bool(data.get("val_dir"))  # val_dir: image_folder
        if not has_val:
            raise UserError(
                "objective=val_accuracy needs a val split to tune on: pass data.val_per_class=N "
                "(N of data.labels_per_class per class) or data.val_dir=DIR"
            )


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper expands the command line (None: another
    sweeper, which the pipeline does not expand)."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if not sweeper.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def shared_job_dir(config: DictConfig) -> str | None:
    """Why two jobs of the sweep would share one job dir (None: they would not). Job dirs are
    named by each job's result overrides (conf/config.yaml hydra.sweep.subdir), so jobs that
    differ only in result-neutral settings are one experiment: run side by side (a SLURM sweep)
    they would write one run dir at once."""
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", "")
    if "job_dir_name" not in str(subdir):
        return None  # a subdir of the user's own
    jobs = sweep_jobs(config)
    seen: dict[str, list[str]] = {}
    for job in jobs or []:
        name = config_keys.dir_name(job)
        if name in seen:
            differ = ", ".join(sorted(set(seen[name]) ^ set(job)))
            return (
                f"two jobs of this sweep would share the job dir {name}: they differ only in "
                f"settings that cannot change a run's result ({differ}); sweep settings that "
                "change it, or run each in its own sweep dir (hydra.sweep.dir=)"
            )
        seen[name] = job
    return None
