"""Transfer helpers: load pretrained weights into a network, freeze parts of it, new head, the
optimizer's parameter groups (body lr factor, layer-wise lr decay)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.config.schema import FINETUNE_MODES
from pipeline.config.specs import RunSpec
from pipeline.errors import UserError

log = logging.getLogger("pipeline")
# The stages whose trainings can take model.cache_features (pretraining trains its body).
CACHED_STAGES = ("selftrain", "train", "finetune", "baseline")


def _shape(t: object) -> str:
    shape = getattr(t, "shape", None)
    return "(?)" if shape is None else "(" + ",".join(str(s) for s in shape) + ")"


def load_pretrained(
    net: nn.Module, state_dict: Mapping[str, Tensor], *, name: str | None = None
) -> list[str]:
    """Copy a checkpoint's tensors into ``net``; returns the head keys left freshly initialised.

    Every parameter and buffer must match by name and shape, except ``head.*`` keys whose shape
    differs (another number of classes) or that the checkpoint lacks: those keep ``net``'s own
    init and are returned. Anything else that does not fit (missing, other shape, extra key)
    raises UserError naming up to five such layers. ``name`` is the model name used in that
    message (default: the class name). Nothing is changed in ``net`` when it raises.
    """
    label = name or type(net).__name__
    own = net.state_dict()
    recreated: list[str] = []
    problems: list[str] = []
    for key, target in own.items():
        is_head = key.startswith("head.")
        if key not in state_dict:
            if is_head:
                recreated.append(key)
            else:
                problems.append(f"{key} missing from the checkpoint")
            continue
        source = state_dict[key]
        if getattr(source, "shape", None) != target.shape:
            if is_head and isinstance(source, Tensor):
                recreated.append(key)
            else:
                problems.append(f"{key} checkpoint {_shape(source)} vs model {_shape(target)}")
    problems += [f"{key} not in the model" for key in state_dict if key not in own]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise UserError(
            f"checkpoint does not fit model={label} (it is for another architecture or another "
            f"in_channels): {shown}; use a checkpoint trained with the same model="
        )
    wanted = {k: v for k, v in state_dict.items() if k not in recreated}
    result = net.load_state_dict(wanted, strict=False)
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(recreated)
    return recreated


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def freeze_for_finetune(net: nn.Module, mode: str, trainable_blocks: int = 1) -> list[nn.Module]:
    """Set ``requires_grad`` for a fine-tuning mode; returns the BatchNorm modules now frozen.

    - ``full``: everything trainable; returns ``[]``.
    - ``linear``: only ``net.head`` trains; returns every BatchNorm of ``net.features``.
    - ``last_layers``: the last ``trainable_blocks`` entries of ``net.blocks()`` and the head
      train, the earlier blocks are frozen; returns the BatchNorms inside the frozen blocks.

    The caller keeps the returned modules in eval mode so their running statistics stay put.
    """
    if mode not in FINETUNE_MODES:
        raise UserError(f"unknown fine-tune mode {mode!r}; use one of: {', '.join(FINETUNE_MODES)}")
    for p in net.parameters():
        p.requires_grad_(True)
    if mode == "full":
        return []
    if mode == "linear":
        for p in net.features.parameters():
            p.requires_grad_(False)
        return _batchnorms(net.features)
    blocks = net.blocks()
    n = len(blocks)
    if isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int):
        raise UserError(
            f"trainable_blocks must be an integer in [0, {n}], got {trainable_blocks!r}"
        )
    if not 0 <= trainable_blocks <= n:
        raise UserError(
            f"trainable_blocks={trainable_blocks} is out of range for {type(net).__name__}, "
            f"which has {n} blocks; use a value in [0, {n}]"
        )
    trainable = blocks[n - trainable_blocks :]
    keep = {id(p) for b in trainable for p in b.parameters()}
    for p in net.features.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    keep_bn = {id(m) for b in trainable for m in _batchnorms(b)}
    return [m for m in _batchnorms(net.features) if id(m) not in keep_bn]


def param_groups(
    net: nn.Module, lr_scale: float = 1.0, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups (trainable parameters only), each with the factor
    ``"lr_scale"`` its learning rate is multiplied by (engine/module.py applies it).

    - ``layer_decay=None``: one group (body, then head) when ``lr_scale == 1``, else two: the
      body at ``lr_scale``, the head at 1 (as configure_optimizers always made them).
    - ``layer_decay=d``: layer-wise decay as in ViT fine-tuning (BEiT, MAE): block i of the
      n blocks of ``net.blocks()`` (i = 0 the stem, input first) at ``lr_scale * d ** (n - i)``,
      the head at ``d ** 0 = 1``; blocks without trainable parameters give no group. With
      ``finetune.lr_scale=1`` this is exactly those papers' rule.
    """
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if n.startswith("head.")]
    body = [p for n, p in trainable if not n.startswith("head.")]
    if layer_decay is None:
        if lr_scale == 1.0:
            return [{"params": body + head, "lr_scale": 1.0}]
        return [{"params": body, "lr_scale": float(lr_scale)}, {"params": head, "lr_scale": 1.0}]
    blocks = net.blocks()
    n = len(blocks)
    position = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    if any(id(p) not in position for p in body):  # (every network's blocks cover its body)
        raise ValueError(f"{type(net).__name__}.blocks() do not hold every body parameter")
    groups = []
    for i in range(n):
        params = [p for p in body if position[id(p)] == i]
        if params:
            groups.append({"params": params, "lr_scale": float(lr_scale * layer_decay ** (n - i))})
    return [*groups, {"params": head, "lr_scale": 1.0}]


def reset_head(net: nn.Module) -> None:
    """Re-initialise ``net.head`` in place, the same init a new ``nn.Linear`` of that shape gets.

    The Parameter objects (and their ``requires_grad``) stay the same, so an optimizer built
    before still points at them.
    """
    net.head.reset_parameters()


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` numbers of parameter elements."""
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def check_cache_features(cfg: RunSpec) -> bool:
    """Whether this run trains heads on cached features (`model.cache_features` of any round's
    network); refuses it (UserError) where a body would train or where augmentation is the
    method itself, and says once what it turns off."""
    from pipeline.config.checks import uses_pretrained

    rounds = cfg.selftrain.rounds if cfg.stage == "selftrain" else 0
    models = [cfg.round_model(k) for k in range(rounds + 1)]
    cached = [m for m in models if m.cache_features]
    if not cached or cfg.stage not in CACHED_STAGES:
        return False
    if cfg.finetune.mode != "linear":
        raise UserError(
            f"model.cache_features=true needs a frozen body, and finetune.mode={cfg.finetune.mode} "
            "trains it; pass finetune.mode=linear, or model.cache_features=false"
        )
    pretrained = uses_pretrained(cfg) or cfg.stage == "finetune"
    unfrozen = [str(m.name) for m in cached if not (pretrained or m.own_weights)]
    if unfrozen:
        raise UserError(
            f"model.cache_features=true needs pretrained weights to freeze, and model="
            f"{unfrozen[0]} trains from scratch here; pass init=pretrained (or stage=baseline, "
            "model.weights=..., timm's model.pretrained=true), or model.cache_features=false"
        )
    if cfg.consistency.method != "none":
        raise UserError(
            f"consistency={cfg.consistency.method} learns from augmented views of the pool, which "
            "cached features cannot give; pass consistency=none, or model.cache_features=false"
        )
    log.info(
        "model.cache_features: each image's features are computed once (run_dir/features) and "
        "only the heads train on them; input augmentation (data.augment, pseudo_label.tta_views) "
        "and the body's dropout and stochastic depth are off"
    )
    return True
