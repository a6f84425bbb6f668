"""report.md: the main table, the label-budget pivot and the whole report (markdown tables are
written by ``DataFrame.to_markdown``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.report.group import ROUND_ARROW, Groups
from pipeline.report.keys import (
    BUDGET_KEY,
    DASH,
    REPLICATE_KEY,
    display_value,
    group_label,
)
from pipeline.report.load import Job

PLOT_TITLES = {
    "accuracy_per_round.png": "Test accuracy per round",
    "teacher_vs_student.png": "Teacher vs final student",
    "pseudo_labels_per_round.png": "Pseudo-labels per round",
    "class_coverage_last_round.png": "Per-class pseudo-label coverage (last round)",
    "accuracy_vs_label_budget.png": "Final accuracy vs label budget",
}


def format_pct(mean: float, std: float, count: int) -> str:
    """``93.41 ± 0.52`` from fractions; std is '–' with fewer than two values."""
    if count < 1 or mean is None or pd.isna(mean):
        return DASH
    std_text = f"{100 * std:.2f}" if count >= 2 and not pd.isna(std) else DASH
    return f"{100 * mean:.2f} ± {std_text}"


def to_markdown(frame: pd.DataFrame, right: Sequence[str]) -> str:
    """A GitHub markdown table of a frame of texts; the columns named in right are right-aligned.

    Cells are taken as they are (no number parsing); ``|`` and newlines in them are escaped.
    """
    escaped = frame.map(lambda c: str(c).replace("|", "\\|").replace("\n", " "))
    escaped.columns = [str(c).replace("|", "\\|") for c in frame.columns]
    align = ["right" if c in right else "left" for c in frame.columns]
    return escaped.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True)


def render_main_table(stats: pd.DataFrame, groups: Groups, commands: Sequence[str]) -> str:
    """One row per group: swept values, teacher/final accuracy, n, reproduce command."""
    table = pd.DataFrame(
        {k: [display_value(v[k]) for v in groups.values] for k in groups.keys}, index=stats.index
    )
    if differing_networks(stats):  # students of another architecture than their teacher
        table["networks per round"] = stats["models"].fillna(DASH).replace("", DASH)
    table["teacher acc (%)"] = [
        format_pct(s.teacher_mean, s.teacher_std, s.teacher_n) for s in stats.itertuples()
    ]
    table["final acc (%)"] = [
        format_pct(s.final_mean, s.final_std, s.n) for s in stats.itertuples()
    ]
    right = ["teacher acc (%)", "final acc (%)", "n"]
    if stats["val_n"].sum() > 0:  # jobs with a val split: its final accuracy beside the test's
        table["final val acc (%)"] = [
            format_pct(s.val_mean, s.val_std, s.val_n) for s in stats.itertuples()
        ]
        right.append("final val acc (%)")
    table["n"] = stats["n"].astype(str)
    table["command"] = [f"`{c}`" for c in commands]
    return to_markdown(table, right=right)


def render_selection(jobs: Sequence[Job]) -> str | None:
    """Which split chose the kept weights and what a sweeper tuned on, from the jobs' configs
    and summaries; None for a sweep older than val splits."""
    done = [j for j in jobs if j.ok and j.summary]
    chosen = {str(j.summary.get("selected_by")) for j in done if j.summary.get("selected_by")}
    if not chosen:
        return None
    parts = []
    if chosen == {"last"}:
        parts.append(
            "each round kept its last epoch (`train.select=last`); test accuracy chose nothing"
        )
    elif chosen == {"val"}:
        parts.append(
            "each round kept the epoch with the best val accuracy (`train.select=best_val`); "
            "test accuracy chose nothing"
        )
    else:
        parts.append(
            "by group: the last epoch or the best val epoch (`train.select`); test accuracy chose nothing"
        )
    sources = {str(j.summary.get("val_source")) for j in done if j.summary.get("val_source")}
    if sources:
        parts.append(f"val split from {', '.join(f'`data.{s}`' for s in sorted(sources))}")
    objectives = {j.config.get("objective") for j in done} - {None}
    if "test_accuracy" in objectives:
        parts.append(
            "**jobs returned test accuracy as their objective (`objective=test_accuracy`): if a "
            "sweeper tuned on it, the test accuracies here are optimistic**"
        )
    return "; ".join(parts)


def differing_networks(stats: pd.DataFrame) -> bool:
    """Whether some group's rounds trained more than one architecture."""
    if "models" not in stats:
        return False
    return any(
        len(set(str(m).replace(";", ROUND_ARROW).split(ROUND_ARROW))) > 1
        for m in stats["models"].dropna()
    )


def render_budget_pivot(frame: pd.DataFrame) -> str:
    """Methods × label budgets of final accuracy ``mean ± std (n)``; best per column bold."""
    done = frame[frame["n"] > 0]
    text = [f"{format_pct(s.final_mean, s.final_std, s.n)} ({s.n})" for s in done.itertuples()]
    cell = pd.Series(text, index=done.index, dtype=object)
    best = done.groupby("budget_rank")["final_mean"].transform("max")
    cell = cell.mask(done["final_mean"] >= best, "**" + cell + "**")
    methods = list(dict.fromkeys(frame["method"]))
    budgets = frame.drop_duplicates("budget_rank").sort_values("budget_rank")
    pivot = (
        done.assign(cell=cell)
        .pivot_table(index="method", columns="budget_rank", values="cell", aggfunc="first")
        .reindex(index=methods, columns=budgets["budget_rank"])
        .fillna(DASH)
    )
    pivot.columns = [f"{BUDGET_KEY}={display_value(b)}" for b in budgets["budget"]]
    table = pivot.rename_axis("method").reset_index()
    return to_markdown(table, right=list(pivot.columns))


def render_failed(jobs: Sequence[Job], groups: Groups) -> str:
    """Bullet list of failed or unfinished jobs (or 'none')."""
    lines = []
    for i, job in enumerate(jobs):
        if job.ok:
            continue
        context = dict(groups.values[groups.job_group[i]])
        if REPLICATE_KEY in job.config:
            context[REPLICATE_KEY] = job.config[REPLICATE_KEY]
        where = f" ({group_label(context)})" if context else ""
        last = f"; last round written: {max(job.rounds)}" if job.rounds else ""
        lines.append(f"- `{job.rel}`{where}: {job.failure}{last}")
    return "\n".join(lines) if lines else "none"


def shown_path(path: Path | str) -> str:
    """The path relative to the working directory when it lies under it (as the user typed it)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass
class ReportParts:
    """What report.md is made of."""

    sweep_dir: Path
    jobs: Sequence[Job]
    groups: Groups
    aliases: dict[str, str]
    main_table: str
    pivot_table: str | None
    plots: Sequence[str]
    replicated: bool
    shared: str | None  # the overrides all jobs share; None when the jobs did not record them


def render_header(parts: ReportParts) -> list[str]:
    """The bullet list at the top: sweep dir, jobs, swept keys, shared settings, dataset."""
    n_jobs, n_failed = len(parts.jobs), sum(not j.ok for j in parts.jobs)
    datasets = sorted(
        {str(j.summary["dataset"]) for j in parts.jobs if j.summary and j.summary.get("dataset")}
    )
    swept = ", ".join(f"`{k}`" for k in parts.groups.keys) or "none"
    replicates = (
        f"replicates over `{REPLICATE_KEY}` (mean ± sample std over seeds)"
        if parts.replicated
        else f"one `{REPLICATE_KEY}` per group (no replicates, std shown as {DASH})"
    )
    lines = [
        f"- Sweep dir: `{shown_path(parts.sweep_dir)}`",
        f"- Jobs: {n_jobs} ({n_jobs - n_failed} finished, {n_failed} failed or unfinished)",
        f"- Swept keys: {swept}; {replicates}",
    ]
    if parts.shared is not None:
        lines.append(
            f"- Shared settings: `{parts.shared}`" if parts.shared else "- Shared settings: none"
        )
    if datasets:
        lines.append(f"- Dataset: {', '.join(datasets)}")
    selection = render_selection(parts.jobs)
    if selection:
        lines.append(f"- Model selection: {selection}")
    shown = {a: p for a, p in parts.aliases.items() if p != REPLICATE_KEY}
    if shown:
        tied = ", ".join(f"`{a}` (with `{p}`)" for a, p in shown.items())
        lines.append(f"- Also varying, in step with a shown key: {tied}")
    return lines


def render_report(parts: ReportParts) -> str:
    """The full report.md text."""
    lines = ["# Self-training sweep report", "", *render_header(parts)]
    lines += [
        "",
        "Accuracies are test accuracy in % (val accuracy where its column says so); n = finished "
        "jobs (seeds) in the group.",
        "",
    ]
    lines += ["## Results per group", "", parts.main_table, ""]
    if parts.pivot_table is not None:
        lines += [
            "## Final accuracy by label budget",
            "",
            "Cells: final test accuracy mean ± std (n); best per column in bold.",
            "",
        ]
        lines += [parts.pivot_table, ""]
    lines += ["## Failed or unfinished jobs", "", render_failed(parts.jobs, parts.groups), ""]
    lines += ["## Plots", ""]
    for name in parts.plots:
        lines += [f"![{PLOT_TITLES[name]}]({name})", ""]
    if not parts.plots:
        lines += ["none", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
