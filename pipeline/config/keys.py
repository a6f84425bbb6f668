"""Which settings change a run's result: the one list the run-dir name, the resume check and the
report's grouping all read.

A *result-neutral* key may differ between a run and its resume (devices, threads, where files
go, progress bars): two runs that differ only in such keys are the same experiment. Every other
key is part of the experiment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

# A key is result-neutral when it equals one of these or lies under one (`report` covers
# `report.sweep_dir`, `hydra` every Hydra setting).
RESULT_NEUTRAL = (
    "run_dir",
    "overwrite",
    "progress",
    "objective",
    "logger",
    "max_requeues",
    "out",
    "report",
    "hydra",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "trainer.precision",
    "trainer.compile",
    "trainer.channels_last",
    "trainer.log_every_n_steps",
    "trainer.num_threads",
    "train.checkpoint_every_s",
    "data.num_workers",
    "data.cache",  # the decoded-image cache gives the streamed path's tensors, bit for bit
    "data.cache_dir",
    "data.in_memory",
    "data.in_memory_limit_mb",
    "data.root",
    "data.download",
    "pretrain_data.num_workers",
    "pretrain_data.cache",
    "pretrain_data.cache_dir",
    "pretrain_data.in_memory",
    "pretrain_data.in_memory_limit_mb",
    "pretrain_data.root",
    "pretrain_data.download",
    "pseudo_label.shard_size",
    "pseudo_label.num_shards",
    "predict.shard_size",
    "pretrain.cache_dir",
)
# The default run_dir is outputs/<stage>/<name>/seed<seed>: stage and seed are in the path, so
# the name leaves them out (they are not result-neutral).
IN_RUN_DIR_PATH = ("stage", "seed")


def is_result_neutral(key: str) -> bool:
    """Whether `key` (dotted, e.g. "trainer.devices", or a group override "hydra/launcher")
    cannot change a run's result."""
    key = key.lstrip("+~").replace("/", ".")
    return any(key == k or key.startswith(k + ".") for k in RESULT_NEUTRAL)


def override_key(override: str) -> str:
    """The key an override sets: "+trainer.gradient_clip_val=1" -> "trainer.gradient_clip_val"."""
    return override.split("=", 1)[0].lstrip("+~")


def result_overrides(overrides: Iterable[str], leave_out: Iterable[str] = ()) -> list[str]:
    """The overrides that are part of the experiment, sorted (so their order does not matter);
    of a key given twice, the last (Hydra's rule: `seed=1 seed=2` is `seed=2`)."""
    skip = set(leave_out)
    last = {override_key(o): o for o in overrides}
    return sorted(o for k, o in last.items() if not is_result_neutral(k) and k not in skip)


def dir_name(overrides: Iterable[str], leave_out: Iterable[str] = ()) -> str:
    """A directory name from overrides: readable, filesystem-safe, hashed when long."""
    text = ",".join(result_overrides(overrides, leave_out))
    if not text:
        return "default"
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)
    if len(name) > 100:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        name = f"{name[:88]}-{digest}"
    return name


def run_name(overrides: Iterable[str]) -> str:
    """The name part of the default run_dir (outputs/<stage>/<name>/seed<seed>)."""
    return dir_name(overrides, IN_RUN_DIR_PATH)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of a nested dict config."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def result_keys(container: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a run's result depends on, flat (a resolved config as plain containers)."""
    return {k: v for k, v in flatten(container).items() if not is_result_neutral(k)}


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The result keys whose values differ between two resolved configs, sorted."""
    a, b = result_keys(old), result_keys(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
