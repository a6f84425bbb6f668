"""The pipeline's own settings as typed dataclasses, registered in Hydra's ConfigStore: a typo
or a wrong type fails at start-up. The groups that pick objects (data, model, trainer, optimizer,
scheduler) stay free-form YAML; model and optimizer nodes carry `_target_` for instantiate.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.config.keys import dir_name, run_name

FINETUNE_MODES = ("full", "linear", "last_layers")
EXPORT_FORMATS = ("onnx", "torchscript")
PREDICT_SUFFIXES = (".csv", ".parquet")
SELECT_MODES = ("last", "best_val")
# objective= -> the summary.json key a Hydra job returns to its sweeper (final round).
OBJECTIVES = {"val_accuracy": "val_accuracy", "test_accuracy": "final_test_accuracy"}
BALANCE_MODES = ("none", "cap", "duplicate")
CONSISTENCY_METHODS = ("none", "fixmatch", "flexmatch", "freematch", "softmatch")


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    eval_batch_size: int = 256
    min_steps: int = 300
    label_smoothing: float = 0.0
    checkpoint_every_s: float | None = 60.0
    select: str = "last"
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
    dist_align: str = "none"
    prior: list[float] | None = None
    rebalance_alpha: float | None = None
    ood_score: str = "none"
    ood_quantile: float = 0.05


@dataclass
class ConsistencyConfig:
    """Online pseudo-labelling (conf/consistency/): what pipeline.consistency.ConsistencySpec
    holds, with the same defaults (tests/test_consistency.py checks they agree)."""

    method: str = "none"
    mu: int = 7
    weight: float = 1.0
    threshold: float = 0.95
    temperature: float = 1.0
    dist_align: bool = False
    ema_momentum: float = 0.999
    warmup: bool = True
    mapping: str = "convex"
    fairness_weight: float = 0.0
    n_sigma: float = 2.0
    randaugment_ops: int = 2
    randaugment_magnitude: int = 10
    cutout: float = 0.5


@dataclass
class PredictConfig:
    topk: int = 5
    tta_views: int = 0
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
    layer_decay: float | None = None  # block i of n at lr x layer_decay^(n - i); null: off


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
    input: Any = None
    format: str | None = None
    pseudo_in: str | None = None
    overwrite: bool = False
    progress: bool = True
    objective: str | None = "val_accuracy"
    max_requeues: int = 20
    data: Any = MISSING
    pretrain_data: Any = MISSING
    model: Any = MISSING
    student_model: Any = MISSING
    trainer: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    experiment: Any = None
    logger: Any = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def register() -> None:
    """Register the schema and the resolvers (before Hydra composes anything): `run_name` (the
    default run_dir's name), `job_dir_name` (a sweep job's dir, conf/config.yaml),
    `slurm_gpus_per_node` (conf/hydra/launcher/slurm.yaml), `online_or` (the benchmark presets)
    and those of the logger group (conf/logger/)."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    resolvers = {
        "run_name": run_name,
        "logger_run_name": logger_run_name,
        "logger_experiment": logger_experiment,
        "logger_cwd": logger_cwd,
        "job_dir_name": dir_name,
        "slurm_gpus_per_node": _slurm_gpus_per_node,
        "online_or": online_or,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def online_or(method: str, online: Any, offline: Any) -> Any:
    """`${online_or:${consistency.method},A,B}`: A with online pseudo-labelling (a consistency
    method), B without; what the benchmark presets (conf/experiment/_ssl_protocol.yaml) use to
    follow the protocol of either kind of method."""
    return offline if method == "none" else online


def _hydra_config() -> Any:
    """Hydra's own config of this job, or None (composed without a Hydra app, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def logger_run_name() -> str:
    """A logger run's name: the job's overrides that are part of the experiment (stage and seed
    included), e.g. `pseudo_label.threshold=0.9,seed=1`; `default` for none."""
    hydra_cfg = _hydra_config()
    return dir_name(list(hydra_cfg.overrides.task) if hydra_cfg is not None else [])


def logger_experiment(run_dir: str) -> str:
    """The experiment (MLflow) or group (W&B) a run belongs to: its sweep (hydra.sweep.dir)
    when it is a job of a -m sweep, else the run itself (its run_dir)."""
    from hydra.types import RunMode

    hydra_cfg = _hydra_config()
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        return str(hydra_cfg.sweep.dir)
    return str(run_dir)


def logger_cwd() -> str:
    """The folder the command was started in (where `mlflow ui` finds ./mlflow.db)."""
    hydra_cfg = _hydra_config()
    return str(hydra_cfg.runtime.cwd) if hydra_cfg is not None else os.getcwd()


def _slurm_gpus_per_node(accelerator: Any, devices: Any, partition: Any = None) -> int | None:
    from pipeline.runtime.slurm import gpus_per_node

    return gpus_per_node(accelerator, devices, partition)


# The typed sections: a key added to one of them with `+key=value` is a typo, not a setting.
TYPED_SECTIONS = {
    "": PipelineConfig,
    "train.": TrainConfig,
    "pseudo_label.": PseudoLabelConfig,
    "consistency.": ConsistencyConfig,
    "predict.": PredictConfig,
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
