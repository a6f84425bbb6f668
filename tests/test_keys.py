"""One list of result-neutral keys (pipeline/config/keys.py), and the three places that read it
agree on every key of the real config: the default run_dir's name, the resume check (a run_dir
made by another config is refused) and the report's grouping of a sweep's jobs."""

from __future__ import annotations

import copy

import pytest
from omegaconf import OmegaConf
from test_config import compose_cfg

from pipeline.cli import resolve
from pipeline.config.keys import RESULT_NEUTRAL, differing_keys, flatten, run_name
from pipeline.report.keys import find_swept_keys
from pipeline.report.load import flatten_config


def set_flat(container: dict, key: str, value) -> dict:
    out = copy.deepcopy(container)
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


def verdicts(base: dict, key: str) -> tuple[bool, bool, bool]:
    """Does changing `key` make a different experiment, for (run name, resume check, report)?"""
    changed = set_flat(base, key, "__changed__")
    named = run_name([f"{key}=__changed__"]) != run_name([])
    refused = key in differing_keys(base, changed)
    grouped = key in find_swept_keys([flatten_config(base), flatten_config(changed)])
    return named, refused, grouped


@pytest.fixture(scope="module")
def default_config() -> dict:
    cfg = resolve(compose_cfg("stage=selftrain"))
    return OmegaConf.to_container(cfg, resolve=True)


def test_every_key_of_the_config_gets_one_verdict_from_all_three(default_config):
    keys = sorted(flatten(default_config))
    assert len(keys) > 50  # the whole config, not a sample
    disagreeing = {}
    for key in keys:
        named, refused, grouped = verdicts(default_config, key)
        if key in ("stage", "seed"):
            named = True  # in the default run_dir's path itself: outputs/<stage>/.../seed<seed>
        if len({named, refused, grouped}) != 1:
            disagreeing[key] = (named, refused, grouped)
    assert disagreeing == {}


def test_the_listed_keys_are_neutral_and_the_others_are_not(default_config):
    for key in (
        "trainer.devices",
        "trainer.num_threads",
        "progress",
        "run_dir",
        "data.root",
        "data.cache",
    ):
        assert key.startswith(RESULT_NEUTRAL) or any(key == k for k in RESULT_NEUTRAL)
        assert verdicts(default_config, key) == (False, False, False)
    for key in ("train.epochs", "pseudo_label.threshold", "data.labels_per_class", "model.name"):
        assert verdicts(default_config, key) == (True, True, True)
    # keys under a listed prefix are neutral too, also ones the config does not have yet
    assert run_name(["report.sweep_dir=/x", "hydra.launcher.partition=gpu"]) == "default"
