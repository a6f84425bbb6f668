"""Typed settings of the pipeline (checked by Hydra at start-up) and the checks Hydra cannot do.

The groups that pick objects (data, model, trainer, optimizer, scheduler) stay free-form YAML
with `_target_`; the pipeline's own knobs are dataclasses, so a typo or a wrong type fails early.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.errors import UserError

STAGES = (
    "selftrain",
    "train",
    "pseudolabel",
    "merge",
    "evaluate",
    "pretrain",
    "finetune",
    "baseline",
    "report",
)
BUNDLED = ("digits", "mnist5k")
FINETUNE_MODES = ("full", "linear", "last_layers")

# Settings that may change between a run and its resume: they do not change the result.
RUNTIME_KEYS = (
    "run_dir",
    "overwrite",
    "progress",
    "out",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "trainer.precision",
    "trainer.compile",
    "trainer.channels_last",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "data.root",
    "data.download",
    "pretrain_data.num_workers",
    "pretrain_data.root",
    "pretrain_data.download",
    "report",
)


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    eval_batch_size: int = 1024
    min_steps: int = 300
    label_smoothing: float = 0.0


@dataclass
class PseudoLabelConfig:
    threshold: float = 0.8
    max_per_class: int | None = None
    soft: bool = False
    temperature: float = 1.0
    weight: float = 1.0
    labelled_fraction: float = 0.25


@dataclass
class SelfTrainConfig:
    rounds: int = 2


@dataclass
class PretrainConfig:
    ckpt: str | None = None
    epochs: int = 15


@dataclass
class FinetuneConfig:
    mode: str = "full"
    lr_scale: float = 0.1
    trainable_blocks: int = 1


@dataclass
class ReportConfig:
    sweep_dir: str | None = None


@dataclass
class PipelineConfig:
    stage: str = "selftrain"
    seed: int = 0
    run_dir: str | None = None
    init: str = "scratch"
    ckpt: str | None = None
    out: str | None = None
    pseudo_in: str | None = None
    overwrite: bool = False
    progress: bool = True
    data: Any = MISSING
    pretrain_data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    experiment: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def run_name(override_dirname: str) -> str:
    """A directory name from the command's overrides: readable, filesystem-safe, bounded."""
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname)
    if len(name) > 100:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        name = f"{name[:88]}-{digest}"
    return name


def register() -> None:
    """Register the schema and the `run_name` resolver (before Hydra composes anything)."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


def resolve_pretrain_source(cfg: DictConfig) -> None:
    """`pretrain_data=auto`: the other bundled set, shaped like the target (in place)."""
    if cfg.pretrain_data.get("name") != "auto":
        return
    source = "mnist5k" if cfg.data.name == "digits" else "digits"
    # Composing a group inside a running app is not possible: read the two YAML files.
    conf_dir = Path(__file__).resolve().parent.parent / "conf"
    node = OmegaConf.load(conf_dir / "data" / "digits.yaml")
    if source == "mnist5k":
        node = OmegaConf.merge(node, OmegaConf.load(conf_dir / "data" / "mnist5k.yaml"))
    node.pop("defaults", None)
    node.image_size = cfg.data.image_size
    node.channels = cfg.data.channels
    node.labels_per_class = None
    node.val_per_class = 0
    cfg.pretrain_data = node


def _in_range(value: float, low: float, high: float) -> bool:
    return low <= value <= high


def validate(cfg: DictConfig) -> None:
    """The checks types cannot express. Raises UserError with one line saying what to fix."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage={cfg.stage!r}; choose one of {', '.join(STAGES)}")
    pl = cfg.pseudo_label
    if not _in_range(pl.threshold, 0.0, 1.0):
        raise UserError(
            f"pseudo_label.threshold={pl.threshold} is outside [0, 1]; pass a confidence such as 0.8"
        )
    if not _in_range(pl.labelled_fraction, 0.0, 1.0):
        raise UserError(f"pseudo_label.labelled_fraction={pl.labelled_fraction} is outside [0, 1]")
    if pl.temperature <= 0:
        raise UserError(f"pseudo_label.temperature={pl.temperature} must be > 0")
    if pl.max_per_class is not None and pl.max_per_class < 1:
        raise UserError(f"pseudo_label.max_per_class={pl.max_per_class} must be >= 1 or null")
    if cfg.selftrain.rounds < 0:
        raise UserError(f"selftrain.rounds={cfg.selftrain.rounds} must be >= 0 (0: teacher only)")
    lpc = cfg.data.get("labels_per_class")
    if lpc is not None and lpc < 1:
        raise UserError(f"data.labels_per_class={lpc} must be >= 1")
    if lpc is None and cfg.data.name != "image_folder" and cfg.stage not in ("report",):
        raise UserError(
            "data.labels_per_class=null is only for data=image_folder; give a number per class"
        )
    if cfg.train.batch_size < 1 or cfg.train.epochs < 0:
        raise UserError("train.batch_size must be >= 1 and train.epochs >= 0")
    if cfg.init not in ("scratch", "pretrained"):
        raise UserError(f"init={cfg.init!r}; choose scratch or pretrained")
    if cfg.finetune.mode not in FINETUNE_MODES:
        raise UserError(
            f"finetune.mode={cfg.finetune.mode!r}; choose one of {', '.join(FINETUNE_MODES)}"
        )
    if cfg.finetune.lr_scale <= 0:
        raise UserError(f"finetune.lr_scale={cfg.finetune.lr_scale} must be > 0")
    if cfg.stage in ("pseudolabel", "evaluate", "finetune") and not cfg.ckpt:
        raise UserError(f"stage={cfg.stage} needs a checkpoint: pass ckpt=PATH/model.ckpt")
    if cfg.stage == "report" and not cfg.report.sweep_dir:
        raise UserError("stage=report needs report.sweep_dir=DIR (a multirun dir or a run_dir)")
    uses_pretrain = cfg.stage in ("pretrain", "baseline") or (
        cfg.stage == "selftrain" and cfg.init == "pretrained"
    )
    runs_pretraining = uses_pretrain and cfg.model.get("weights") is None and not cfg.pretrain.ckpt
    if runs_pretraining and cfg.pretrain_data.name == cfg.data.name:
        raise UserError(
            f"pretrain_data={cfg.pretrain_data.name} is the target dataset itself, which "
            "leaks the target's labels; pretrain on another set (e.g. pretrain_data=auto)"
        )


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of a nested dict/list config."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def result_keys(cfg: DictConfig) -> dict[str, Any]:
    """The settings a run's result depends on (everything but the runtime ones), flat."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == r or k.startswith(r + ".") for r in RUNTIME_KEYS)
    }


def differing_keys(old: DictConfig, new: DictConfig) -> list[str]:
    a, b = result_keys(old), result_keys(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
