"""The report's five PNG plots (matplotlib, Agg backend), each saved atomically."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.report.group import Groups, round_frame
from pipeline.report.keys import display_value, hashable, unique, value_sort_key
from pipeline.report.load import Job
from pipeline.runtime.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_DPI = 120


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(gid: int, n_groups: int) -> Any:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n_groups <= 10 else "tab20")
    return cmap(gid % cmap.N)


def _mean_std_by_round(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    data = frame.dropna(subset=[column])
    agg = data.groupby(["group_id", "round"])[column].agg(["mean", "std"]).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    return agg


def _legend_right(ax: Any) -> None:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)


def plot_accuracy_per_round(rounds: pd.DataFrame, labels: Sequence[str]) -> Figure | None:
    """Test accuracy vs round, one line per group (mean ± std band over seeds)."""
    agg = _mean_std_by_round(rounds, "test_accuracy")
    if agg.empty:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    multi_round = agg["round"].max() > 0
    for gid, g in agg.groupby("group_id"):
        color = _color(int(gid), len(labels))
        mean, std = 100 * g["mean"].to_numpy(), 100 * g["std"].to_numpy()
        if len(g) == 1 and multi_round:
            ax.axhline(mean[0], ls="--", color=color, label=f"{labels[gid]} (round 0 only)")
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=color, alpha=0.1)
            continue
        ax.plot(g["round"], mean, marker="o", color=color, label=labels[gid])
        ax.fill_between(g["round"], mean - std, mean + std, color=color, alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="Test accuracy per round (mean ± std over seeds)")
    ax.set(xlabel="self-training round (0 = teacher)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return fig


def plot_teacher_vs_student(stats: pd.DataFrame) -> Figure | None:
    """Grouped bars of teacher (round 0) and final accuracy per group, with std error bars."""
    if stats[["teacher_mean", "final_mean"]].isna().all().all():
        return None
    plt = _pyplot()
    x = np.arange(len(stats))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(stats) + 2), 4.8))
    series = [("teacher", "teacher (round 0)", -0.2), ("final", "final student", 0.2)]
    for prefix, name, offset in series:
        mean = 100 * stats[f"{prefix}_mean"].to_numpy(dtype=float)
        std = 100 * stats[f"{prefix}_std"].fillna(0.0).to_numpy(dtype=float)
        bars = ax.bar(x + offset, mean, width=0.4, yerr=std, capsize=3, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, stats["label"], rotation=30, ha="right")
    ax.set(title="Teacher vs final student (mean ± std over seeds)")
    ax.set(xlabel="group", ylabel="test accuracy (%)", ylim=(0, 112))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2, fontsize="small")
    return fig


def plot_pseudo_labels_per_round(rounds: pd.DataFrame, labels: Sequence[str]) -> Figure | None:
    """Two panels: pseudo-labels kept and their accuracy per round (rounds ≥ 1)."""
    later = rounds[rounds["round"] >= 1]
    counts = _mean_std_by_round(later, "num_pseudo")
    accuracy = _mean_std_by_round(later, "pseudo_accuracy")
    if counts.empty and accuracy.empty:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [
        (left, counts, 1.0, "pseudo-labels kept (count)"),
        (right, accuracy, 100.0, "pseudo-label accuracy (%)"),
    ]
    for ax, agg, scale, ylabel in panels:
        for gid, g in agg.groupby("group_id"):
            color = _color(int(gid), len(labels))
            mean, std = scale * g["mean"].to_numpy(), scale * g["std"].to_numpy()
            ax.plot(g["round"], mean, marker="o", color=color, label=labels[gid])
            ax.fill_between(g["round"], mean - std, mean + std, color=color, alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="self-training round", ylabel=ylabel)
        ax.grid(alpha=0.3)
    left.set_title("Pseudo-labels kept per round")
    right.set_title("Accuracy of kept pseudo-labels")
    handles, names = (left if not counts.empty else right).get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(4, len(names)),
        fontsize="small",
        frameon=False,
    )
    fig.suptitle("Pseudo-labels per round (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def coverage_frame(jobs: Sequence[Job], groups: Groups) -> dict[int, np.ndarray]:
    """Per group: the last round's per-class coverage of each finished job (seeds × classes)."""
    by_group: dict[int, list[list[float]]] = {}
    for i, job in enumerate(jobs):
        if not job.ok or not job.rounds:
            continue
        coverage = job.rounds[max(job.rounds)].get("per_class_coverage")
        if isinstance(coverage, list) and coverage:
            values = [math.nan if v is None else float(v) for v in coverage]
            by_group.setdefault(groups.job_group[i], []).append(values)
    result = {}
    for gid, vectors in sorted(by_group.items()):
        width = max(len(v) for v in vectors)
        result[gid] = np.array([v + [math.nan] * (width - len(v)) for v in vectors])
    return result


def plot_class_coverage(coverage: dict[int, np.ndarray], labels: Sequence[str]) -> Figure | None:
    """Per-class pseudo-label coverage of the last round, one bar series per group."""
    if not coverage:
        return None
    plt = _pyplot()
    n_classes = max(a.shape[1] for a in coverage.values())
    width = 0.8 / len(coverage)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * n_classes * max(1, len(coverage) / 2) + 3), 4.5))
    for j, (gid, array) in enumerate(coverage.items()):
        mean = 100 * np.nanmean(array, axis=0)
        std = 100 * (
            np.nanstd(array, axis=0, ddof=1) if len(array) > 1 else np.zeros(array.shape[1])
        )
        x = np.arange(array.shape[1]) + (j - (len(coverage) - 1) / 2) * width
        ax.bar(
            x,
            mean,
            width=width,
            yerr=std,
            capsize=2,
            color=_color(gid, len(labels)),
            label=labels[gid],
        )
    ax.set_xticks(np.arange(n_classes))
    ax.set(title="Per-class pseudo-label coverage in the last round (mean ± std over seeds)")
    ax.set(xlabel="class index", ylabel="coverage (% of the class pseudo-labelled)")
    ax.grid(axis="y", alpha=0.3)
    _legend_right(ax)
    return fig


def plot_accuracy_vs_budget(frame: pd.DataFrame) -> Figure | None:
    """Final accuracy vs labels per class, one line per method, std error bars."""
    data = frame[frame["n"] > 0]
    if data.empty:
        return None
    plt = _pyplot()
    numeric = all(value_sort_key(b)[0] == 0 for b in data["budget"])
    budgets = sorted(unique(list(data["budget"])), key=value_sort_key)
    position = {hashable(b): (float(b) if numeric else i) for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = unique(list(data["method"]))
    for i, method in enumerate(methods):
        rows = data[data["method"] == method].copy()
        rows["x"] = [position[hashable(b)] for b in rows["budget"]]
        rows = rows.sort_values("x")
        ax.errorbar(
            rows["x"],
            100 * rows["final_mean"],
            yerr=100 * rows["final_std"].fillna(0.0),
            marker="o",
            capsize=3,
            color=_color(i, len(methods)),
            label=method,
        )
    ticks = [position[hashable(b)] for b in budgets]
    if numeric and min(ticks) > 0 and max(ticks) / min(ticks) >= 8:
        ax.set_xscale("log")
    ax.set_xticks(ticks, [display_value(b) for b in budgets])
    ax.minorticks_off()
    ax.set(title="Final test accuracy vs label budget (mean ± std over seeds)")
    ax.set(xlabel="labelled examples per class", ylabel="final test accuracy (%)")
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """Save a figure as PNG atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


def write_plots(
    out_dir: Path,
    jobs: Sequence[Job],
    groups: Groups,
    stats: pd.DataFrame,
    budgets: pd.DataFrame | None,
) -> list[str]:
    """Write every plot whose data exist; remove stale ones from earlier reports."""
    rounds = round_frame(jobs, groups)
    labels = groups.labels
    figures: dict[str, Callable[[], Figure | None]] = {
        "accuracy_per_round.png": lambda: plot_accuracy_per_round(rounds, labels),
        "teacher_vs_student.png": lambda: plot_teacher_vs_student(stats),
        "pseudo_labels_per_round.png": lambda: plot_pseudo_labels_per_round(rounds, labels),
        "class_coverage_last_round.png": lambda: plot_class_coverage(
            coverage_frame(jobs, groups), labels
        ),
        "accuracy_vs_label_budget.png": lambda: (
            None if budgets is None else plot_accuracy_vs_budget(budgets)
        ),
    }
    written = []
    for name, make in figures.items():
        fig = make()
        if fig is None:
            (out_dir / name).unlink(missing_ok=True)
            continue
        save_figure(fig, out_dir / name)
        written.append(name)
    return written
