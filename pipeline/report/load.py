"""Reading a sweep: its job dirs and, per job, config.yaml, summary.json, round_K/metrics.json
and the command's overrides (.hydra/overrides.yaml).

A job dir is any directory holding ``config.yaml``, at any depth below the sweep dir (``SWEEP/0``,
``SWEEP/seed=0,stage=baseline``, ``SWEEP/lpc5/0``); it finished when it also holds
``summary.json``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.files import read_yaml
from pipeline.errors import UserError
from pipeline.report.keys import freeze
from pipeline.runtime import io
from pipeline.runtime.rundir import CONFIG, OVERRIDES

SUMMARY_FILE = "summary.json"
SKIP_DIR_NAMES = frozenset({"report"})


@dataclass
class Job:
    """One job dir: its flattened config and whatever results it wrote."""

    path: Path
    rel: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    overrides: list[str] | None = None  # None: not recorded (a sweep made before they were)
    failure: str | None = None
    selectors: frozenset[str] = frozenset()  # config keys that are group choices (selector_choices)

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
    if (sweep_dir / CONFIG).is_file():
        return [sweep_dir]
    skip_resolved = skip.resolve() if skip is not None else None
    found: list[Path] = []
    for root, dirs, files in os.walk(sweep_dir):
        here = Path(root)
        if CONFIG in files and here != sweep_dir:
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


def flatten_config(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``{"a.b.c": value}``; lists become OverrideText strings."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, dotted))
        else:
            flat[dotted] = freeze(value)
    return flat


def load_config(path: Path) -> dict[str, Any]:
    """Read a job's config.yaml as a plain flattened dict."""
    try:
        container = read_yaml(path)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path}: {first_line}") from exc
    if not isinstance(container, dict):
        raise UserError(f"{path} is not a mapping of config keys; expected a job's full config")
    return flatten_config(container)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from path, or None when missing or unreadable."""
    try:
        data = io.read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_overrides(job_dir: Path) -> list[str] | None:
    """The job's command-line overrides as recorded (Hydra's file), or None when absent."""
    path = job_dir / OVERRIDES
    if not path.is_file():
        return None
    try:
        data = read_yaml(path, resolve=False)
    except Exception:
        return None
    return [str(x) for x in data] if isinstance(data, list) else None


def selector_choices(config: Mapping[str, Any], overrides: list[str] | None) -> dict[str, str]:
    """The recorded choices of config groups that leave no key of their own in config.yaml
    (groups of `@package _global_` files: `arm=selftrain`, `experiment=ssl_ablation`), as
    {group: choice}, so that the report can group and name jobs by them. A group whose keys
    are in the config (`data=`, `model=`) is left out: its keys say what it chose."""
    choices = {}
    for token in overrides or []:
        group, sep, choice = token.partition("=")
        group = group.removeprefix("+")
        if not (sep and group.isidentifier()) or group in config:
            continue
        if not any(key.startswith(group + ".") for key in config):
            choices[group] = choice
    return choices


def load_round_metrics(job_dir: Path, summary: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """Per-round metrics merged from round_K/metrics.json and summary.json (summary wins)."""
    rounds: dict[int, dict[str, Any]] = {}
    for path in job_dir.glob("round_*/metrics.json"):
        match = re.fullmatch(r"round_(\d+)", path.parent.name)
        data = read_json_object(path)
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
    summary = read_json_object(summary_path)
    failure = None
    if summary is None:
        failure = "summary.json unreadable" if summary_path.exists() else "no summary.json"
    config, overrides = load_config(job_dir / CONFIG), read_overrides(job_dir)
    choices = selector_choices(config, overrides)
    return Job(
        path=job_dir,
        rel=rel,
        config={**choices, **config},  # first: a swept choice is the first swept key
        summary=summary,
        rounds=load_round_metrics(job_dir, summary),
        overrides=overrides,
        failure=failure,
        selectors=frozenset(choices),
    )


def load_jobs(sweep_dir: Path, out_dir: Path) -> list[Job]:
    """All jobs under sweep_dir; UserError when there are none."""
    if not sweep_dir.exists():
        raise UserError(
            f"sweep dir {sweep_dir} does not exist; expected a multirun dir of job dirs "
            f"(each with {CONFIG}) or a single run dir"
        )
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory; expected a multirun dir or a run dir")
    skip = out_dir if out_dir.resolve() != sweep_dir.resolve() else None
    job_dirs = find_job_dirs(sweep_dir, skip=skip)
    if not job_dirs:
        raise UserError(
            f"no job dirs in {sweep_dir}: expected {CONFIG} in it or in its subdirs "
            f"(e.g. {sweep_dir}/0/{CONFIG})"
        )
    return [load_job(d, sweep_dir) for d in job_dirs]
