"""Typed specs built once from the composed config: what the building blocks take instead of the
whole config.

The CLI (`cli.run_stage`) calls `run_spec` once per job, on the plain values the run dir has
recorded (the one conversion from OmegaConf), and hands the spec to the stage's
recipe (pipeline/stages.py); everything below reads frozen dataclasses. The typed sections
(train, pseudo_label, ...) mirror the schema's dataclasses field for field (their one set of
defaults is the schema's). The free-form groups keep their own keys as plain values: the model's
network node and the optimizer, scheduler and logger nodes (`_target_` and its arguments:
hydra.utils.instantiate takes plain dicts), the trainer's Lightning arguments, and each data
option's node (what its loader reads).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config.architecture import round_model_node
from pipeline.config.files import plain
from pipeline.config.pretraining import has_own_weights
from pipeline.config.schema import (
    DataConfig,
    FinetuneConfig,
    PredictConfig,
    PretrainConfig,
    PseudoLabelConfig,
    ReportConfig,
    SelfTrainConfig,
    TrainConfig,
)
from pipeline.consistency import ConsistencySpec


@dataclass(frozen=True)
class TrainSpec:
    """train.*: epochs, batches and what a training keeps (schema.TrainConfig)."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    min_steps: int
    label_smoothing: float
    logit_adjust: float
    checkpoint_every_s: float | None
    select: str
    ema_decay: float | None


@dataclass(frozen=True)
class PseudoLabelSpec:
    """pseudo_label.*: labelling, selection and balancing (schema.PseudoLabelConfig)."""

    threshold: float
    max_per_class: int | None
    balance: str
    tta_views: int
    soft: bool
    temperature: float
    weight: float
    labelled_fraction: float
    soft_topk: int | None
    shard: int | None
    num_shards: int | None
    shard_size: int
    dist_align: str
    prior: list[float] | None
    rebalance_alpha: float | None
    ood_score: str
    ood_quantile: float


@dataclass(frozen=True)
class PredictSpec:
    """predict.* (stage=predict)."""

    topk: int
    tta_views: int
    shard_size: int


@dataclass(frozen=True)
class SelfTrainSpec:
    """selftrain.*: rounds after the teacher, the students' architectures."""

    rounds: int
    student_models: list[str] | None


@dataclass(frozen=True)
class PretrainSpec:
    """pretrain.*: a given checkpoint, the pretraining's epochs and its shared cache."""

    ckpt: str | None
    epochs: int
    cache_dir: str | None


@dataclass(frozen=True)
class FinetuneSpec:
    """finetune.*: how pretrained weights are trained on."""

    mode: str
    lr_scale: float
    trainable_blocks: int
    layer_decay: float | None


@dataclass(frozen=True)
class ReportSpec:
    """report.*: the sweep stage=report summarises."""

    sweep_dir: str | None


@dataclass(frozen=True)
class DataSpec:
    """One data option (data= or pretrain_data=): the keys the pipeline reads, typed, and the
    whole node as plain values (`node`: what the option's loader reads, e.g. data.root or
    data.labelled_dir). A declared key an option leaves out takes schema.DataConfig's default."""

    name: str
    num_classes: int
    channels: int
    image_size: int | None
    labels_per_class: int | None
    val_per_class: int
    on_bad_image: str
    num_workers: int | str
    decode_on: str
    cache_dir: str | None
    mean: list[float]
    std: list[float]
    # null: no augmentation (no noise, no test-time views); else the option's ranges as given
    augment: dict[str, Any] | None
    node: dict[str, Any]

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> DataSpec:
        """The spec of a plain data node."""
        node = dict(node)
        defaults = {f.name: _default(f) for f in dataclasses.fields(DataConfig)}
        values = {
            f.name: node.get(f.name, defaults.get(f.name))
            for f in dataclasses.fields(cls)
            if f.name != "node"
        }
        values["augment"] = node.get("augment") or None
        return cls(**values, node=node)


@dataclass(frozen=True)
class ModelSpec:
    """A model option (model= or a student's): its name, its network node (`_target_` and the
    arguments, plain values), `cache_features`, and the whole node (`node`: what a checkpoint
    records as `hyper_parameters.model`)."""

    name: str
    net: dict[str, Any]
    cache_features: bool
    node: dict[str, Any]

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> ModelSpec:
        node = dict(node)
        return cls(
            name=str(node["name"]),
            net=dict(node["net"]),
            cache_features=bool(node.get("cache_features", False)),
            node=node,
        )

    @property
    def own_weights(self) -> bool:
        """Whether it brings its own pretrained weights (model.weights, timm's pretrained)."""
        return has_own_weights(self.node)

    @property
    def weights(self) -> Any:
        return self.node.get("weights")

    @property
    def zoo(self) -> str | None:
        return self.node.get("zoo")


@dataclass(frozen=True)
class TrainerSpec:
    """trainer.*: the keys the pipeline reads, and every argument as given (`args`: what
    engine/trainer.py passes to Lightning's Trainer, the pipeline's own keys left out there)."""

    accelerator: str
    compile: bool
    precision: Any
    num_threads: int | None
    args: dict[str, Any]

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> TrainerSpec:
        node = dict(node)
        return cls(
            accelerator=str(node.get("accelerator", "auto")),
            compile=bool(node.get("compile", False)),
            precision=node.get("precision"),
            num_threads=node.get("num_threads"),
            args=node,
        )


@dataclass(frozen=True)
class RunSpec:
    """One job's settings, resolved and typed. `config` is the whole resolved config as plain
    values, made once: what a checkpoint's `hyper_parameters.config`, the loggers' parameters
    and the pretraining cache's key record."""

    stage: str
    seed: int
    run_dir: str | None
    init: str
    ckpt: str | None
    out: str | None
    input: Any
    format: str | None
    pseudo_in: str | None
    progress: bool
    data: DataSpec
    pretrain_data: DataSpec
    model: ModelSpec
    trainer: TrainerSpec
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    logger: dict[str, Any]
    train: TrainSpec
    pseudo_label: PseudoLabelSpec
    consistency: ConsistencySpec
    predict: PredictSpec
    selftrain: SelfTrainSpec
    pretrain: PretrainSpec
    finetune: FinetuneSpec
    report: ReportSpec
    config: dict[str, Any]

    def for_round(self, k: int) -> RunSpec:
        """The spec of self-training round k: `model` (and config's `model`) set to the
        network config/architecture.py names for the round; the run's own spec otherwise."""
        node = round_model_node(self.config, k)
        if node is self.config["model"]:
            return self
        return dataclasses.replace(
            self, model=ModelSpec.of(node), config={**self.config, "model": copy.deepcopy(node)}
        )

    def round_model(self, k: int) -> ModelSpec:
        """The network round k trains (0: the teacher)."""
        return self.for_round(k).model


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _section(cls: type, node: Mapping[str, Any]) -> Any:
    """A typed section's spec: the schema guarantees every field is in the composed node."""
    return cls(**{f.name: node[f.name] for f in dataclasses.fields(cls)})


def run_spec(cfg: DictConfig | Mapping[str, Any]) -> RunSpec:
    """The job's RunSpec, from the composed (resolved, validated) config."""
    values = plain(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    return RunSpec(
        stage=str(values["stage"]),
        seed=int(values["seed"]),
        run_dir=values["run_dir"],
        init=str(values["init"]),
        ckpt=values["ckpt"],
        out=values["out"],
        input=values["input"],
        format=values["format"],
        pseudo_in=values["pseudo_in"],
        progress=bool(values["progress"]),
        data=DataSpec.of(values["data"]),
        pretrain_data=DataSpec.of(values["pretrain_data"]),
        model=ModelSpec.of(values["model"]),
        trainer=TrainerSpec.of(values["trainer"]),
        optimizer=dict(values["optimizer"]),
        scheduler=dict(values["scheduler"]) if values["scheduler"] else None,
        logger=dict(values["logger"] or {}),
        train=_section(TrainSpec, values["train"]),
        pseudo_label=_section(PseudoLabelSpec, values["pseudo_label"]),
        consistency=consistency_spec(values),
        predict=_section(PredictSpec, values["predict"]),
        selftrain=_section(SelfTrainSpec, values["selftrain"]),
        pretrain=_section(PretrainSpec, values["pretrain"]),
        finetune=_section(FinetuneSpec, values["finetune"]),
        report=_section(ReportSpec, values["report"]),
        config=values,
    )


def consistency_spec(config: DictConfig | Mapping[str, Any]) -> ConsistencySpec:
    """The run's online pseudo-labelling settings (`consistency=`)."""
    node = config["consistency"]
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return ConsistencySpec(**node)  # type: ignore[arg-type]


# The sections mirrored field for field (tests/test_specs.py checks they stay in step).
MIRRORED = {
    TrainSpec: TrainConfig,
    PseudoLabelSpec: PseudoLabelConfig,
    PredictSpec: PredictConfig,
    SelfTrainSpec: SelfTrainConfig,
    PretrainSpec: PretrainConfig,
    FinetuneSpec: FinetuneConfig,
    ReportSpec: ReportConfig,
}
