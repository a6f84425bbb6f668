"""Summarise a sweep (or a single run) into ``results.csv``, ``report.md`` and PNG plots.

A job dir is any directory holding ``config.yaml``; it finished when it also holds
``summary.json``. Swept keys are the config keys whose values differ across jobs; ``seed``
is the replicate key, so groups are formed by the other swept keys and metrics are
averaged over seeds.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from pipeline.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPLICATE_KEY = "seed"
STAGE_KEY = "stage"
BUDGET_KEY = "data.labels_per_class"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
SKIP_DIR_NAMES = frozenset({"report"})
RUNTIME_KEYS = frozenset(
    {
        "run_dir",
        "trainer.devices",
        "trainer.accelerator",
        "trainer.strategy",
        "trainer.num_nodes",
        "data.num_workers",
        "ckpt",
        "out",
    }
)
METRIC_COLUMNS = (
    "stage",
    "dataset",
    "num_labelled",
    "num_unlabelled",
    "teacher_test_accuracy",
    "final_test_accuracy",
    "rounds",
    "final_num_pseudo",
    "final_pseudo_accuracy",
    "wall_time_s",
)
INT_COLUMNS = ("num_labelled", "num_unlabelled", "rounds", "final_num_pseudo")
DASH = "–"
PLOT_DPI = 120


class _Absent:
    """Marks a config key that a job's config does not have."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


class OverrideText(str):
    """A value already written in override syntax (a list or mapping from a config)."""


# ----------------------------------------------------------------------------- loading


@dataclass
class Job:
    """One job dir: its flattened config and whatever results it wrote."""

    path: Path
    rel: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        """True when the job finished (its summary.json was read)."""
        return self.failure is None


def _natural_key(text: str) -> list[Any]:
    """Sort key so that ``2`` comes before ``10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_job_dirs(sweep_dir: Path, skip: Path | None = None) -> list[Path]:
    """Directories holding config.yaml under sweep_dir (itself included), naturally sorted.

    Does not descend into a job dir, hidden dirs, dirs named ``report`` or ``skip``.
    """
    if (sweep_dir / CONFIG_FILE).is_file():
        return [sweep_dir]
    skip_resolved = skip.resolve() if skip is not None else None
    found: list[Path] = []
    for root, dirs, files in os.walk(sweep_dir):
        here = Path(root)
        if CONFIG_FILE in files and here != sweep_dir:
            found.append(here)
            dirs[:] = []
            continue
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in SKIP_DIR_NAMES
            and (skip_resolved is None or (here / d).resolve() != skip_resolved)
        ]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def _list_literal(items: Sequence[Any]) -> str:
    return "[" + ",".join(override_value(_freeze(x)) for x in items) + "]"


def _freeze(node: Any) -> Any:
    """Turn lists/mappings into hashable OverrideText strings in override syntax."""
    if isinstance(node, Mapping):
        inner = ",".join(f"{k}:{override_value(_freeze(v))}" for k, v in node.items())
        return OverrideText("{" + inner + "}")
    if isinstance(node, (list, tuple)):
        return OverrideText(_list_literal(node))
    return node


def flatten_config(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``{"a.b.c": value}``; lists become OverrideText strings."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, dotted))
        else:
            flat[dotted] = _freeze(value)
    return flat


def load_config(path: Path) -> dict[str, Any]:
    """Read a job's config.yaml as a plain flattened dict."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path}: {first_line}") from exc
    if not OmegaConf.is_dict(cfg):
        raise UserError(f"{path} is not a mapping of config keys; expected a job's full config")
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    return flatten_config(container)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from path, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides as recorded by Hydra, if present."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def load_round_metrics(job_dir: Path, summary: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """Per-round metrics merged from round_K/metrics.json and summary.json (summary wins)."""
    rounds: dict[int, dict[str, Any]] = {}
    for path in job_dir.glob("round_*/metrics.json"):
        match = re.fullmatch(r"round_(\d+)", path.parent.name)
        data = read_json(path)
        if match and data is not None:
            rounds[int(match.group(1))] = dict(data)
    summary_rounds = (summary or {}).get("rounds")
    if isinstance(summary_rounds, list):
        for entry in summary_rounds:
            if isinstance(entry, dict) and isinstance(entry.get("round"), int):
                known = {k: v for k, v in entry.items() if v is not None}
                rounds.setdefault(entry["round"], {}).update(known)
    return dict(sorted(rounds.items()))


def load_job(job_dir: Path, sweep_dir: Path) -> Job:
    """Read everything the report needs from one job dir."""
    rel = job_dir.relative_to(sweep_dir).as_posix()
    summary_path = job_dir / SUMMARY_FILE
    summary = read_json(summary_path)
    failure = None
    if summary is None:
        failure = "summary.json unreadable" if summary_path.exists() else "no summary.json"
    return Job(
        path=job_dir,
        rel=rel,
        config=load_config(job_dir / CONFIG_FILE),
        summary=summary,
        rounds=load_round_metrics(job_dir, summary),
        overrides=_read_overrides(job_dir),
        failure=failure,
    )


# ------------------------------------------------------------------------ swept keys


def is_runtime_key(key: str) -> bool:
    """Keys that always differ per job (paths, devices) and so are never 'swept'."""
    return (
        key in RUNTIME_KEYS
        or key == "hydra"
        or key.startswith("hydra.")
        or key.endswith("_dir")
        or key.endswith(".root")
    )


def _hashable(value: Any) -> Any:
    """Identity of a config value for comparisons (type-strict, NaN-safe)."""
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def _partition(values: Sequence[Any]) -> tuple[int, ...]:
    """Which jobs share a value: the index of each job's value in order of appearance."""
    first: dict[Any, int] = {}
    return tuple(first.setdefault(_hashable(v), len(first)) for v in values)


def find_swept_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Non-runtime keys whose values differ across configs, in order of first appearance."""
    keys: dict[str, None] = {}
    for cfg in configs:
        keys.update(dict.fromkeys(cfg))
    return [
        key
        for key in keys
        if not is_runtime_key(key)
        and len(set(_partition([cfg.get(key, ABSENT) for cfg in configs]))) > 1
    ]


def _key_priority(key: str, order: int) -> tuple[int, int, int]:
    """Which key of a set of keys that vary together is shown (lowest wins)."""
    rank = {REPLICATE_KEY: 0, STAGE_KEY: 1, BUDGET_KEY: 2}.get(key)
    if rank is None:
        rank = 3 if key.endswith(".name") else 4
    return (rank, key.count("."), order)


def split_aliases(
    swept: Sequence[str], configs: Sequence[Mapping[str, Any]]
) -> tuple[list[str], dict[str, str]]:
    """Split swept keys into shown keys and aliases (keys that vary exactly like another).

    Returns (primary keys in input order, {alias: primary}). A key that varies exactly like
    ``seed`` (e.g. a split seed set from it) is an alias of seed.
    """
    classes: dict[tuple[int, ...], list[str]] = {}
    for key in swept:
        classes.setdefault(_partition([cfg.get(key, ABSENT) for cfg in configs]), []).append(key)
    order = {key: i for i, key in enumerate(swept)}
    aliases: dict[str, str] = {}
    primaries: set[str] = set()
    for members in classes.values():
        primary = min(members, key=lambda k: _key_priority(k, order[k]))
        primaries.add(primary)
        aliases.update({k: primary for k in members if k != primary})
    return [k for k in swept if k in primaries], aliases


def order_group_keys(primary: Sequence[str]) -> list[str]:
    """Group keys: shown swept keys except seed, with stage first."""
    keys = [k for k in primary if k != REPLICATE_KEY]
    return sorted(keys, key=lambda k: (k != STAGE_KEY, keys.index(k)))


# ---------------------------------------------------------------------- value format


def override_value(value: Any) -> str:
    """A config value written as a command-line override value."""
    if isinstance(value, OverrideText):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        if re.fullmatch(r"[\w./:@+\-]+", value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def display_value(value: Any) -> str:
    """A config value as shown in tables and labels."""
    if value is ABSENT:
        return DASH
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return str(value)
    return override_value(value)


def value_sort_key(value: Any) -> tuple[int, float, str]:
    """Sort numbers numerically, then strings, then null, then absent."""
    if value is ABSENT:
        return (3, 0.0, "")
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (bool, int, float)) and not isinstance(value, str):
        number = float(value)
        return (0, math.inf if math.isnan(number) else number, "")
    return (1, 0.0, str(value))


def format_pct(mean: float, std: float, count: int) -> str:
    """``93.41 ± 0.52`` from fractions; std is '–' with fewer than two values."""
    if count < 1 or mean is None or pd.isna(mean):
        return DASH
    std_text = f"{100 * std:.2f}" if count >= 2 and not pd.isna(std) else DASH
    return f"{100 * mean:.2f} ± {std_text}"


def group_label(values: Mapping[str, Any]) -> str:
    """Short human label of a group, e.g. ``selftrain, labels_per_class=4``."""
    if not values:
        return "all jobs"
    shorts = [k.rsplit(".", 1)[-1] for k in values]
    parts = []
    for key, short in zip(values, shorts, strict=True):
        name = short if shorts.count(short) == 1 else key
        text = display_value(values[key])
        parts.append(text if key == STAGE_KEY else f"{name}={text}")
    return ", ".join(parts)


# ---------------------------------------------------------------------- job metrics


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
    return {
        "stage": _first(job.config.get(STAGE_KEY), summary.get("stage")),
        "dataset": _first(summary.get("dataset"), job.config.get("data.name")),
        "num_labelled": _first(summary.get("num_labelled"), first.get("num_labelled")),
        "num_unlabelled": _first(summary.get("num_unlabelled"), first.get("num_unlabelled")),
        "teacher_test_accuracy": first.get("test_accuracy"),
        "final_test_accuracy": final,
        "rounds": last_round,
        "final_num_pseudo": last.get("num_pseudo"),
        "final_pseudo_accuracy": last.get("pseudo_accuracy"),
        "wall_time_s": summary.get("wall_time_s"),
    }


def _csv_value(value: Any) -> Any:
    return None if value is ABSENT else value


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
        row.update({k: _csv_value(job.config.get(k, ABSENT)) for k in columns})
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
    for column in ("teacher_test_accuracy", "final_test_accuracy", "final_pseudo_accuracy"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["wall_time_s"] = pd.to_numeric(frame["wall_time_s"], errors="coerce")
    return frame


# --------------------------------------------------------------------------- groups


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
    tuples = [tuple(job.config.get(k, ABSENT) for k in keys) for job in jobs]
    unique: dict[Any, tuple[Any, ...]] = {}
    for values in tuples:
        unique.setdefault(tuple(_hashable(v) for v in values), values)
    ordered = sorted(unique.values(), key=lambda vs: [value_sort_key(v) for v in vs])
    index = {tuple(_hashable(v) for v in vs): i for i, vs in enumerate(ordered)}
    job_group = [index[tuple(_hashable(v) for v in vs)] for vs in tuples]
    return Groups(list(keys), [dict(zip(keys, vs, strict=True)) for vs in ordered], job_group)


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
    )
    stats = stats.reindex(range(len(groups.values)))
    stats[["teacher_n", "n"]] = stats[["teacher_n", "n"]].fillna(0).astype(int)
    stats["label"] = groups.labels
    return stats


def reproduce_command(
    command: str,
    jobs: Sequence[Job],
    keys: Sequence[str],
) -> str:
    """``{command} -m stage=X key=value ... seed=0,1,2`` for a group of jobs.

    keys: the swept keys to set (besides stage and seed); overrides that Hydra recorded and
    that are the same for every job of the group are added too, so the command is exact.
    """
    first = jobs[0].config
    tokens: list[str] = []
    if STAGE_KEY in first:
        tokens.append(f"{STAGE_KEY}={override_value(first[STAGE_KEY])}")
    for key in keys:
        if key not in (STAGE_KEY, REPLICATE_KEY) and first.get(key, ABSENT) is not ABSENT:
            tokens.append(f"{key}={override_value(first[key])}")
    set_keys = {STAGE_KEY, REPLICATE_KEY, *keys}
    for token in jobs[0].overrides:
        key = token.split("=", 1)[0].lstrip("+~")
        if key in set_keys or is_runtime_key(key) or token in tokens:
            continue
        if all(token in job.overrides for job in jobs):
            tokens.append(token)
    seeds = {
        _hashable(j.config[REPLICATE_KEY]): j.config[REPLICATE_KEY]
        for j in jobs
        if REPLICATE_KEY in j.config
    }
    if seeds:
        ordered = sorted(seeds.values(), key=value_sort_key)
        tokens.append(f"{REPLICATE_KEY}=" + ",".join(override_value(s) for s in ordered))
    return " ".join([command, "-m", *(shlex.quote(t) for t in tokens)])


# ------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A GitHub-style markdown table; columns listed in right are right-aligned."""
    rule = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_main_table(stats: pd.DataFrame, groups: Groups, commands: Sequence[str]) -> str:
    """One row per group: swept values, teacher/final accuracy, n, reproduce command."""
    headers = [*groups.keys, "teacher acc (%)", "final acc (%)", "n", "command"]
    rows = []
    for gid, values in enumerate(groups.values):
        s = stats.loc[gid]
        rows.append(
            [
                *(display_value(values[k]) for k in groups.keys),
                format_pct(s["teacher_mean"], s["teacher_std"], int(s["teacher_n"])),
                format_pct(s["final_mean"], s["final_std"], int(s["n"])),
                str(int(s["n"])),
                f"`{commands[gid]}`",
            ]
        )
    k = len(groups.keys)
    return markdown_table(headers, rows, right={k, k + 1, k + 2})


def budget_frame(stats: pd.DataFrame, groups: Groups) -> pd.DataFrame:
    """Stats with a method label (group values except the budget) and the budget value."""
    method_keys = [k for k in groups.keys if k != BUDGET_KEY]
    methods = [group_label({k: v[k] for k in method_keys}) for v in groups.values]
    budgets = [v[BUDGET_KEY] for v in groups.values]
    return stats.assign(method=methods, budget=budgets)


def _unique(values: Sequence[Any]) -> list[Any]:
    seen: dict[Any, Any] = {}
    for v in values:
        seen.setdefault(_hashable(v), v)
    return list(seen.values())


def render_budget_pivot(frame: pd.DataFrame) -> str:
    """Methods × label budgets of final accuracy ``mean ± std (n)``; best per column bold."""
    methods = _unique(list(frame["method"]))
    budgets = sorted(_unique(list(frame["budget"])), key=value_sort_key)
    cells: dict[tuple[Any, Any], pd.Series] = {
        (row["method"], _hashable(row["budget"])): row for _, row in frame.iterrows()
    }
    best: dict[Any, float] = {}
    for budget in budgets:
        means = [
            cells[(m, _hashable(budget))]["final_mean"]
            for m in methods
            if (m, _hashable(budget)) in cells
        ]
        means = [m for m in means if not pd.isna(m)]
        if means:
            best[_hashable(budget)] = max(means)
    rows = []
    for method in methods:
        row = [method]
        for budget in budgets:
            s = cells.get((method, _hashable(budget)))
            if s is None or int(s["n"]) == 0:
                row.append(DASH)
                continue
            text = f"{format_pct(s['final_mean'], s['final_std'], int(s['n']))} ({int(s['n'])})"
            top = best.get(_hashable(budget))
            row.append(f"**{text}**" if top is not None and s["final_mean"] >= top else text)
        rows.append(row)
    headers = ["method", *(f"{BUDGET_KEY}={display_value(b)}" for b in budgets)]
    return markdown_table(headers, rows, right=set(range(1, len(headers))))


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


PLOT_TITLES = {
    "accuracy_per_round.png": "Test accuracy per round",
    "teacher_vs_student.png": "Teacher vs final student",
    "pseudo_labels_per_round.png": "Pseudo-labels per round",
    "class_coverage_last_round.png": "Per-class pseudo-label coverage (last round)",
    "accuracy_vs_label_budget.png": "Final accuracy vs label budget",
}


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


def render_report(parts: ReportParts) -> str:
    """The full report.md text."""
    n_jobs, n_failed = len(parts.jobs), sum(not j.ok for j in parts.jobs)
    datasets = sorted(
        {
            str(j.summary.get("dataset"))
            for j in parts.jobs
            if j.summary and j.summary.get("dataset")
        }
    )
    swept = ", ".join(f"`{k}`" for k in parts.groups.keys) or "none"
    replicates = (
        f"replicates over `{REPLICATE_KEY}` (mean ± sample std over seeds)"
        if parts.replicated
        else f"one `{REPLICATE_KEY}` per group (no replicates, std shown as {DASH})"
    )
    lines = [
        "# Self-training sweep report",
        "",
        f"- Sweep dir: `{_shown_path(parts.sweep_dir)}`",
        f"- Jobs: {n_jobs} ({n_jobs - n_failed} finished, {n_failed} failed or unfinished)",
        f"- Swept keys: {swept}; {replicates}",
    ]
    if datasets:
        lines.append(f"- Dataset: {', '.join(datasets)}")
    shown = {a: p for a, p in parts.aliases.items() if p != REPLICATE_KEY}
    if shown:
        tied = ", ".join(f"`{a}` (with `{p}`)" for a, p in shown.items())
        lines.append(f"- Also varying, in step with a shown key: {tied}")
    lines += ["", "Accuracies are test accuracy in %; n = finished jobs (seeds) in the group.", ""]
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


# ---------------------------------------------------------------------------- plots


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


def round_frame(jobs: Sequence[Job], groups: Groups) -> pd.DataFrame:
    """Long table of per-round metrics of finished jobs: group_id, round, metrics."""
    rows = []
    for i, job in enumerate(jobs):
        if not job.ok:
            continue
        for k, metrics in job.rounds.items():
            rows.append(
                {
                    "group_id": groups.job_group[i],
                    "round": k,
                    "test_accuracy": metrics.get("test_accuracy"),
                    "num_pseudo": metrics.get("num_pseudo"),
                    "pseudo_accuracy": metrics.get("pseudo_accuracy"),
                }
            )
    frame = pd.DataFrame(
        rows, columns=["group_id", "round", "test_accuracy", "num_pseudo", "pseudo_accuracy"]
    )
    for column in ("test_accuracy", "num_pseudo", "pseudo_accuracy"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


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
    budgets = sorted(_unique(list(data["budget"])), key=value_sort_key)
    position = {_hashable(b): (float(b) if numeric else i) for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = _unique(list(data["method"]))
    for i, method in enumerate(methods):
        rows = data[data["method"] == method].copy()
        rows["x"] = [position[_hashable(b)] for b in rows["budget"]]
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
    ticks = [position[_hashable(b)] for b in budgets]
    if numeric and min(ticks) > 0 and max(ticks) / min(ticks) >= 8:
        ax.set_xscale("log")
    ax.set_xticks(ticks, [display_value(b) for b in budgets])
    ax.minorticks_off()
    ax.set(title="Final test accuracy vs label budget (mean ± std over seeds)")
    ax.set(xlabel="labelled examples per class", ylabel="final test accuracy (%)")
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return fig


# ---------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write via a temp file in the same dir, then os.replace onto path."""
    # The ".tmp-" prefix is the one a re-run cleans up (artifacts.remove_stale_temporaries).
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode.replace("w", "x")) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to path atomically."""
    _atomic_write(path, lambda f: f.write(text), "w")


def save_figure(fig: Figure, path: Path) -> None:
    """Save a figure as PNG atomically and close it."""
    plt = _pyplot()
    try:
        _atomic_write(
            path, lambda f: fig.savefig(f, format="png", dpi=PLOT_DPI, bbox_inches="tight"), "wb"
        )
    finally:
        plt.close(fig)


def load_jobs(sweep_dir: Path, out_dir: Path) -> list[Job]:
    """All jobs under sweep_dir; UserError when there are none."""
    if not sweep_dir.exists():
        raise UserError(
            f"sweep dir {sweep_dir} does not exist; expected a multirun dir of job dirs "
            f"(each with {CONFIG_FILE}) or a single run dir"
        )
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory; expected a multirun dir or a run dir")
    skip = out_dir if out_dir.resolve() != sweep_dir.resolve() else None
    job_dirs = find_job_dirs(sweep_dir, skip=skip)
    if not job_dirs:
        raise UserError(
            f"no job dirs in {sweep_dir}: expected {CONFIG_FILE} in it or in its subdirs "
            f"(e.g. {sweep_dir}/0/{CONFIG_FILE})"
        )
    return [load_job(d, sweep_dir) for d in job_dirs]


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


def _shown_path(path: Path | str) -> str:
    """The path relative to the working directory when it lies under it (as the user typed it)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


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
    groups = assign_groups(jobs, order_group_keys(primary))
    results = build_results(jobs, swept)
    stats = group_stats(results, groups)
    command_keys = [k for k in swept if aliases.get(k, k) != REPLICATE_KEY]
    commands = [
        reproduce_command(command, [jobs[i] for i in groups.members(gid)], command_keys)
        for gid in range(len(groups.values))
    ]
    budgets = budget_frame(stats, groups) if BUDGET_KEY in groups.keys else None

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.csv", results.to_csv(index=False))
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
    )
    write_text_atomic(out_dir / "report.md", render_report(parts))
    names = ["results.csv", "report.md", *plots]
    return {
        "n_jobs": len(jobs),
        "n_failed": sum(not j.ok for j in jobs),
        "group_keys": list(groups.keys),
        "replicate_key": REPLICATE_KEY if REPLICATE_KEY in swept else None,
        "paths": {name: out_dir / name for name in names},
    }
