"""The entry point: compose the config with Hydra, check it and the run_dir, run the stage.

Exit codes (docs/design.md): 0 done; 2 bad input or config (one line on stderr, nothing in an
existing run_dir changed); 1 anything unexpected (and a stop by a cluster's signal); 130
stopped by Ctrl-C (docs/reliability.md). The command line's repairs before Hydra reads it, and
Hydra's composition errors as one line: command_line.py.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import config, usage
from pipeline.command_line import (
    _HydraHintFilter,
    hydra_error_line,
    mode_flags_first,
    quote_path_overrides,
)
from pipeline.config.sweep import check_optimising_sweeper, shared_job_dir
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.runtime.rundir import JobConfig, RunDir

CONF_DIR = str(config.CONF_DIR)
log = logging.getLogger("pipeline")
_exit_codes: list[int] = []
_job_started = False
_sweep_started = False

config.register()
usage.register_resolvers()  # the stage and group lists of --help


def setup_logging(rank_zero: bool) -> None:
    import lightning  # noqa: F401  (it sets its loggers' levels on import: quiet them after)
    from rich.logging import RichHandler

    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(show_path=False, rich_tracebacks=False, markup=False))
    root.setLevel(logging.INFO if rank_zero else logging.WARNING)
    # Known, harmless: our loaders yield whole batches, so Lightning cannot infer batch indices
    # (predictions carry their dataset index instead); a deprecation inside Lightning itself.
    warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Where SLURM is installed Lightning suggests srun for every run: the pipeline starts its
    # ranks itself (or runs under srun already), and the one-line error contract holds.
    warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
    # Resuming from checkpoints/last.ckpt: the directory is not empty, by design.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    # A resumed run's CSV logger appends to its metrics.csv (engine/loggers.py), whatever
    # Lightning says; the loggers get per-epoch metrics, not Lightning's per-step ones.
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    for name in ("mlflow", "alembic", "wandb"):  # the loggers' own start-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).propagate = False


def resolve(cfg: DictConfig) -> DictConfig:
    """The config with every interpolation resolved, as plain values (what config.yaml holds)."""
    try:
        resolved = OmegaConf.create(
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        )
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "a config key"
        raise UserError(
            f"{key} is required or invalid ({type(e).__name__}): pass {key}=VALUE"
        ) from None
    config.resolve_pretrain_source(resolved)
    config.validate(resolved)
    return resolved


def run_resolved(
    cfg: DictConfig, started_ranks: bool = False, overrides: list[str] | None = None
) -> int:
    """Run one job (on this rank) from a resolved config; returns the exit code."""
    from pipeline.runtime import dist, launch, preemption, requeue
    from pipeline.runtime.run_lock import RunDirBusy
    from pipeline.runtime.rundir import RunDir

    # First: from here a signal stops cleanly.
    preemption.install(cfg.max_requeues, started_rank=started_ranks)
    setup_logging(rank_zero=dist.rank() == 0)
    run = RunDir(cfg.run_dir)
    job = job_config(cfg, overrides)
    before = None if started_ranks else run.entries_before()
    try:
        with preemption.stage():
            external = started_ranks or launch.externally_launched()
            if not external:
                run.lock()  # one live run per run_dir; the ranks it starts run under it
                run.check_config(job, requeue.requeued_job())
                n = launch.ranks_to_start(job.values["trainer"])
                if n:
                    log.info("starting %d DDP ranks for this job (one process group per job)", n)
                    run.begin(job)
                    code = launch.start_ranks(
                        OmegaConf.to_yaml(cfg, resolve=True), cfg.trainer.num_threads, n
                    )
                    if code == 2:
                        run.undo_new(before)
                    return code
            dist.init_from_environment(str(cfg.trainer.get("accelerator", "auto")))
            if external and not started_ranks:
                run.on_rank_zero(run.lock)  # rank 0 holds it for the job's ranks
                run.check_config_on_every_rank(job, requeue.requeued_job())
            run.begin(job)
            return run_stage(cfg, run, job.values)
    except UserError as e:
        if dist.is_rank_zero():
            if not isinstance(e, RunDirBusy):  # (the other run's files are not ours to undo)
                run.undo_new(before)
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except preemption.Preempted as e:
        return requeue.stopped(e.signum, started_ranks, dist.is_rank_zero())
    finally:
        run.unlock()


def job_config(cfg: DictConfig, overrides: list[str] | None) -> JobConfig:
    """What the run dir records and checks of this job's config (runtime/rundir.py)."""
    from pipeline.config.files import read_yaml
    from pipeline.config.keys import differing_keys
    from pipeline.runtime.rundir import JobConfig

    return JobConfig(
        values=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        text=OmegaConf.to_yaml(cfg),
        overrides_text=OmegaConf.to_yaml(list(overrides)) if overrides is not None else None,
        read=read_yaml,
        differing=differing_keys,
    )


def stopped_by_signal() -> bool:
    """Whether a job of this process was stopped by a signal (runtime/preemption.py)."""
    preemption = sys.modules.get("pipeline.runtime.preemption")
    return bool(preemption and preemption.stopped_by())


def run_stage(cfg: DictConfig, run: RunDir, values: dict[str, Any]) -> int:
    """Run the stage `cfg.stage` in `run`; `values` is the config as plain values (the job's,
    already converted once for the run dir)."""
    from pipeline.config.specs import run_spec
    from pipeline.console import print_summary
    from pipeline.runtime.io import read_json
    from pipeline.stages import RERUN, recipe

    done = run / "summary.json"
    if cfg.stage not in RERUN and run.exists(done):
        log.info("%s is complete; nothing to redo", run.path)
        run.on_rank_zero(lambda: print_summary(read_json(done), run.path))
        return 0
    from pipeline.runtime.launch import torch_threads
    from pipeline.runtime.memory import freeze_imported_objects

    stage = recipe(cfg.stage)  # imports what the stage uses (torch, Lightning, ...)
    spec = run_spec(values)  # everything below reads the typed spec
    freeze_imported_objects()
    threads = torch_threads(spec.trainer.args)  # trainer.num_threads, or SLURM's CPUs per task
    if threads:
        import torch

        torch.set_num_threads(threads)
    if cfg.stage != "report":
        from pipeline.engine.loggers import build_run_loggers

        run.tracker = build_run_loggers(spec, run.path)
    status, result = "failed", None
    try:
        if run.tracker is not None:
            run.tracker.log_params(spec.config)
        result = stage(spec, run)
        status = "success"
    finally:
        if run.tracker is not None:
            run.tracker.close(status, result)
    run.write_json(done, result)  # written last: the run is finished
    run.on_rank_zero(lambda: print_summary(result, run.path))
    return 0


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_job(cfg: DictConfig) -> float | None:
    """One Hydra job (the single run, or one job of a -m sweep). Returns the job's objective
    (`objective=`, read from its summary.json) for sweepers that optimise it (Optuna); None
    when the job failed or has no such value. The exit code is recorded apart (`main`)."""
    global _job_started
    _job_started = True
    _release_stderr()
    resolved = None
    try:
        resolved = resolve(cfg)
        if resolved.objective == "test_accuracy":
            log.warning(
                "objective=test_accuracy: a sweeper tuning on the test set makes its test "
                "accuracy an optimistic estimate; tune on val_accuracy (data.val_per_class)"
            )
        code = run_resolved(resolved, overrides=list(HydraConfig.get().overrides.task))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Exception:
        traceback.print_exc()
        code = 1
    _exit_codes.append(code)
    if code and stopped_by_signal():
        # Stopped by its cluster (or a kill): no further job of a sweep starts, and a submitit
        # job leaves no result, so that its sweep waits for SLURM's verdict (requeued and run
        # again, or cancelled).
        sys.exit(code)
    if code and os.environ.get("SUBMITIT_EXECUTOR"):
        # A submitit job (hydra/launcher=submitit_*, slurm): the sweep runs in another process
        # that only sees a job fail when it raises.
        raise JobFailed(code)
    return job_objective(resolved, code)


def job_objective(cfg: DictConfig | None, code: int) -> float | None:
    """The value `objective=` names, of the job's final round (summary.json), or None."""
    from pipeline.config.schema import OBJECTIVES

    if code != 0 or cfg is None or not cfg.objective:
        return None
    from pipeline.runtime.io import read_json

    try:
        summary = read_json(os.path.join(str(cfg.run_dir), "summary.json"))
    except (OSError, ValueError):
        return None
    value = summary.get(OBJECTIVES[cfg.objective])  # None: no val split (or another stage)
    if value is None:
        return None
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.info("objective %s = %.6f", cfg.objective, value)
    return float(value)


class JobFailed(RuntimeError):
    """A job run by submitit ended with a non-zero exit code (its log says why)."""

    def __init__(self, code: int, log_path: str | None = None) -> None:
        if log_path is None:
            try:
                import submitit

                log_path = str(submitit.JobEnvironment().paths.stderr)
            except Exception:  # outside a submitit job: no log to name
                log_path = ""
        where = f"; see {log_path}" if log_path else ""
        super().__init__(f"the job exited with code {code}{where}")
        self.code, self.log_path = code, log_path

    def __reduce__(self) -> tuple:  # rebuilt as it was in the sweep's process
        return (JobFailed, (self.code, self.log_path))


class SweepStarted(Callback):
    """Hydra callback (hydra.callbacks in config.yaml): from here on an exit code 1 from Hydra
    is a failed job, not a command line that does not compose."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_started
        _sweep_started = True
        _release_stderr()
        try:
            check_optimising_sweeper(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        shared = shared_job_dir(config)
        if shared:
            print(f"error: {shared}", file=sys.stderr, flush=True)
            sys.exit(2)


_stderr_filter: _HydraHintFilter | None = None


def _release_stderr() -> None:
    if _stderr_filter is not None:
        _stderr_filter.release()


def main() -> None:
    global _stderr_filter
    sys.argv[1:] = mode_flags_first(quote_path_overrides(sys.argv[1:]))
    if os.environ.get("SLURM_JOB_ID") and not os.environ.get("SUBMITIT_EXECUTOR"):
        # A SLURM task (sbatch + srun): a signal during start-up (imports, composing the
        # config) is kept, and stops the stage as it begins (a time-limit USR2 would otherwise
        # kill the process unsaved and unrequeued). submitit jobs: the launcher installs them.
        from pipeline.runtime import preemption

        preemption.install()
    stderr = sys.stderr
    sys.stderr = _stderr_filter = _HydraHintFilter(stderr)
    try:
        hydra_job()
    except SystemExit as e:
        # Hydra exits 1 when the command line or the configs do not compose: that is bad input.
        code = e.code if isinstance(e.code, int) else 1
        if code == 1 and not (_job_started or _sweep_started):
            held = "".join(_stderr_filter.held or [])
            _stderr_filter.held = None
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                stderr.write(held)
            else:
                print(f"error: {hydra_error_line(held)}", file=stderr, flush=True)
            sys.exit(2)
        sys.exit(code)
    except KeyboardInterrupt:
        # Ctrl-C before a job took the signals (composing the config): nothing was saved, as
        # nothing had started; one line, and the shell's code for it.
        print("stopped by SIGINT before the job started", file=stderr, flush=True)
        sys.exit(130)
    except ValueError as e:
        # Hydra's own check of the mode flags (`--cfg job -m ...`) raises rather than exits.
        if _job_started or _sweep_started or not str(e).startswith("Only one of"):
            raise
        print(
            f"error: {e}: use one per command (--cfg job prints one job's config: drop -m)",
            file=stderr,
            flush=True,
        )
        sys.exit(2)
    finally:
        _release_stderr()
        sys.stderr = stderr
    sys.exit(max(_exit_codes, default=0))
