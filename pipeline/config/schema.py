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

from pipeline.config.declare import key
from pipeline.config.keys import dir_name, run_name

# stage=NAME: the stages, in --help's order (pipeline/stages.py maps each to its recipe)
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
    "predict",
    "export",
)
FINETUNE_MODES = ("full", "linear", "last_layers")
EXPORT_FORMATS = ("onnx", "torchscript")
PREDICT_SUFFIXES = (".csv", ".parquet")
SELECT_MODES = ("last", "best_val")
# objective= -> the summary.json key a Hydra job returns to its sweeper (final round).
OBJECTIVES = {"val_accuracy": "val_accuracy", "test_accuracy": "final_test_accuracy"}
BALANCE_MODES = ("none", "cap", "duplicate")
BALANCE_HINT = (
    "cap: at most K per class, K = pseudo_label.max_per_class or the median class count; "
    "duplicate: also repeat the images of classes below K up to K"
)
CONSISTENCY_METHODS = ("none", "fixmatch", "flexmatch", "freematch", "softmatch")
METHOD_HINT = "consistency=NAME picks a method with its settings"
# pseudo_label.dist_align and pseudo_label.ood_score (pipeline/selftrain/pool.py).
DIST_ALIGN_MODES = ("none", "labelled", "estimated", "given")
OOD_SCORES = ("none", "msp", "energy")
UNLABELLED_ORDERS = ("same", "reversed", "uniform")


@dataclass
class TrainConfig:
    epochs: int = key(60, ge=0)
    batch_size: int = key(64, ge=1)
    eval_batch_size: int = key(256, ge=1)
    min_steps: int = key(300, ge=0)
    label_smoothing: float = key(0.0, ge=0, lt=1)
    logit_adjust: float = key(
        0.0, ge=0, hint="tau of the logit-adjusted loss; 1.0 as in the paper, 0 off"
    )
    checkpoint_every_s: float | None = key(60.0, ge=0, hint="0: every step; null: every epoch")
    select: str = key("last", choices=SELECT_MODES)
    ema_decay: float | None = key(None, ge=0, lt=1, hint="pass a decay such as 0.999, or null")


@dataclass
class PseudoLabelConfig:
    threshold: float = key(0.8, ge=0, le=1, hint="pass a confidence such as 0.8")
    max_per_class: int | None = key(None, ge=1)
    balance: str = key("none", choices=BALANCE_MODES, hint=BALANCE_HINT)
    tta_views: int = key(8, ge=0)
    soft: bool = False
    temperature: float = key(1.0, gt=0)
    weight: float = key(1.0, ge=0)
    labelled_fraction: float = key(0.25, ge=0, le=1)
    soft_topk: int | None = key(None, ge=1)
    shard: int | None = key(None, ge=0)
    num_shards: int | None = key(None, ge=1)
    shard_size: int = key(4096, ge=1)
    dist_align: str = key("none", choices=DIST_ALIGN_MODES)
    prior: list[float] | None = None
    rebalance_alpha: float | None = key(None, ge=0)
    ood_score: str = key("none", choices=OOD_SCORES)
    ood_quantile: float = key(0.05, ge=0, lt=1)


@dataclass
class ConsistencyConfig:
    """Online pseudo-labelling (conf/consistency/): what pipeline.consistency.ConsistencySpec
    holds, with the same defaults (tests/test_consistency.py checks they agree)."""

    method: str = key("none", choices=CONSISTENCY_METHODS, hint=METHOD_HINT)
    mu: int = key(7, ge=1, hint="pool images per training image")
    weight: float = key(1.0, ge=0)
    threshold: float = key(0.95, ge=0, le=1, hint="e.g. 0.95")
    temperature: float = key(1.0, gt=0, hint="1: hard labels")
    dist_align: bool = False
    ema_momentum: float = key(0.999, ge=0, lt=1, hint="e.g. 0.999")
    warmup: bool = True
    mapping: str = key("convex", choices=("convex", "linear"))
    fairness_weight: float = key(0.0, ge=0)
    debias: float = key(0.0, ge=0, hint="DebiasPL's tau, e.g. 0.4; 0: off")
    n_sigma: float = key(2.0, gt=0)
    randaugment_ops: int = key(2, ge=0)
    randaugment_magnitude: int = key(10, ge=0, le=30)
    cutout: float = key(0.5, ge=0, le=1, hint="a fraction of the image side")
    students: bool = True


@dataclass
class PredictConfig:
    topk: int = key(5, ge=1, hint="the number of top classes listed")
    tta_views: int = key(0, ge=0)
    shard_size: int = key(4096, ge=1)


@dataclass
class SelfTrainConfig:
    rounds: int = key(2, ge=0, hint="0: teacher only")
    student_models: list[str] | None = None


@dataclass
class PretrainConfig:
    ckpt: str | None = None
    epochs: int = key(15, ge=0)
    cache_dir: str | None = None


@dataclass
class FinetuneConfig:
    mode: str = key("full", choices=FINETUNE_MODES)
    lr_scale: float = key(0.1, gt=0)
    trainable_blocks: int = key(1, ge=0)
    # block i of n at lr x layer_decay^(n - i); null: off
    layer_decay: float | None = key(None, gt=0, le=1, hint="e.g. 0.75")


@dataclass
class ReportConfig:
    sweep_dir: str | None = None


# The free-form groups (data=, pretrain_data=, optimizer=, scheduler=, trainer=) are declared,
# not registered: each option keeps its own YAML keys (a torchvision set its root, an optimizer
# its own arguments), and the declared keys are checked where an option has them. The defaults
# are those of the default options (digits, adamw, cosine, default; tests/test_config.py).


@dataclass
class AugmentConfig:
    translate: float = key(0.125, ge=0, le=1, hint="a fraction of the image side")
    rotate: float = key(12.0, ge=0, le=180, hint="degrees")
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    flip: bool = False
    cutout: float = key(0.25, ge=0, le=1, hint="a fraction of the image side (0: off)")
    randaugment_ops: int = key(2, ge=0)
    randaugment_magnitude: int = key(9, ge=0, le=30)


@dataclass
class ImbalanceConfig:
    labelled_ratio: float | None = key(None, ge=1, hint="the max/min class count, e.g. 10")
    unlabelled_ratio: float | None = key(None, ge=1, hint="the max/min class count, e.g. 10")
    unlabelled_order: str = key("same", choices=UNLABELLED_ORDERS)


@dataclass
class DataConfig:
    """The data keys the pipeline reads (conf/data/); known_classes etc. cross-checked in
    checks.py."""

    name: str = "digits"
    num_classes: int = key(10, ge=1)
    channels: int = key(1, ge=1)
    image_size: int = key(8, ge=1)
    labels_per_class: int | None = key(4, ge=1)
    val_per_class: int = key(0, ge=0)
    test_fraction: float | None = key(0.2, gt=0, lt=1)
    download: bool = False
    on_bad_image: str = key("fail", choices=("fail", "skip"))
    num_workers: int | str = key("auto", ge=0, choices=("auto",))
    in_memory: bool | str = key("auto", choices=("auto", "true", "false"))
    in_memory_limit_mb: float = key(1024, ge=0)
    decode_on: str = key("workers", choices=("workers", "device"))
    cache_dir: str | None = None
    cache: str = key("none", choices=("none", "decoded"))  # data/cache.py CACHE_CHOICES
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    # null: no augmentation (no noise, no test-time views)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)


@dataclass
class ModelConfig:
    """The model keys the pipeline reads besides its network's arguments (conf/model/)."""

    cache_features: bool = False


@dataclass
class OptimizerConfig:
    lr: float = key(0.003, gt=0, hint="e.g. optimizer.lr=0.003")
    weight_decay: float = key(0.0005, ge=0)
    momentum: float = key(0.9, ge=0, lt=1)


@dataclass
class SchedulerConfig:
    eta_min: float = key(0.0, ge=0)


@dataclass
class TrainerConfig:
    """The trainer keys checked here; the others are Lightning's to check (checks.py)."""

    num_nodes: int = key(1, ge=1)
    num_threads: int | None = key(None, ge=1)
    compile: bool = False
    channels_last: bool = True
    log_every_n_steps: int = key(50, ge=1)


@dataclass
class PipelineConfig:
    stage: str = "selftrain"
    seed: int = key(0, ge=0, lt=2**32)  # numpy's seeds
    run_dir: str | None = None
    init: str = key("scratch", choices=("scratch", "pretrained"))
    ckpt: str | None = None
    out: str | None = None
    input: Any = None
    format: str | None = key(None, choices=EXPORT_FORMATS, null_choice=False)  # (stage=export)
    pseudo_in: str | None = None
    overwrite: bool = False
    progress: bool = True
    objective: str | None = key("val_accuracy", choices=tuple(OBJECTIVES))
    max_requeues: int = key(20, ge=0, hint="0: never requeue")
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


# Every declared section, checked key by key (declare.check_declared) before anything is
# written; the root's own dataclass fields (train, pseudo_label, ...) are walked from "".
DECLARED = {
    "": PipelineConfig,
    "data.": DataConfig,
    "pretrain_data.": DataConfig,
    "model.": ModelConfig,
    "optimizer.": OptimizerConfig,
    "scheduler.": SchedulerConfig,
    "trainer.": TrainerConfig,
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
