"""The pipeline's own settings as typed dataclasses, registered in Hydra's ConfigStore: a typo
or a wrong type fails at start-up. The groups that pick objects (data, model, trainer, optimizer,
scheduler) stay free-form YAML; model and optimizer nodes carry `_target_` for instantiate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.config.keys import run_name

FINETUNE_MODES = ("full", "linear", "last_layers")
BALANCE_MODES = ("none", "cap", "duplicate")


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    eval_batch_size: int = 1024
    min_steps: int = 300
    label_smoothing: float = 0.0
    checkpoint_every_s: float | None = 60.0
    ema_decay: float | None = None


@dataclass
class PseudoLabelConfig:
    threshold: float = 0.8
    max_per_class: int | None = None
    balance: str = "none"
    tta_views: int = 8
    soft: bool = False
    temperature: float = 1.0
    weight: float = 1.0
    labelled_fraction: float = 0.25
    soft_topk: int | None = None
    shard: int | None = None
    num_shards: int | None = None
    shard_size: int = 4096


@dataclass
class SelfTrainConfig:
    rounds: int = 2
    student_models: list[str] | None = None


@dataclass
class PretrainConfig:
    ckpt: str | None = None
    epochs: int = 15
    cache_dir: str | None = None


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
    student_model: Any = MISSING
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


def register() -> None:
    """Register the schema and the `run_name` resolver (before Hydra composes anything)."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


# The typed sections: a key added to one of them with `+key=value` is a typo, not a setting.
TYPED_SECTIONS = {
    "": PipelineConfig,
    "train.": TrainConfig,
    "pseudo_label.": PseudoLabelConfig,
    "selftrain.": SelfTrainConfig,
    "pretrain.": PretrainConfig,
    "finetune.": FinetuneConfig,
    "report.": ReportConfig,
}


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys in the pipeline's typed sections that no dataclass declares (e.g. `+trian.epochs=3`)."""
    found = []
    for prefix, schema in TYPED_SECTIONS.items():
        node = OmegaConf.select(cfg, prefix[:-1]) if prefix else cfg
        if isinstance(node, DictConfig):
            known = {f.name for f in dataclasses.fields(schema)}
            found += [f"{prefix}{k}" for k in node if k not in known]
    return found
