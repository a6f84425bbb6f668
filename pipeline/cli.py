"""The entry point: compose the config with Hydra, check it and the run_dir, run the stage.

Exit codes (DESIGN.md): 0 done; 2 bad input or config (one line on stderr, nothing in an
existing run_dir changed); 1 anything unexpected.
"""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import config
from pipeline.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("pipeline")
_exit_codes: list[int] = []
_job_started = False

config.register()


def setup_logging(rank_zero: bool) -> None:
    import lightning  # noqa: F401  (it sets its loggers' levels on import: quiet them after)
    from rich.logging import RichHandler

    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(show_path=False, rich_tracebacks=False, markup=False))
    root.setLevel(logging.INFO if rank_zero else logging.WARNING)
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


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a run_dir made by another config (naming the keys), or clear it on overwrite=true.
    Nothing is written before this check passes."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    try:
        old = OmegaConf.load(saved)
    except Exception:
        raise UserError(
            f"{saved} is unreadable; move the run_dir away or pass overwrite=true"
        ) from None
    if cfg.overwrite:
        log.warning("overwrite=true: clearing %s and starting over", run_dir)
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return
    diff = config.differing_keys(old, cfg)
    if not diff:
        return
    shown = ", ".join(f"{k} ({old_value(old, k)} -> {old_value(cfg, k)})" for k in diff[:4])
    more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
    raise UserError(
        f"run_dir {run_dir} was made by another config: {shown}{more}; use another run_dir=, "
        "or overwrite=true to start it over"
    )


def old_value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default="<unset>")


def run_resolved(cfg: DictConfig, started_ranks: bool = False) -> int:
    """Run one job (on this rank) from a resolved config; returns the exit code."""
    from pipeline import dist

    setup_logging(rank_zero=dist.rank() == 0)
    run_dir = Path(cfg.run_dir).resolve()
    try:
        if not started_ranks:
            check_run_dir(cfg, run_dir)
            from pipeline.launch import ranks_to_start

            n = ranks_to_start(cfg.trainer)
            if n:
                log.info("starting %d DDP ranks for this job (one process group per job)", n)
                write_config(cfg, run_dir)
                return _start(cfg, n)
        dist.init_from_environment(str(cfg.trainer.get("accelerator", "auto")))
        if dist.is_rank_zero():
            write_config(cfg, run_dir)
        dist.barrier()
        return run_stage(cfg, run_dir)
    except UserError as e:
        if dist.is_rank_zero():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _start(cfg: DictConfig, n: int) -> int:
    from pipeline.launch import start_ranks

    return start_ranks(cfg, n)


def write_config(cfg: DictConfig, run_dir: Path) -> None:
    from pipeline.artifacts import remove_stale_temporaries, write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    if not (run_dir / "config.yaml").exists() or cfg.overwrite:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))


def run_stage(cfg: DictConfig, run_dir: Path) -> int:
    from pipeline import dist
    from pipeline.artifacts import read_json, write_json
    from pipeline.stages import STAGE_FUNCTIONS
    from pipeline.table import print_summary

    done = run_dir / "summary.json"
    if done.exists() and cfg.stage not in ("report",):
        if dist.is_rank_zero():
            log.info("%s is complete; nothing to redo", run_dir)
            print_summary(read_json(done), run_dir)
        return 0
    result = STAGE_FUNCTIONS[cfg.stage](cfg, run_dir)
    if dist.is_rank_zero():
        write_json(done, result)
        print_summary(result, run_dir)
    dist.barrier()
    return 0


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_job(cfg: DictConfig) -> int:
    """One Hydra job (the single run, or one job of a -m sweep)."""
    global _job_started
    _job_started = True
    try:
        code = run_resolved(resolve(cfg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Exception:
        traceback.print_exc()
        code = 1
    _exit_codes.append(code)
    return code


class _HydraHintFilter:
    """Drops Hydra's 'set HYDRA_FULL_ERROR' hint so a config error is the one line it should be."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if "HYDRA_FULL_ERROR" in text:
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main() -> None:
    stderr = sys.stderr
    sys.stderr = _HydraHintFilter(stderr)
    try:
        hydra_job()
    except SystemExit as e:
        # Hydra exits 1 when the command line or the configs do not compose: that is bad input.
        code = e.code if isinstance(e.code, int) else 1
        sys.exit(2 if code == 1 and not _job_started else code)
    finally:
        sys.stderr = stderr
    sys.exit(max(_exit_codes, default=0))
