"""Per-job metrics (results.csv) and groups of jobs with their statistics, in pandas.

A group is the jobs sharing the values of the group keys (the shown swept keys except seed);
its statistics are the mean, sample std and count over its finished jobs (seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.report.keys import (
    ABSENT,
    BUDGET_KEY,
    REPLICATE_KEY,
    STAGE_KEY,
    group_label,
    sorted_codes,
)
from pipeline.report.load import Job

METRIC_COLUMNS = (
    "stage",
    "dataset",
    "num_labelled",
    "num_unlabelled",
    "teacher_test_accuracy",
    "final_test_accuracy",
    "final_balanced_accuracy",
    "final_val_accuracy",
    "selected_by",
    "rounds",
    "final_num_pseudo",
    "final_pseudo_accuracy",
    "final_merged_foreign_fraction",
    "final_ood_auroc",
    "models",
    "wall_time_s",
)
ROUND_ARROW = " → "  # between the architectures of successive rounds
INT_COLUMNS = ("num_labelled", "num_unlabelled", "rounds", "final_num_pseudo")
FLOAT_COLUMNS = (
    "teacher_test_accuracy",
    "final_test_accuracy",
    "final_balanced_accuracy",
    "final_val_accuracy",
    "final_pseudo_accuracy",
    "final_merged_foreign_fraction",
    "final_ood_auroc",
)


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def job_metrics(job: Job) -> dict[str, Any]:
    """The per-job metric columns of results.csv."""
    summary = job.summary or {}
    rounds = job.rounds
    first = rounds.get(0, {})
    last_round = max(rounds) if rounds else None
    last = rounds.get(last_round, {}) if last_round is not None else {}
    final = summary.get("final_test_accuracy")
    if final is None and job.ok:
        final = last.get("test_accuracy")
    names = [rounds[k].get("model") for k in sorted(rounds)]
    models = (
        ROUND_ARROW.join(str(n) for n in names)
        if names and all(names)
        else _first(summary.get("model"), job.config.get("model.name"))
    )
    return {
        "stage": _first(job.config.get(STAGE_KEY), summary.get("stage")),
        "dataset": _first(summary.get("dataset"), job.config.get("data.name")),
        "num_labelled": _first(summary.get("num_labelled"), first.get("num_labelled")),
        "num_unlabelled": _first(summary.get("num_unlabelled"), first.get("num_unlabelled")),
        "teacher_test_accuracy": first.get("test_accuracy"),
        "final_test_accuracy": final,
        # Mean per-class recall on the test set (imbalanced pools); open-set pools: the share
        # of foreign images among the last merge's pseudo-labels and the OOD score's AUROC.
        "final_balanced_accuracy": last.get("balanced_accuracy"),
        "final_val_accuracy": _first(summary.get("val_accuracy"), last.get("val_accuracy")),
        # Which split chose each round's weights: "val" (train.select=best_val) or "last".
        "selected_by": _first(summary.get("selected_by"), last.get("selected_by")),
        "rounds": last_round,
        "final_num_pseudo": last.get("num_pseudo"),
        "final_pseudo_accuracy": last.get("pseudo_accuracy"),
        "final_merged_foreign_fraction": last.get("merged_foreign_fraction"),
        "final_ood_auroc": last.get("ood_auroc"),
        "models": models,
        "wall_time_s": summary.get("wall_time_s"),
    }


def _is_int_column(values: Sequence[Any]) -> bool:
    """True when every non-null value is an int (not a bool) and some value is present."""
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, int) and not isinstance(v, bool) for v in present)


def build_results(jobs: Sequence[Job], swept: Sequence[str]) -> pd.DataFrame:
    """Tidy table: one row per job with its swept key values and metrics."""
    columns = list(swept)
    if REPLICATE_KEY not in columns and any(REPLICATE_KEY in j.config for j in jobs):
        columns.append(REPLICATE_KEY)
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.rel, "status": "ok" if job.ok else "failed"}
        for key in columns:
            value = job.config.get(key, ABSENT)
            row[key] = None if value is ABSENT else value
        for key, value in job_metrics(job).items():
            row.setdefault(key, value)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["job", "status", *columns, *METRIC_COLUMNS[1:]])
    if STAGE_KEY not in columns:
        frame.insert(2 + len(columns), STAGE_KEY, [r[STAGE_KEY] for r in rows])
    for column in columns:
        if _is_int_column([row[column] for row in rows]):
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    for column in INT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    for column in (*FLOAT_COLUMNS, "wall_time_s"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


@dataclass
class Groups:
    """Jobs split into groups (swept values except seed), sorted by those values."""

    keys: list[str]
    values: list[dict[str, Any]]
    job_group: list[int]

    @property
    def labels(self) -> list[str]:
        """One short label per group."""
        return [group_label(v) for v in self.values]

    def members(self, gid: int) -> list[int]:
        """Indices of the jobs in group gid."""
        return [i for i, g in enumerate(self.job_group) if g == gid]


def assign_groups(jobs: Sequence[Job], keys: Sequence[str]) -> Groups:
    """Group jobs by their values of keys; groups ordered by those values."""
    keys = list(keys)
    if not keys:
        return Groups([], [{}], [0] * len(jobs))
    # Each value as its rank among the key's sorted values: groupby then orders the groups.
    codes = pd.DataFrame(
        {k: sorted_codes([job.config.get(k, ABSENT) for job in jobs]) for k in keys}
    )
    job_group = codes.groupby(keys, sort=True).ngroup()
    first_job = job_group.drop_duplicates().sort_values()
    values = [{k: jobs[i].config.get(k, ABSENT) for k in keys} for i in first_job.index]
    return Groups(keys, values, job_group.tolist())


def group_stats(results: pd.DataFrame, groups: Groups) -> pd.DataFrame:
    """Teacher and final accuracy mean/std/count over the finished jobs of each group."""
    frame = results.assign(group_id=groups.job_group)
    ok = frame[frame["status"] == "ok"]
    stats = ok.groupby("group_id").agg(
        teacher_mean=("teacher_test_accuracy", "mean"),
        teacher_std=("teacher_test_accuracy", "std"),
        teacher_n=("teacher_test_accuracy", "count"),
        final_mean=("final_test_accuracy", "mean"),
        final_std=("final_test_accuracy", "std"),
        n=("final_test_accuracy", "count"),
        val_mean=("final_val_accuracy", "mean"),
        val_std=("final_val_accuracy", "std"),
        val_n=("final_val_accuracy", "count"),
        models=("models", lambda s: "; ".join(dict.fromkeys(str(x) for x in s.dropna()))),
    )
    stats = stats.reindex(range(len(groups.values)))
    counts = ["teacher_n", "n", "val_n"]
    stats[counts] = stats[counts].fillna(0).astype(int)
    stats["label"] = groups.labels
    return stats


def budget_frame(stats: pd.DataFrame, groups: Groups) -> pd.DataFrame:
    """Stats with a method label (group values except the budget), the budget value and its
    rank among the budgets (``budget_rank``, for sorting)."""
    method_keys = [k for k in groups.keys if k != BUDGET_KEY]
    methods = [group_label({k: v[k] for k in method_keys}) for v in groups.values]
    budgets = [v[BUDGET_KEY] for v in groups.values]
    return stats.assign(method=methods, budget=budgets, budget_rank=sorted_codes(budgets))


def round_frame(jobs: Sequence[Job], groups: Groups) -> pd.DataFrame:
    """Long table of per-round metrics of finished jobs: group_id, round, metrics."""
    columns = ["test_accuracy", "num_pseudo", "pseudo_accuracy"]
    rows = [
        {"group_id": groups.job_group[i], "round": k, **{c: metrics.get(c) for c in columns}}
        for i, job in enumerate(jobs)
        if job.ok
        for k, metrics in job.rounds.items()
    ]
    frame = pd.DataFrame(rows, columns=["group_id", "round", *columns])
    for column in columns:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame
