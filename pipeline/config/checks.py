"""The checks of a composed config that types cannot express, and the pretraining source.

Each failed check raises UserError with one line saying what to fix (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.config.architecture import check_student_models
from pipeline.config.paths import CONF_DIR
from pipeline.config.schema import (
    BALANCE_MODES,
    CONSISTENCY_METHODS,
    EXPORT_FORMATS,
    FINETUNE_MODES,
    OBJECTIVES,
    PREDICT_SUFFIXES,
    SELECT_MODES,
    unknown_keys,
)
from pipeline.errors import UserError
from pipeline.stages import STAGES

# The arguments of lightning.Trainer (2.6), listed here so that checking a config needs no
# Lightning import (tests/test_config.py checks the list against the installed Lightning).
TRAINER_ARGUMENTS = (
    "accelerator", "accumulate_grad_batches", "barebones", "benchmark", "callbacks",
    "check_val_every_n_epoch", "default_root_dir", "detect_anomaly", "deterministic", "devices",
    "enable_autolog_hparams", "enable_checkpointing", "enable_model_summary",
    "enable_progress_bar", "fast_dev_run", "gradient_clip_algorithm", "gradient_clip_val",
    "inference_mode", "limit_predict_batches", "limit_test_batches", "limit_train_batches",
    "limit_val_batches", "log_every_n_steps", "logger", "max_epochs", "max_steps", "max_time",
    "min_epochs", "min_steps", "model_registry", "num_nodes", "num_sanity_val_steps",
    "overfit_batches", "plugins", "precision", "profiler", "reload_dataloaders_every_n_epochs",
    "strategy", "sync_batchnorm", "use_distributed_sampler", "val_check_interval",
)  # fmt: skip
# trainer.* keys the pipeline reads itself; every other key is a Lightning Trainer argument.
PIPELINE_TRAINER_KEYS = ("num_threads", "compile", "channels_last")
# Trainer arguments the pipeline sets itself, and the setting to use instead.
SET_BY_PIPELINE = {
    "max_epochs": "train.epochs",
    "min_epochs": "train.epochs",
    "max_steps": "train.epochs and train.min_steps",
    "min_steps": "train.min_steps",
    "callbacks": "the pipeline's own callbacks",
    "plugins": "trainer.precision and the cluster settings",
    "logger": "the logger group (logger=csv|tensorboard|mlflow|wandb, or logger=[csv,tensorboard])",
    "limit_val_batches": "data.val_per_class or data.val_dir (the whole val split is evaluated)",
    "enable_checkpointing": "the pipeline's resume checkpoints",
    "enable_progress_bar": "progress=",
    "use_distributed_sampler": "the pipeline's rank-aware samplers",
    "default_root_dir": "run_dir=",
}


def check_trainer_keys(trainer_cfg: Any) -> None:
    """Every trainer.* key is a Lightning Trainer argument or one of the pipeline's own; an
    unknown one, or one the pipeline sets itself, is refused and never ignored."""
    for key in trainer_cfg:
        if key in PIPELINE_TRAINER_KEYS:
            continue
        if key in SET_BY_PIPELINE:
            raise UserError(
                f"trainer.{key} is set by the pipeline; use {SET_BY_PIPELINE[key]} instead"
            )
        if key not in TRAINER_ARGUMENTS:
            raise UserError(
                f"trainer.{key} is not a Lightning Trainer argument; check the spelling "
                "(see the arguments of lightning.Trainer)"
            )


# pretrain_data=auto: the offline source of each bundled target is the other bundled set.
AUTO_SOURCE = {"digits": "mnist5k", "mnist5k": "digits"}
# Sets that hold the same images: pretraining on one would leak the labels of the other.
SAME_IMAGES = ({"mnist", "mnist5k"},)


def uses_pretrained(cfg: DictConfig) -> bool:
    """Whether this run's models start from pretrained weights."""
    return cfg.stage == "baseline" or (
        cfg.stage in ("selftrain", "train") and cfg.init == "pretrained"
    )


def has_own_weights(model: DictConfig) -> bool:
    """Whether a model config brings its own pretrained weights: `model.weights` (torchvision
    enum, a local file) or timm's `model.pretrained=true`."""
    return bool(model.get("weights")) or bool(model.get("pretrained"))


def runs_pretraining(cfg: DictConfig) -> bool:
    """Whether this run trains on pretrain_data (stage=pretrain, or a stage that starts from
    pretrained weights without pretrain.ckpt or the model's own weights)."""
    if cfg.stage == "pretrain":
        return True
    return uses_pretrained(cfg) and not cfg.pretrain.ckpt and not has_own_weights(cfg.model)


def resolve_pretrain_source(cfg: DictConfig) -> None:
    """`pretrain_data=auto` becomes the other bundled set; every source is shaped (image_size,
    channels) and normalised (mean, std) like the target, so that the pretrained first layer
    sees the same input scale in both, and uses all of its labels (in place)."""
    if cfg.pretrain_data.get("name") == "auto":
        source = AUTO_SOURCE.get(cfg.data.name)
        if source is None:
            if runs_pretraining(cfg):
                raise UserError(
                    f"pretrain_data=auto has an offline source only for the bundled targets "
                    f"(digits <-> mnist5k); for data={cfg.data.name} pass pretrain_data=NAME "
                    "(any data= option but the target), pretrain.ckpt=FILE, or model=resnet18 "
                    "model.weights=IMAGENET1K_V1"
                )
            return
        # Composing a group inside a running app is not possible: read the two YAML files.
        node = OmegaConf.load(CONF_DIR / "data" / "digits.yaml")
        if source == "mnist5k":
            node = OmegaConf.merge(node, OmegaConf.load(CONF_DIR / "data" / "mnist5k.yaml"))
        node.pop("defaults", None)
        node.image_size = cfg.data.image_size
        node.channels = cfg.data.channels
        node.mean = list(cfg.data.mean)
        node.std = list(cfg.data.std)
        node.labels_per_class = None
        node.val_per_class = 0
        # What auto.yaml (or the command line, e.g. pretrain_data.labels_per_class=50) sets wins.
        given = OmegaConf.masked_copy(
            cfg.pretrain_data, [k for k in cfg.pretrain_data if k != "name"]
        )
        cfg.pretrain_data = OmegaConf.merge(node, given)


def check_pretrain_source(cfg: DictConfig) -> None:
    """Refuse a pretraining source that holds the target's own images: its labels would leak
    into the comparison (pretraining would see the target's unlabelled and test labels)."""
    if not runs_pretraining(cfg):
        return
    src, dst = cfg.pretrain_data, cfg.data
    same = src.name == dst.name or any({src.name, dst.name} <= group for group in SAME_IMAGES)
    if src.name == dst.name == "image_folder":
        dirs = ("labelled_dir", "unlabelled_dir", "test_dir")

        def paths(node: DictConfig) -> set[Path]:
            return {Path(str(node.get(k))).resolve() for k in dirs if node.get(k)}

        same = bool(paths(src) & paths(dst))
    if same:
        raise UserError(
            f"pretrain_data={src.name} holds the target's own images (data={dst.name}), which "
            "leaks the target's labels; pretrain on another set (pretrain_data=auto for the "
            "bundled sets, or pretrain_data=NAME) or pass pretrain.ckpt=FILE"
        )


# A logger's `_target_` class name -> the package it needs and the extra that installs it.
LOGGER_PACKAGES = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "WandbLogger": (("wandb",), "wandb"),
}


TRAINING_STAGES = ("selftrain", "train", "finetune", "baseline", "pretrain")


def has_val_split(data_cfg: DictConfig) -> bool:
    """Whether the data config gives a val set (data.val_per_class > 0, or data.val_dir)."""
    return bool(data_cfg.get("val_per_class") or 0) or bool(data_cfg.get("val_dir"))


def check_validation(cfg: DictConfig) -> None:
    """The val split's settings: carved from the label budget, one source, and there when
    train.select=best_val needs it."""
    if cfg.train.select not in SELECT_MODES:
        raise UserError(
            f"train.select={cfg.train.select!r}; choose one of {', '.join(SELECT_MODES)}"
        )
    if cfg.objective is not None and cfg.objective not in OBJECTIVES:
        raise UserError(
            f"objective={cfg.objective!r}; choose one of {', '.join(OBJECTIVES)} (or null)"
        )
    for node in ("data", "pretrain_data"):
        data = cfg.get(node)
        if not isinstance(data, DictConfig):
            continue
        vpc, lpc = data.get("val_per_class") or 0, data.get("labels_per_class")
        if vpc < 0:
            raise UserError(f"{node}.val_per_class={vpc} must be >= 0")
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


def check_logger_packages(cfg: DictConfig) -> None:
    """Every logger of the `logger` group is a node with `_target_`, and its package is
    installed (else the pip command that installs it)."""
    import importlib.util

    loggers = cfg.get("logger")
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


def _in_range(value: float, low: float, high: float) -> bool:
    return low <= value <= high


def validate(cfg: DictConfig) -> None:
    """The checks types cannot express. Raises UserError with one line saying what to fix."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise UserError(
            f"unknown config key {', '.join(unknown)}; check the spelling "
            "(python -m pipeline --cfg job prints every key)"
        )
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
    if pl.balance not in BALANCE_MODES:
        raise UserError(
            f"pseudo_label.balance={pl.balance!r}; choose one of {', '.join(BALANCE_MODES)} "
            "(cap: at most K per class, K = pseudo_label.max_per_class or the median class count; "
            "duplicate: also repeat the images of classes below K up to K)"
        )
    check_pool_handling(cfg)
    ema = cfg.train.get("ema_decay")
    if ema is not None and not 0.0 <= ema < 1.0:
        raise UserError(
            f"train.ema_decay={ema} is outside [0, 1); pass a decay such as 0.999, or null (off)"
        )
    if ema is not None and cfg.train.get("select") == "best_val":
        # The val checkpoints would hold the raw weights, the round the averaged ones.
        raise UserError(
            f"train.ema_decay={ema} with train.select=best_val is not supported: the averaged "
            "weights are what each round keeps; pass train.select=last or train.ema_decay=null"
        )
    if cfg.selftrain.rounds < 0:
        raise UserError(f"selftrain.rounds={cfg.selftrain.rounds} must be >= 0 (0: teacher only)")
    check_student_models(cfg)
    if cfg.data.get("decode_on", "workers") not in ("workers", "device"):
        raise UserError(f"data.decode_on={cfg.data.decode_on}; choose workers or device")
    lpc = cfg.data.get("labels_per_class")
    if lpc is not None and lpc < 1:
        raise UserError(f"data.labels_per_class={lpc} must be >= 1")
    if lpc is None and cfg.data.name != "image_folder" and cfg.stage not in ("report",):
        raise UserError(
            "data.labels_per_class=null is only for data=image_folder; give a number per class"
        )
    if cfg.train.batch_size < 1 or cfg.train.epochs < 0:
        raise UserError("train.batch_size must be >= 1 and train.epochs >= 0")
    every = cfg.train.get("checkpoint_every_s")
    if every is not None and every < 0:
        raise UserError(
            f"train.checkpoint_every_s={every} must be >= 0 (0: every step) or null (every epoch)"
        )
    check_trainer_keys(cfg.trainer)  # every trainer.* key is a Trainer argument or ours
    threads = cfg.trainer.get("num_threads")
    if threads is not None and (type(threads) is not int or threads < 1):
        raise UserError(f"trainer.num_threads={threads} must be a whole number >= 1 (or null)")
    if cfg.get("max_requeues", 0) < 0:
        raise UserError(f"max_requeues={cfg.max_requeues} must be >= 0 (0: never requeue)")
    if cfg.pseudo_label.tta_views < 0:
        raise UserError(f"pseudo_label.tta_views={cfg.pseudo_label.tta_views} must be >= 0")
    if cfg.init not in ("scratch", "pretrained"):
        raise UserError(f"init={cfg.init!r}; choose scratch or pretrained")
    if cfg.finetune.mode not in FINETUNE_MODES:
        raise UserError(
            f"finetune.mode={cfg.finetune.mode!r}; choose one of {', '.join(FINETUNE_MODES)}"
        )
    if cfg.finetune.lr_scale <= 0:
        raise UserError(f"finetune.lr_scale={cfg.finetune.lr_scale} must be > 0")
    decay = cfg.finetune.get("layer_decay")
    if decay is not None and not 0 < decay <= 1:
        raise UserError(
            f"finetune.layer_decay={decay} must be in (0, 1] (e.g. 0.75), or null for off"
        )
    if cfg.model.get("weights") and "weights" not in cfg.model.get("net", {}):
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
    check_consistency(cfg.consistency)


def check_consistency(c: DictConfig) -> None:
    """The online pseudo-labelling settings (consistency=...)."""
    if c.method not in CONSISTENCY_METHODS:
        raise UserError(
            f"consistency.method={c.method!r}; choose one of {', '.join(CONSISTENCY_METHODS)} "
            "(consistency=NAME picks a method with its settings)"
        )
    if c.mu < 1:
        raise UserError(f"consistency.mu={c.mu} must be >= 1 (pool images per training image)")
    if c.weight < 0:
        raise UserError(f"consistency.weight={c.weight} must be >= 0")
    if not _in_range(c.threshold, 0.0, 1.0):
        raise UserError(f"consistency.threshold={c.threshold} is outside [0, 1]; e.g. 0.95")
    if c.temperature <= 0:
        raise UserError(f"consistency.temperature={c.temperature} must be > 0 (1: hard labels)")
    if not 0.0 <= c.ema_momentum < 1.0:
        raise UserError(f"consistency.ema_momentum={c.ema_momentum} is outside [0, 1); e.g. 0.999")
    if c.mapping not in ("convex", "linear"):
        raise UserError(f"consistency.mapping={c.mapping!r}; choose convex or linear")
    if c.fairness_weight < 0 or c.n_sigma <= 0:
        raise UserError("consistency.fairness_weight must be >= 0 and consistency.n_sigma > 0")
    if c.randaugment_ops < 0 or not 0 <= c.randaugment_magnitude <= 30:
        raise UserError(
            "consistency.randaugment_ops must be >= 0 and consistency.randaugment_magnitude "
            "in [0, 30]"
        )
    if not _in_range(c.cutout, 0.0, 1.0):
        raise UserError(f"consistency.cutout={c.cutout} is outside [0, 1] (a side fraction)")


# pseudo_label.dist_align and pseudo_label.ood_score (pipeline/selftrain/select.py).
DIST_ALIGN_MODES = ("none", "labelled", "estimated", "given")
OOD_SCORES = ("none", "msp", "energy")
UNLABELLED_ORDERS = ("same", "reversed", "uniform")


def check_pool_handling(cfg: DictConfig) -> None:
    """data.imbalance, data.open_set and their handling at selection (pseudo_label.dist_align,
    prior, rebalance_alpha, ood_score, ood_quantile): known values and ranges."""
    pl, data = cfg.pseudo_label, cfg.data
    if pl.dist_align not in DIST_ALIGN_MODES:
        raise UserError(
            f"pseudo_label.dist_align={pl.dist_align!r}; choose one of {', '.join(DIST_ALIGN_MODES)}"
        )
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
    if pl.rebalance_alpha is not None and pl.rebalance_alpha < 0:
        raise UserError(f"pseudo_label.rebalance_alpha={pl.rebalance_alpha} must be >= 0 or null")
    if pl.ood_score not in OOD_SCORES:
        raise UserError(
            f"pseudo_label.ood_score={pl.ood_score!r}; choose one of {', '.join(OOD_SCORES)}"
        )
    if not 0.0 <= pl.ood_quantile < 1.0:
        raise UserError(f"pseudo_label.ood_quantile={pl.ood_quantile} is outside [0, 1)")
    imbalance = data.get("imbalance") or {}
    for key in ("labelled_ratio", "unlabelled_ratio"):
        ratio = imbalance.get(key)
        if ratio is not None and (isinstance(ratio, bool) or ratio < 1):
            raise UserError(
                f"data.imbalance.{key}={ratio} must be >= 1 (max/min class count) or null"
            )
    order = imbalance.get("unlabelled_order", "same")
    if order not in UNLABELLED_ORDERS:
        raise UserError(
            f"data.imbalance.unlabelled_order={order!r}; choose one of {', '.join(UNLABELLED_ORDERS)}"
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
    """stage=predict: an input, an out that is a table, sane predict.* settings."""
    p = cfg.predict
    if isinstance(p.topk, bool) or p.topk < 1:
        raise UserError(f"predict.topk={p.topk} must be >= 1 (the number of top classes listed)")
    if p.tta_views < 0:
        raise UserError(f"predict.tta_views={p.tta_views} must be >= 0")
    if p.shard_size < 1:
        raise UserError(f"predict.shard_size={p.shard_size} must be >= 1")
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


def check_pretrained_students(cfg: DictConfig) -> None:
    """init=pretrained with students of another architecture than `model`: each architecture
    is pretrained inside the run on pretrain_data; a single pretrain.ckpt, or torchvision's
    weights of `model`, cannot start them."""
    if cfg.stage != "selftrain" or cfg.init != "pretrained":
        return
    from pipeline.config.architecture import round_names

    others = sorted({n for n in round_names(cfg)[1:] if n != cfg.model.name})
    if not others:
        return
    if cfg.pretrain.ckpt:
        raise UserError(
            f"init=pretrained with pretrain.ckpt={cfg.pretrain.ckpt} (one architecture) and "
            f"students of model={', '.join(others)}: they cannot start from it; leave "
            "pretrain.ckpt out (each architecture is then pretrained on pretrain_data) or train "
            f"students of model={cfg.model.name}"
        )
    if cfg.pretrain_data.get("name") == "auto":
        raise UserError(
            f"init=pretrained with students of model={', '.join(others)} pretrains them on "
            f"pretrain_data, which has no offline source for data={cfg.data.name}; pass "
            "pretrain_data=NAME"
        )
