"""Typed settings of the pipeline (checked by Hydra at start-up) and the checks Hydra cannot do.

The groups that pick objects (data, model, trainer, optimizer, scheduler) stay free-form YAML
with `_target_`; the pipeline's own knobs are dataclasses, so a typo or a wrong type fails early.
"""

from __future__ import annotations

import dataclasses
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
    "trainer.num_threads",
    "data.num_workers",
    "data.root",
    "data.download",
    "pretrain_data.num_workers",
    "pretrain_data.root",
    "pretrain_data.download",
    "pretrain.cache_dir",
    "report",
)
# Settings a pretraining run does not read (the target's, and what comes after pretraining):
# two runs that differ only in these share one pretrained checkpoint through pretrain.cache_dir.
NOT_READ_BY_PRETRAINING = (
    "data",
    "stage",
    "init",
    "ckpt",
    "pseudo_in",
    "selftrain",
    "finetune",
    "train.epochs",
    "pseudo_label.threshold",
    "pseudo_label.max_per_class",
    "pseudo_label.soft",
    "pseudo_label.temperature",
    "pseudo_label.weight",
    "pretrain.ckpt",
    "experiment",
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
    tta_views: int = 8
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
        conf_dir = Path(__file__).resolve().parent.parent / "conf"
        node = OmegaConf.load(conf_dir / "data" / "digits.yaml")
        if source == "mnist5k":
            node = OmegaConf.merge(node, OmegaConf.load(conf_dir / "data" / "mnist5k.yaml"))
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


def pretrain_key(cfg: DictConfig) -> str:
    """A name for the pretraining this run does: the source, the seed, and a digest of every
    setting the pretraining reads (anything not known to be unread counts, so a new setting can
    only cause a cache miss, never a wrong hit)."""
    keys = {
        k: v
        for k, v in result_keys(cfg).items()
        if not any(k == n or k.startswith(n + ".") for n in NOT_READ_BY_PRETRAINING)
    }
    digest = hashlib.sha1(repr(sorted(keys.items())).encode()).hexdigest()[:12]
    return f"{cfg.pretrain_data.name}-seed{cfg.seed}-{digest}"


def differing_keys(old: DictConfig, new: DictConfig) -> list[str]:
    a, b = result_keys(old), result_keys(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
