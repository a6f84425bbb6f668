"""Swept keys of a sweep and how config values are written.

Swept keys are the config keys whose values differ across jobs, except the result-neutral ones
(`pipeline.config.keys.is_result_neutral`: devices, threads, paths, Hydra's settings), which
never make two jobs different experiments. ``seed`` is the replicate key. Keys that vary exactly
like another are its aliases and are not shown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pipeline.config.keys import is_result_neutral

REPLICATE_KEY = "seed"
STAGE_KEY = "stage"
BUDGET_KEY = "data.labels_per_class"
DASH = "–"


class _Absent:
    """Marks a config key that a job's config does not have."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


class OverrideText(str):
    """A value already written in override syntax (a list or mapping from a config)."""


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


def freeze(node: Any) -> Any:
    """Turn lists/mappings into hashable OverrideText strings in override syntax."""
    if isinstance(node, Mapping):
        inner = ",".join(f"{k}:{override_value(freeze(v))}" for k, v in node.items())
        return OverrideText("{" + inner + "}")
    if isinstance(node, (list, tuple)):
        return OverrideText("[" + ",".join(override_value(freeze(x)) for x in node) + "]")
    return node


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


def hashable(value: Any) -> Any:
    """Identity of a config value for comparisons (type-strict, NaN-safe)."""
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def unique(values: Sequence[Any]) -> list[Any]:
    """The distinct values (by `hashable`) in order of first appearance."""
    seen: dict[Any, Any] = {}
    for v in values:
        seen.setdefault(hashable(v), v)
    return list(seen.values())


def sorted_codes(values: Sequence[Any]) -> list[int]:
    """Each value's rank among the distinct values sorted by `value_sort_key`."""
    ordered = sorted(unique(values), key=value_sort_key)
    rank = {hashable(v): i for i, v in enumerate(ordered)}
    return [rank[hashable(v)] for v in values]


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


# ------------------------------------------------------------------------ swept keys


def _partition(values: Sequence[Any]) -> tuple[int, ...]:
    """Which jobs share a value: the index of each job's value in order of appearance."""
    first: dict[Any, int] = {}
    return tuple(first.setdefault(hashable(v), len(first)) for v in values)


def find_swept_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys that are not result-neutral and whose values differ across configs, in order of
    first appearance."""
    keys: dict[str, None] = {}
    for cfg in configs:
        keys.update(dict.fromkeys(cfg))
    return [
        key
        for key in keys
        if not is_result_neutral(key)
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


def _determines(selector: str, key: str, configs: Sequence[Mapping[str, Any]]) -> bool:
    """True when the configs that share a value of `selector` share one of `key`."""
    seen: dict[Any, Any] = {}
    for cfg in configs:
        value = hashable(cfg.get(key, ABSENT))
        if seen.setdefault(hashable(cfg.get(selector, ABSENT)), value) != value:
            return False
    return True


def fold_into_selectors(
    primary: Sequence[str],
    aliases: Mapping[str, str],
    configs: Sequence[Mapping[str, Any]],
    selectors: Collection[str],
) -> tuple[list[str], dict[str, str]]:
    """Show the keys a swept selector determines through it: a sweep over `arm=` groups and
    names its jobs by arm, not by the keys each arm sets (stage, consistency.method, init).

    A selector that varies exactly like a shown key (other than seed) is shown in its place
    (`experiment=cifar10_40,cifar10_250` names its rows by experiment, not by the label budget
    each sets). A shown key other than seed and the selectors, whose value is the same in every
    job of the same selector value, becomes an alias of that selector. Returns the shown keys
    and the aliases, updated."""
    shown, aliases = list(primary), dict(aliases)
    for selector in [k for k in aliases if k in selectors]:
        was = aliases[selector]
        if was == REPLICATE_KEY or was in selectors:
            continue
        shown[shown.index(was)] = selector
        aliases = {a: selector if p == was else p for a, p in aliases.items() if a != selector}
        aliases[was] = selector
    for selector in [k for k in shown if k in selectors]:
        for key in [k for k in shown if k not in selectors and k != REPLICATE_KEY]:
            if _determines(selector, key, configs):
                shown.remove(key)
                aliases[key] = selector
                aliases.update({a: selector for a, p in aliases.items() if p == key})
    return shown, aliases


def order_group_keys(primary: Sequence[str]) -> list[str]:
    """Group keys: shown swept keys except seed, with stage first."""
    keys = [k for k in primary if k != REPLICATE_KEY]
    return sorted(keys, key=lambda k: (k != STAGE_KEY, keys.index(k)))
