"""Building the configured network, and the pipeline's model checkpoints: what they record about
themselves, how they load (weights_only=True, architecture and class count checked)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from pipeline.config.specs import DataSpec, RunSpec
from pipeline.errors import UserError
from pipeline.models.finetune import freeze_for_finetune, load_pretrained, reset_head
from pipeline.runtime.io import load_checkpoint

log = logging.getLogger("pipeline")


def hparams_for(
    cfg: RunSpec, data: DataSpec, num_classes: int, classes: list[str] | None = None
) -> dict[str, Any]:
    """What a checkpoint records about itself, enough to use it without a dataset config
    (stage=predict, stage=export, load_model): the architecture (`model`, with `net._target_`),
    the class names (index = label), the input it expects (`in_channels`, `image_size`, the
    normalisation `mean` and `std` of [0, 1] pixels), the pipeline version and the resolved
    training config. Plain containers only: the checkpoint loads with weights_only=True."""
    from pipeline import __version__

    names = [str(c) for c in classes] if classes is not None else None
    if names is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    size = data.image_size
    # Copies: the checkpoint owns its record, whatever later changes the spec's containers.
    return {
        "model": copy.deepcopy(cfg.model.node),
        "dataset": str(data.name),
        "num_classes": int(num_classes),
        "in_channels": int(data.channels),
        "image_size": int(size) if size is not None else None,
        "classes": names or [str(i) for i in range(int(num_classes))],
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        "augment": copy.deepcopy(data.augment) if data.augment else None,
        "pipeline_version": __version__,
        "config": copy.deepcopy(cfg.config),
    }


def build_net(cfg: RunSpec, num_classes: int) -> torch.nn.Module:
    """The configured network (`model.net`) for `num_classes`; a constructor's UserError (an
    unknown zoo name, weights that cannot be fetched) stays one, not Hydra's wrapper of it."""
    try:
        return instantiate(cfg.model.net, num_classes=num_classes)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def recorded_model(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The model config a checkpoint of this pipeline records (None: a foreign checkpoint)."""
    model = (ckpt.get("hyper_parameters") or {}).get("model")
    if isinstance(model, dict) and isinstance(model.get("net"), dict):
        return model
    return None


def build_recorded_net(model: dict[str, Any], num_classes: int, what: str) -> torch.nn.Module:
    """The network a checkpoint names, built without running anything else it might name: the
    target must be one of the pipeline's networks (`pipeline.models.NAME`), its arguments plain
    values; no pretrained weights are fetched (torchvision's or timm's: the checkpoint's own
    weights replace them, so a zoo network rebuilds without a network)."""
    import pipeline.models as networks

    net = model["net"]
    target = str(net.get("_target_", ""))
    module, _, name = target.rpartition(".")
    if module != networks.__name__ or name not in networks.NETWORKS:
        known = ", ".join(f"{networks.__name__}.{n}" for n in networks.NETWORKS)
        raise UserError(
            f"{what} names the network {target!r}, which is not one of the pipeline's "
            f"({known}); refusing to build it"
        )
    kwargs = {k: v for k, v in net.items() if not str(k).startswith("_")}
    if any(isinstance(v, dict) for v in kwargs.values()):
        raise UserError(f"{what} gives {target} a nested argument; expected plain values")
    kwargs.update({k: v for k, v in networks.OFFLINE_REBUILD.items() if k in kwargs})
    kwargs["num_classes"] = num_classes
    return getattr(networks, name)(**kwargs)


def refuse_other_model(
    cfg: RunSpec, ckpt: dict[str, Any], what: str, hint: str = "", this: str = "this run has"
) -> None:
    """A checkpoint of another architecture than cfg.model cannot load: say which to pass."""
    made_with = (recorded_model(ckpt) or {}).get("name")
    if made_with and made_with != cfg.model.name:
        raise UserError(
            f"{what} is a model={made_with}, {this} model={cfg.model.name}; "
            f"pass model={made_with}{hint}"
        )


def load_net(
    cfg: RunSpec, ckpt_path: str | Path, num_classes: int, channels: int | None = None
) -> torch.nn.Module:
    """The network a checkpoint names (its recorded model config: a round's teacher may be
    another architecture than cfg.model), with the checkpoint's weights; a checkpoint that records
    no model is loaded into cfg.model. Refuses a checkpoint made for another class count or
    number of input channels (default: cfg.data.channels) with a line that says which."""
    ckpt = load_checkpoint(ckpt_path)
    hp = ckpt.get("hyper_parameters", {}) or {}
    if hp.get("num_classes") not in (None, num_classes):
        raise UserError(
            f"checkpoint {ckpt_path} predicts {hp['num_classes']} classes, the data has "
            f"{num_classes}; use a checkpoint trained on this dataset (or stage=finetune)"
        )
    channels = int(cfg.data.channels) if channels is None else channels
    if hp.get("in_channels") not in (None, channels):
        raise UserError(
            f"checkpoint {ckpt_path} takes {hp['in_channels']}-channel images, the data has "
            f"{channels}; use a checkpoint trained on images like these"
        )
    model = recorded_model(ckpt)
    if model is not None:
        name = model.get("name")
        if name != cfg.model.name:
            log.info("%s is a model=%s: built as it names", ckpt_path, name)
        net = build_recorded_net(model, num_classes, f"checkpoint {ckpt_path}")
    else:
        name = cfg.model.name
        net = build_net(cfg, num_classes)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise UserError(
            f"checkpoint {ckpt_path} does not fit model={name} ({first[:150]})"
        ) from None
    return net


def checkpoint_model_name(ckpt_path: str | Path) -> str | None:
    """The architecture a checkpoint names (None: it records none)."""
    return (recorded_model(load_checkpoint(ckpt_path)) or {}).get("name")


def model_checkpoint(net: torch.nn.Module, hparams: dict[str, Any], extra: dict) -> dict:
    """A round's final weights as a checkpoint: Lightning-compatible keys, tensors and plain
    containers only (loadable with weights_only=True)."""
    return {
        "state_dict": {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()},
        "hyper_parameters": hparams,
        "pytorch-lightning_version": L.__version__,
        "pipeline": extra,
    }


def init_from_pretrained(cfg: RunSpec, net: torch.nn.Module, ckpt_path: Path) -> list[str]:
    """Start `net` from pretrained weights for fine-tuning: every backbone layer loads (a clear
    error names those that cannot), the head is new. A new head also when the class count
    matches: the source's classes are not the target's (Zoph et al. fine-tune a new head)."""
    ckpt = load_checkpoint(ckpt_path)
    refuse_other_model(
        cfg,
        ckpt,
        f"pretrained checkpoint {ckpt_path}",
        f" or pretrain with model={cfg.model.name}",
        this="the network to start from it is a",
    )
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    try:
        recreated = load_pretrained(net, state, name=str(cfg.model.name))
    except UserError as e:
        raise UserError(f"pretrained {e} ({ckpt_path})") from None
    reset_head(net)
    source = (ckpt.get("pipeline") or {}).get("pretrain_source") or ckpt_path
    log.info(
        "starting from %s: backbone loaded, new head (%d classes)%s",
        source,
        net.head.out_features,
        " re-created for another class count" if recreated else "",
    )
    return sorted(set(recreated) | {k for k in net.state_dict() if k.startswith("head.")})


def finetune_setup(cfg: RunSpec, net: torch.nn.Module) -> tuple[float, list[torch.nn.Module]]:
    """The transfer mode of the fine-tuning: backbone lr factor and the modules kept frozen."""
    frozen = freeze_for_finetune(net, cfg.finetune.mode, cfg.finetune.trainable_blocks)
    return cfg.finetune.lr_scale, frozen
