"""The checks of a composed config: every declared key's type and range (the schema's
declarations, config/declare.py), then the checks that span several keys or look outside the
config (files, installed packages). Each failed check raises UserError with one line saying
what to fix (exit code 2), before the run writes anything.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.config.architecture import check_student_models
from pipeline.config.declare import check_declared
from pipeline.config.paths import CONF_DIR
from pipeline.config.pretraining import (
    check_pretrain_source,
    check_pretrained_students,
    has_own_weights,
    resolve_pretrain_source,
    runs_pretraining,
    uses_pretrained,
)
from pipeline.config.schema import (
    DECLARED,
    EXPORT_FORMATS,
    PREDICT_SUFFIXES,
    STAGES,
    unknown_keys,
)
from pipeline.config.trainer_keys import (
    PIPELINE_TRAINER_KEYS,
    TRAINER_ARGUMENTS,
    check_trainer_keys,
)
from pipeline.errors import UserError

__all__ = [  # the names other modules import from here
    "CONF_DIR",
    "PIPELINE_TRAINER_KEYS",
    "TRAINER_ARGUMENTS",
    "check_pretrain_source",
    "check_trainer_keys",
    "has_own_weights",
    "resolve_pretrain_source",
    "runs_pretraining",
    "uses_pretrained",
    "validate",
]

# A logger's `_target_` class name -> the package it needs and the extra that installs it.
LOGGER_PACKAGES = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "WandbLogger": (("wandb",), "wandb"),
}


def check_logger_packages(cfg: DictConfig) -> None:
    """Every logger of the `logger` group is a node with `_target_`, and its package is
    installed (else the pip command that installs it)."""
    import importlib.util

    loggers = cfg.logger
    if not loggers:
        return
    if not isinstance(loggers, DictConfig):
        raise UserError("logger must be a group choice: logger=none|csv|tensorboard|mlflow|wandb")
    for name, node in loggers.items():
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if not target:
            raise UserError(
                f"logger.{name} has no _target_ (a Lightning logger class); pick loggers with "
                "logger=csv|tensorboard|mlflow|wandb or logger=[csv,tensorboard]"
            )
        modules, extra = LOGGER_PACKAGES.get(str(target).rsplit(".", 1)[-1], ((), ""))
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(
                f"logger={name} needs the {modules[0]} package, which is not installed: "
                f"pip install -e '.[{extra}]' (in the repo; or pip install {modules[0]})"
            )


def validate(cfg: DictConfig) -> None:
    """Every check of a resolved config. Raises UserError with one line saying what to fix."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise UserError(
            f"unknown config key {', '.join(unknown)}; check the spelling "
            "(python -m pipeline --cfg job prints every key)"
        )
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage={cfg.stage!r}; choose one of {', '.join(STAGES)}")
    check_declared(cfg, DECLARED)  # each key's type and range
    check_pool_handling(cfg)
    ema = cfg.train.ema_decay
    if ema is not None and cfg.train.select == "best_val":
        # The val checkpoints would hold the raw weights, the round the averaged ones.
        raise UserError(
            f"train.ema_decay={ema} with train.select=best_val is not supported: the averaged "
            "weights are what each round keeps; pass train.select=last or train.ema_decay=null"
        )
    check_student_models(cfg)
    lpc = cfg.data.labels_per_class
    if lpc is None and cfg.data.name != "image_folder" and cfg.stage not in ("report",):
        raise UserError(
            "data.labels_per_class=null is only for data=image_folder; give a number per class"
        )
    check_trainer_keys(cfg.trainer)  # every trainer.* key is a Trainer argument or ours
    if cfg.model.weights and "weights" not in cfg.model.net:
        raise UserError(
            f"model={cfg.model.name} has no torchvision weights (model.weights="
            f"{cfg.model.weights}); use model=resnet18 model.weights=IMAGENET1K_V1, or "
            "pretrain_data=NAME / pretrain.ckpt=FILE"
        )
    if cfg.stage in ("pseudolabel", "evaluate", "finetune", "predict", "export") and not cfg.ckpt:
        raise UserError(f"stage={cfg.stage} needs a checkpoint: pass ckpt=PATH/model.ckpt")
    check_predict(cfg)
    check_export(cfg)
    if cfg.stage == "report" and not cfg.report.sweep_dir:
        raise UserError("stage=report needs report.sweep_dir=DIR (a multirun dir or a run_dir)")
    if uses_pretrained(cfg) and cfg.pretrain.ckpt and not Path(cfg.pretrain.ckpt).is_file():
        raise UserError(
            f"pretrain.ckpt={cfg.pretrain.ckpt} does not exist; pass a model.ckpt written by "
            "stage=pretrain (or leave it out to pretrain inside this run)"
        )
    check_pretrain_source(cfg)
    check_validation(cfg)
    check_logger_packages(cfg)
    check_pretrained_students(cfg)
    check_shard_patterns(cfg)


TRAINING_STAGES = ("selftrain", "train", "finetune", "baseline", "pretrain")


def has_val_split(data_cfg: DictConfig) -> bool:
    """Whether the data config gives a val set (data.val_per_class > 0, or data.val_dir)."""
    return bool(data_cfg.get("val_per_class") or 0) or bool(data_cfg.get("val_dir"))


def check_validation(cfg: DictConfig) -> None:
    """The val split's settings: carved from the label budget, one source, and there when
    train.select=best_val needs it."""
    for node in ("data", "pretrain_data"):
        data = cfg[node]
        if not isinstance(data, DictConfig):
            continue
        # .get: an unresolved pretrain_data=auto (no offline source) has only its two keys
        vpc, lpc = data.get("val_per_class") or 0, data.get("labels_per_class")
        if vpc and lpc is not None and vpc >= lpc:
            raise UserError(
                f"{node}.val_per_class={vpc} must be below {node}.labels_per_class={lpc}: the "
                "val images come out of the label budget and at least one label per class must "
                f"stay for training (e.g. {node}.labels_per_class={vpc + 4} {node}.val_per_class={vpc})"
            )
        if vpc and data.get("val_dir"):
            raise UserError(
                f"{node}.val_dir and {node}.val_per_class both give a val set; pass one of them "
                f"({node}.val_per_class=0 to use the folder)"
            )
    trains_on = cfg.pretrain_data if cfg.stage == "pretrain" else cfg.data
    trains = cfg.stage in TRAINING_STAGES
    if cfg.train.select == "best_val" and trains and not has_val_split(trains_on):
        node = "pretrain_data" if cfg.stage == "pretrain" else "data"
        raise UserError(
            f"train.select=best_val needs a val split: pass {node}.val_per_class=N (N val images "
            f"per class, out of {node}.labels_per_class) or {node}.val_dir=DIR, or train.select=last"
        )


def check_pool_handling(cfg: DictConfig) -> None:
    """data.open_set and the handling of a pool at selection (pseudo_label.dist_align, prior,
    soft_topk): the settings that go together (their values are declared in schema.py)."""
    pl, data = cfg.pseudo_label, cfg.data
    if (pl.dist_align == "given") != (pl.prior is not None):
        raise UserError(
            "pseudo_label.prior goes with pseudo_label.dist_align=given: pass both (a weight per "
            "class, e.g. pseudo_label.prior=[0.5,0.3,0.2]) or neither"
        )
    if pl.prior is not None and (min(pl.prior) < 0 or sum(pl.prior) <= 0):
        raise UserError(f"pseudo_label.prior={list(pl.prior)} needs weights >= 0 with a sum > 0")
    if pl.dist_align != "none" and pl.soft_topk is not None:
        raise UserError(
            "pseudo_label.dist_align re-weights every class's probability; drop "
            "pseudo_label.soft_topk (or pass pseudo_label.dist_align=none)"
        )
    open_set = data.get("open_set") or {}
    known = open_set.get("known_classes")
    if isinstance(known, bool) or (known is not None and not isinstance(known, int | ListConfig)):
        raise UserError(
            f"data.open_set.known_classes={known!r} must be an int K (classes 0..K-1), a list of "
            "class indices, or null"
        )
    classes = len(set(known)) if isinstance(known, ListConfig) else known
    if classes is None and not OmegaConf.is_missing(data, "num_classes"):
        classes = data.get("num_classes")
    if pl.prior is not None and classes is not None and len(pl.prior) != classes:
        raise UserError(
            f"pseudo_label.prior has {len(pl.prior)} weights for the network's {classes} classes "
            "(data.num_classes, or the known classes of data.open_set); give one per class"
        )
    if open_set.get("extra_pool") and known is None:
        raise UserError(
            "data.open_set.extra_pool adds foreign images to an open-set pool; pass "
            "data.open_set.known_classes too"
        )


def check_predict(cfg: DictConfig) -> None:
    """stage=predict: an input, and an out that is a table."""
    if cfg.stage != "predict":
        return
    if not cfg.input:
        raise UserError(
            "stage=predict needs input=DIR (a folder of images) or input=SHARDS (.tar files, "
            "e.g. 'input=/data/x-{000..009}.tar')"
        )
    if not cfg.out or not str(cfg.out).lower().endswith(PREDICT_SUFFIXES):
        raise UserError(
            f"stage=predict needs out=FILE ending in .csv or .parquet (got out={cfg.out})"
        )


def check_export(cfg: DictConfig) -> None:
    """stage=export: a known format."""
    if cfg.stage != "export":
        return
    if cfg.format not in EXPORT_FORMATS:
        raise UserError(
            f"stage=export needs format={' or format='.join(EXPORT_FORMATS)} (got format={cfg.format})"
        )


def check_shard_patterns(cfg: DictConfig) -> None:
    """Every brace pattern of tar shards (data.*_dir, input) expands: a malformed one (`{000..9`)
    is named here, before anything is written."""
    from braceexpand import UnbalancedBracesError, braceexpand

    dirs = ("labelled_dir", "unlabelled_dir", "test_dir", "val_dir")
    specs = {f"{node}.{k}": cfg[node].get(k) for node in ("data", "pretrain_data") for k in dirs}
    specs["input"] = cfg.input
    for name, spec in specs.items():
        items = list(spec) if isinstance(spec, ListConfig) else [spec]
        for item in (str(i) for i in items if i is not None):
            try:
                for part in item.split("::"):
                    next(iter(braceexpand(part)), None)
            except UnbalancedBracesError:
                raise UserError(
                    f"{name}={item} has unbalanced braces; write a brace pattern such as "
                    f"\"{name}='/data/pool-{{000..099}}.tar'\" (Hydra needs the inner quotes)"
                ) from None
