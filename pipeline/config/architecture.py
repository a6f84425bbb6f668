"""Which network each self-training round trains (Noisy Student: a student equal to or larger
than its teacher).

Round 0, the teacher, is `model`. Round k >= 1 is `selftrain.student_models[k-1]` when that list
is given (names of the model group, conf/model/NAME.yaml, or `same` for `model`; rounds past
the end of the list keep its last entry), else `student_model` (a config group mirroring
`model`, default `same`). The teacher of round k+1 is the student of round k, whatever its
architecture: its checkpoint names it (models/checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config.paths import CONF_DIR
from pipeline.errors import UserError

MODEL_DIR = CONF_DIR / "model"
SAME = "same"


def model_options() -> list[str]:
    """The model group's options (conf/model/*.yaml)."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def model_option(name: str) -> DictConfig:
    """conf/model/NAME.yaml with its defaults list applied (options of the same group and
    `_self_`: what the model files use), interpolations left as they are."""
    path = MODEL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"selftrain.student_models names model {name!r}, which is not an option of the model "
            f"group; choose from {', '.join([SAME, *model_options()])}"
        )
    node = OmegaConf.load(path)
    defaults = node.pop("defaults", None) or []
    merged = OmegaConf.create()
    self_merged = False
    for entry in defaults:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
            self_merged = True
        elif isinstance(entry, str):
            merged = OmegaConf.merge(merged, model_option(entry))
        else:
            raise UserError(f"conf/model/{name}.yaml: unsupported defaults entry {entry!r}")
    return OmegaConf.merge(merged, node) if not self_merged else merged


def round_model_node(config: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The model node of round k in a resolved config given as plain values: the config's own
    `model` or `student_model` node (the same object), or a student_models entry's, resolved
    against the config."""
    names = config["selftrain"]["student_models"]
    if k == 0:
        return config["model"]
    if not names:
        return config["student_model"]
    name = str(names[min(k, len(names)) - 1])
    if name == SAME:
        return config["model"]
    # Interpolations (${data.num_classes}, ${..weights}) resolve against this run's config.
    scratch = OmegaConf.create(dict(config))
    scratch.model = model_option(name)
    return OmegaConf.to_container(scratch.model, resolve=True)  # type: ignore[return-value]


def round_models(cfg: DictConfig) -> list[dict[str, Any]]:
    """The model node of every round, teacher first (the config converted once)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    return [round_model_node(values, k) for k in range(cfg.selftrain.rounds + 1)]  # type: ignore[arg-type]


def round_names(cfg: DictConfig) -> list[str]:
    """The architecture of every round, teacher first."""
    return [str(node["name"]) for node in round_models(cfg)]


def check_student_models(cfg: DictConfig) -> None:
    """selftrain.student_models: known names, no entry that would never train."""
    names = cfg.selftrain.student_models
    if names is None:
        return
    if not len(names):
        raise UserError(
            "selftrain.student_models=[] names no model; give one name per round, e.g. "
            "selftrain.student_models=[small_cnn,small_cnn_wide], or leave it null"
        )
    if len(names) > max(1, cfg.selftrain.rounds):
        raise UserError(
            f"selftrain.student_models has {len(names)} entries for selftrain.rounds="
            f"{cfg.selftrain.rounds}: the last ones would never train; give at most one per round"
        )
    round_models(cfg)  # an unknown name raises here
