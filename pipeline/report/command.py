"""The settings a sweep shares and the command that reproduces each group of jobs.

Both come from the overrides each job recorded (``.hydra/overrides.yaml``). Result-neutral
overrides (devices, threads, paths) are left out. Sweeps made before the overrides were recorded
get a command made from the swept keys alone.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from pipeline.config.keys import is_result_neutral, override_key
from pipeline.report.keys import (
    ABSENT,
    REPLICATE_KEY,
    STAGE_KEY,
    hashable,
    override_value,
    value_sort_key,
)
from pipeline.report.load import Job


def common_overrides(jobs: Sequence[Job]) -> list[str] | None:
    """The overrides (not result-neutral) every job recorded, in the first job's order; None
    when some job has no recorded overrides."""
    if any(job.overrides is None for job in jobs):
        return None
    first = jobs[0].overrides or []
    return [
        token
        for token in dict.fromkeys(first)
        if not is_result_neutral(override_key(token))
        and all(token in (job.overrides or []) for job in jobs)
    ]


def shared_settings(jobs: Sequence[Job]) -> str | None:
    """The overrides common to all jobs as one shell-quoted line ('' when there are none); None
    when the jobs did not record their overrides."""
    common = common_overrides(jobs)
    return None if common is None else " ".join(shlex.quote(t) for t in common)


def _seed_token(jobs: Sequence[Job]) -> list[str]:
    """``seed=0,1,2``: the group's seeds, sorted (none when the configs have no seed)."""
    seeds = [j.config[REPLICATE_KEY] for j in jobs if REPLICATE_KEY in j.config]
    if not seeds:
        return []
    ordered = sorted({hashable(s): s for s in seeds}.values(), key=value_sort_key)
    return [f"{REPLICATE_KEY}=" + ",".join(override_value(s) for s in ordered)]


def _swept_token(jobs: Sequence[Job], key: str) -> str | None:
    """The group's ``key=value``: as recorded when every job recorded the same override for
    key (keeping e.g. a ``+`` prefix), else written from the config value."""
    recorded = {tuple(t for t in (job.overrides or []) if override_key(t) == key) for job in jobs}
    if len(recorded) == 1 and len(tokens := next(iter(recorded))) == 1:
        return tokens[0]
    value = jobs[0].config.get(key, ABSENT)
    return None if value is ABSENT else f"{key}={override_value(value)}"


def reproduce_command(
    command: str, jobs: Sequence[Job], group_keys: Sequence[str], swept: Sequence[str]
) -> str:
    """``{command} -m SHARED... key=value... seed=0,1,2`` for a group of jobs.

    SHARED: the overrides every job of the group recorded that are not result-neutral, except
    those of the group keys and seed; then the group's values of group_keys and its seeds. An
    override of a key that varies in step with a group key stays in SHARED, so the command is
    exact. Without recorded overrides (an old sweep): stage and the swept keys (those varying in
    step with seed left out by the caller), then seeds.
    """
    common = common_overrides(jobs)
    tokens: list[str] = []
    if common is not None:
        skip = {*group_keys, REPLICATE_KEY}
        tokens += [t for t in common if override_key(t) not in skip]
        keys = list(group_keys)
    else:
        keys = [STAGE_KEY, *swept]
    for key in keys:
        token = None if key == REPLICATE_KEY else _swept_token(jobs, key)
        if token is not None and token not in tokens:
            tokens.append(token)
    tokens += _seed_token(jobs)
    return " ".join([command, "-m", *(shlex.quote(t) for t in tokens)])
