"""Where pretrained weights come from: `init=pretrained`, `pretrain_data=auto`, and the
refusal of a source that holds the target's own images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config.paths import CONF_DIR
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config.specs import RunSpec

# pretrain_data=auto: the offline source of each bundled target is the other bundled set.
AUTO_SOURCE = {"digits": "mnist5k", "mnist5k": "digits"}
# Sets that hold the same images: pretraining on one would leak the labels of the other.
SAME_IMAGES = ({"mnist", "mnist5k"},)


def uses_pretrained(cfg: DictConfig | RunSpec) -> bool:
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
    if cfg.pretrain_data.name == "auto":
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
    if cfg.pretrain_data.name == "auto":
        raise UserError(
            f"init=pretrained with students of model={', '.join(others)} pretrains them on "
            f"pretrain_data, which has no offline source for data={cfg.data.name}; pass "
            "pretrain_data=NAME"
        )


def data_option(name: str, what: str) -> dict[str, Any]:
    """conf/data/NAME.yaml merged over the files its defaults list names (as Hydra composes
    it; composing a group inside a running app is not possible), as plain values. `what`
    names the key that asked for it, in the error for an unknown option."""
    return OmegaConf.to_container(_data_yaml(name, what), resolve=True)  # type: ignore[return-value]


def _data_yaml(name: str, what: str) -> DictConfig:
    path = CONF_DIR / "data" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"{what}={name} is not a data= option (conf/data/)")
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for base in node.pop("defaults", None) or []:
        if base != "_self_":
            merged = OmegaConf.merge(merged, _data_yaml(str(base), what))
    return OmegaConf.merge(merged, node)  # type: ignore[return-value]
