"""The typed specs (pipeline/config/specs.py): built once from the composed config, frozen,
field for field the schema's sections, and a round's spec derived from the run's."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from pipeline.cli import resolve
from pipeline.config.specs import MIRRORED, DataSpec, ModelSpec, RunSpec, run_spec


def test_the_mirrored_sections_have_the_schemas_fields():
    for spec, schema in MIRRORED.items():
        assert [f.name for f in dataclasses.fields(spec)] == [
            f.name for f in dataclasses.fields(schema)
        ], spec.__name__


def test_run_spec_holds_the_resolved_config_typed_and_frozen():
    cfg = resolve(compose_cfg("train.epochs=3", "pseudo_label.threshold=0.9"))
    spec = run_spec(cfg)
    assert isinstance(spec, RunSpec) and isinstance(spec.data, DataSpec)
    assert spec.config == OmegaConf.to_container(cfg, resolve=True)
    assert spec.train.epochs == 3 and spec.pseudo_label.threshold == 0.9
    assert spec.selftrain.rounds == 2 and spec.consistency.method == "none"
    assert spec.data.name == "digits" and spec.data.channels == 1 and spec.data.num_classes == 10
    assert (
        spec.data.node == spec.config["data"]
        and spec.data.augment == spec.config["data"]["augment"]
    )
    assert spec.model.name == "small_cnn" and spec.model.net["_target_"].endswith("SmallCNN")
    assert spec.model.node == spec.config["model"] and spec.model.own_weights is False
    assert spec.optimizer["_target_"] == "torch.optim.AdamW" and spec.trainer.args["devices"] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.epochs = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]


def test_a_data_option_without_a_declared_key_takes_the_schemas_default():
    data = DataSpec.of({"name": "x", "num_classes": 3, "channels": 3, "mean": [0.5], "std": [0.5]})
    assert data.decode_on == "workers" and data.on_bad_image == "fail"
    assert data.num_workers == "auto" and data.val_per_class == 0 and data.cache_dir is None
    assert data.augment is None  # (the option gives no augmentation)


def test_a_rounds_spec_is_derived_from_the_runs():
    spec = run_spec(
        resolve(compose_cfg("selftrain.rounds=3", "selftrain.student_models=[same,small_cnn_wide]"))
    )
    assert spec.for_round(0) is spec and spec.for_round(1) is spec  # `same`: nothing made
    wide = spec.for_round(2)
    assert wide.model.name == "small_cnn_wide" and wide.model.net["width"] == 64
    assert (
        wide.config["model"] == wide.model.node and wide.config["model"]["name"] == "small_cnn_wide"
    )
    assert wide.data is spec.data and wide.train is spec.train  # shared, not copied
    assert wide.config["data"] is spec.config["data"]
    assert spec.model.name == "small_cnn" and spec.config["model"]["name"] == "small_cnn"
    assert spec.round_model(3) == ModelSpec.of(wide.model.node)  # past the list: its last entry
