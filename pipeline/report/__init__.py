"""Summarise a sweep (or a single run) into ``results.csv``, ``report.md`` and PNG plots.

A job dir is any directory holding ``config.yaml`` below the sweep dir; it finished when it also
holds ``summary.json``. Swept keys are the config keys whose values differ across jobs, except
the result-neutral ones; ``seed`` is the replicate key, so groups are formed by the other swept
keys and metrics are averaged over seeds.

    load.py     job dirs and what each holds (with the choices of groups such as `arm=`)
    keys.py     swept keys, aliases (and keys an `arm=`-like choice sets), values in override syntax
    command.py  shared settings and reproduce commands (from the recorded overrides)
    group.py    results.csv, groups and their statistics (pandas)
    render.py   report.md
    plots.py    the PNG plots
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.report.command import reproduce_command, shared_settings
from pipeline.report.group import assign_groups, budget_frame, build_results, group_stats
from pipeline.report.keys import (
    BUDGET_KEY,
    REPLICATE_KEY,
    find_swept_keys,
    fold_into_selectors,
    order_group_keys,
    split_aliases,
)
from pipeline.report.load import find_job_dirs, load_config, load_jobs
from pipeline.report.plots import write_plots
from pipeline.report.render import (
    ReportParts,
    render_budget_pivot,
    render_main_table,
    render_report,
)
from pipeline.runtime.io import write_text

if TYPE_CHECKING:
    from pipeline.config.specs import RunSpec
    from pipeline.runtime.rundir import RunDir

__all__ = [
    "find_job_dirs",
    "find_swept_keys",
    "load_config",
    "run_report",
    "split_aliases",
    "write_report",
]


def write_report(
    sweep_dir: Path, out_dir: Path, command: str = "python -m pipeline"
) -> dict[str, Any]:
    """Summarise the sweep (or run) in sweep_dir into results.csv, report.md and plots in out_dir.

    Returns ``{"n_jobs", "n_failed", "group_keys", "replicate_key", "paths"}`` where paths maps
    each written file name to its path.
    """
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    jobs = load_jobs(sweep_dir, out_dir)
    configs = [job.config for job in jobs]
    swept = find_swept_keys(configs)
    primary, aliases = split_aliases(swept, configs)
    selectors = {key for job in jobs for key in job.selectors}
    primary, aliases = fold_into_selectors(primary, aliases, configs, selectors)
    groups = assign_groups(jobs, order_group_keys(primary))
    results = build_results(jobs, swept)
    stats = group_stats(results, groups)
    command_keys = [k for k in swept if aliases.get(k, k) != REPLICATE_KEY]
    commands = [
        reproduce_command(
            command, [jobs[i] for i in groups.members(gid)], groups.keys, command_keys
        )
        for gid in range(len(groups.values))
    ]
    budgets = budget_frame(stats, groups) if BUDGET_KEY in groups.keys else None

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "results.csv", results.to_csv(index=False))
    plots = write_plots(out_dir, jobs, groups, stats, budgets)
    parts = ReportParts(
        sweep_dir=sweep_dir.resolve(),
        jobs=jobs,
        groups=groups,
        aliases=aliases,
        main_table=render_main_table(stats, groups, commands),
        pivot_table=None if budgets is None else render_budget_pivot(budgets),
        plots=plots,
        replicated=REPLICATE_KEY in swept,
        shared=shared_settings(jobs),
    )
    write_text(out_dir / "report.md", render_report(parts))
    names = ["results.csv", "report.md", *plots]
    return {
        "n_jobs": len(jobs),
        "n_failed": sum(not j.ok for j in jobs),
        "group_keys": list(groups.keys),
        "replicate_key": REPLICATE_KEY if REPLICATE_KEY in swept else None,
        "paths": {name: out_dir / name for name in names},
    }


def run_report(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """The ``stage=report`` recipe: rank 0 writes the report of ``report.sweep_dir`` into the
    run_dir; every rank gets its result (or its UserError)."""
    result = run.on_rank_zero(lambda: write_report(Path(cfg.report.sweep_dir), run.path))
    paths = {name: str(path) for name, path in result.pop("paths", {}).items()}
    return {"stage": "report", **result, "paths": paths}
