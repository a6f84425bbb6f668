"""The checks of a composed config that types cannot express, and the pretraining source.

Each failed check raises UserError with one line saying what to fix (exit code 2).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config.architecture import check_student_models
from pipeline.config.schema import BALANCE_MODES, FINETUNE_MODES, unknown_keys
from pipeline.errors import UserError
from pipeline.stages import STAGES

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


# pretrain_data=auto: the offline source of each bundled target is the other bundled set.
AUTO_SOURCE = {"digits": "mnist5k", "mnist5k": "digits"}
# Sets that hold the same images: pretraining on one would leak the labels of the other.
SAME_IMAGES = ({"mnist", "mnist5k"},)


def uses_pretrained(cfg: DictConfig) -> bool:
    """Whether this run's models start from pretrained weights."""
    return cfg.stage == "baseline" or (
        cfg.stage in ("selftrain", "train") and cfg.init == "pretrained"
    )


def runs_pretraining(cfg: DictConfig) -> bool:
    """Whether this run trains on pretrain_data (stage=pretrain, or a stage that starts from
    pretrained weights without pretrain.ckpt or torchvision's model.weights)."""
    if cfg.stage == "pretrain":
        return True
    return uses_pretrained(cfg) and not cfg.pretrain.ckpt and cfg.model.get("weights") is None


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
    ema = cfg.train.get("ema_decay")
    if ema is not None and not 0.0 <= ema < 1.0:
        raise UserError(
            f"train.ema_decay={ema} is outside [0, 1); pass a decay such as 0.999, or null (off)"
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
    from pipeline.engine.trainer import trainer_arguments  # imports Lightning

    trainer_arguments(cfg.trainer)  # every trainer.* key is a Trainer argument or ours
    threads = cfg.trainer.get("num_threads")
    if threads is not None and (type(threads) is not int or threads < 1):
        raise UserError(f"trainer.num_threads={threads} must be a whole number >= 1 (or null)")
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
    if cfg.model.get("weights") and "weights" not in cfg.model.get("net", {}):
        raise UserError(
            f"model={cfg.model.name} has no torchvision weights (model.weights="
            f"{cfg.model.weights}); use model=resnet18 model.weights=IMAGENET1K_V1, or "
            "pretrain_data=NAME / pretrain.ckpt=FILE"
        )
    if cfg.stage in ("pseudolabel", "evaluate", "finetune") and not cfg.ckpt:
        raise UserError(f"stage={cfg.stage} needs a checkpoint: pass ckpt=PATH/model.ckpt")
    if cfg.stage == "report" and not cfg.report.sweep_dir:
        raise UserError("stage=report needs report.sweep_dir=DIR (a multirun dir or a run_dir)")
    if uses_pretrained(cfg) and cfg.pretrain.ckpt and not Path(cfg.pretrain.ckpt).is_file():
        raise UserError(
            f"pretrain.ckpt={cfg.pretrain.ckpt} does not exist; pass a model.ckpt written by "
            "stage=pretrain (or leave it out to pretrain inside this run)"
        )
    check_pretrain_source(cfg)
    check_pretrained_students(cfg)


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
