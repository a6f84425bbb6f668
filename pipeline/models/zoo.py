"""Networks from the model zoos: any torchvision or timm classifier by name.

    python -m pipeline model=torchvision model.name=convnext_tiny model.weights=DEFAULT
    python -m pipeline model=timm model.name=resnet10t model.pretrained=true
    python -m pipeline model=timm model.name=resnet10t model.weights=/path/resnet10t.safetensors

The zoo network becomes ``features`` of a `ZooClassifier` with its classifier layer removed
(torchvision: the last ``nn.Linear`` becomes ``nn.Identity``; timm: ``num_classes=0``), and
``head`` is a new ``nn.Linear`` for the data's classes, so fine-tuning, checkpoints and export
treat it like the pipeline's own networks. The input is adapted to the data: grayscale data
goes into a 3-channel stem as timm's ``adapt_input_conv`` does it (pretrained kernels summed
over the colour axis), and ``small_images`` swaps a ResNet-like stem for a 3x3 stride-1 conv
without max-pool. ``blocks()`` are the zoo's own stages (timm's ``group_matcher``; torchvision's
top-level stages), for ``finetune.mode=last_layers`` and ``finetune.layer_decay``.

Weights (offline first, pipeline/models/zoo_weights.py) come from the libraries' caches
(``TORCH_HOME``, ``HF_HOME``) or a local ``.pth`` / ``.safetensors`` file; a download that cannot
happen is a UserError naming the file and the cache folder to put it in
(``scripts/fetch_weights.py`` fills the caches). The stem and block surgery is
pipeline/models/zoo_adapt.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from pipeline.errors import UserError
from pipeline.models.base import Classifier, check_positive_int, check_probability
from pipeline.models.zoo_adapt import (
    _adapt_first_conv,
    _block,
    _set_module,
    _small_image_stem,
    _torchvision_groups,
    adapt_input_conv,
)
from pipeline.models.zoo_weights import (
    _load_body,
    _timm,
    _unknown_name,
    fetch_timm,
    fetch_torchvision,
    has_small_image_stem,
    is_weights_file,
    read_state_dict,
    timm_names,
    torchvision_names,
    torchvision_weights,
)

# torchvision builders whose auxiliary classifiers are on by default without weights
AUX_LOGITS = ("googlenet", "inception_v3")


class ZooClassifier(Classifier):
    """A torchvision or timm network as ``features`` (its classifier removed) plus a new
    ``head``. ``groups``: the parameter names of ``features``'s stages, input first."""

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        num_classes: int,
        in_channels: int,
        groups: list[list[str]],
    ) -> None:
        super().__init__(num_classes, in_channels)
        self.features = body
        self.head = nn.Linear(num_features, self.num_classes)
        self.groups = [list(g) for g in groups if g]

    def blocks(self) -> list[nn.Module]:
        return [_block(self.features, names) for names in self.groups]


def _own_small_stem(
    net: nn.Module, state: dict[str, torch.Tensor], in_channels: int, name: str
) -> bool:
    """A weights file with the small-image stem (our own pretraining with
    ``small_images=true``): give `net` that stem now so the file's kernels load into it (adapted
    to `in_channels` as timm adapts a first conv), instead of a fresh stem after loading."""
    if not has_small_image_stem(state, net):
        return False
    _small_image_stem(net, in_channels, name)
    if state["conv1.weight"].shape[1] != in_channels:
        state["conv1.weight"] = adapt_input_conv(in_channels, state["conv1.weight"])
    return True


# ---------------------------------------------------------------------------------------------
# torchvision


def _torchvision_classifier(net: nn.Module, name: str) -> tuple[str, nn.Linear]:
    """The classifier layer: the last ``nn.Linear`` (fc, classifier[-1], heads.head, head)."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"torchvision model {name} has no linear classifier layer to replace (e.g. "
            "squeezenet); choose another model.name"
        )
    return linears[-1]


def torchvision_model(
    num_classes: int,
    in_channels: int = 3,
    name: str = "resnet18",
    weights: str | None = None,
    small_images: bool = False,
) -> ZooClassifier:
    """Any torchvision classification model by name, with a new head for `num_classes`.

    - ``weights``: a weights enum member of the model (``IMAGENET1K_V1``, ``DEFAULT``), taken
      from torchvision's cache (``TORCH_HOME``; a missing file is a UserError naming it), a
      local ``.pth`` / ``.safetensors`` file of the torchvision model's state dict, or None.
    - ``in_channels != 3``: the first conv's kernels adapted (`adapt_input_conv`).
    - ``small_images``: ResNet-like stem -> 3x3 stride-1 conv without max-pool.
    """
    check_positive_int("num_classes", num_classes)
    in_channels = check_positive_int("in_channels", in_channels)
    known = torchvision_names()
    if name not in known:
        raise _unknown_name("torchvision", name, known)
    kwargs: dict[str, Any] = {}
    if weights is None or is_weights_file(weights):
        if name in AUX_LOGITS:
            kwargs["aux_logits"] = False
        net = torchvision.models.get_model(name, weights=None, **kwargs)
        if weights is not None:
            classifier, _ = _torchvision_classifier(net, name)
            state = read_state_dict(weights)
            if small_images and _own_small_stem(net, state, in_channels, name):
                small_images = False
            _load_body(net, state, [classifier], f"model.weights={weights}")
    else:
        w = torchvision_weights(name, str(weights))
        fetch_torchvision(name, w.name)  # the cached file, or a UserError naming it
        net = torchvision.models.get_model(name, weights=w)  # (from the cache)
    _adapt_first_conv(net, in_channels)
    if in_channels != 3 and getattr(net, "transform_input", False):
        net.transform_input = False  # (GoogLeNet, Inception: re-normalises 3 RGB channels)
    if small_images:
        _small_image_stem(net, in_channels, name)
    path, linear = _torchvision_classifier(net, name)
    _set_module(net, path, nn.Identity())
    return ZooClassifier(
        net, linear.in_features, num_classes, in_channels, _torchvision_groups(net)
    )


# ---------------------------------------------------------------------------------------------
# timm


def timm_model(
    num_classes: int,
    in_channels: int = 3,
    name: str = "resnet18",
    pretrained: bool = False,
    weights: str | None = None,
    small_images: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> ZooClassifier:
    """Any timm model by name (``arch`` or ``arch.tag``), with a new head for `num_classes`.

    - ``pretrained``: timm's weights for the name, from the caches (``HF_HOME``, ``TORCH_HOME``;
      downloaded only where there is a network, else a UserError naming the file).
    - ``weights``: a local ``.pth`` / ``.safetensors`` file of the timm model's state dict
      (implies pretrained).
    - ``in_channels``: timm's ``in_chans`` (pretrained kernels adapted like timm does).
    - ``small_images``: ResNet-like stem -> 3x3 stride-1 conv without max-pool.
    - ``drop_rate``, ``drop_path_rate``: timm's dropout and stochastic depth (student noise).
    """
    timm = _timm()
    check_positive_int("num_classes", num_classes)
    in_channels = check_positive_int("in_channels", in_channels)
    if not timm.is_model(name):
        raise _unknown_name("timm", name, timm_names())
    extra: dict[str, Any] = {}
    if check_probability("drop_rate", drop_rate):
        extra["drop_rate"] = float(drop_rate)
    if check_probability("drop_path_rate", drop_path_rate):
        extra["drop_path_rate"] = float(drop_path_rate)
    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **extra)
    cfg = dict(net.pretrained_cfg)
    file = weights if weights is not None else (fetch_timm(name) if pretrained else None)
    if file is not None:
        state = read_state_dict(file)
        if small_images and _own_small_stem(net, state, in_channels, name):
            small_images = False
        for conv in _as_list(cfg.get("first_conv")):  # as timm's load_pretrained does
            key = f"{conv}.weight"
            if key in state and state[key].ndim == 4 and state[key].shape[1] != in_channels:
                state[key] = adapt_input_conv(in_channels, state[key])
        _load_body(net, state, _as_list(cfg.get("classifier")), f"timm weights {file}")
    if small_images:
        _small_image_stem(net, in_channels, name)
    groups = _timm_groups(net, cfg)
    width = getattr(net, "head_hidden_size", None) or net.num_features
    return ZooClassifier(net, int(width), num_classes, in_channels, groups)


def _as_list(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    return [names] if isinstance(names, str) else list(names or [])


def _timm_groups(net: nn.Module, cfg: dict[str, Any]) -> list[list[str]]:
    """timm's own coarse stages (``group_matcher(coarse=True)``: the grouping timm's layer
    decay uses); what is left of the head (a norm, pre-logits) joins the last stage."""
    from timm.models import group_parameters

    try:
        groups = [list(g) for g in group_parameters(net, net.group_matcher(coarse=True)).values()]
    except (AttributeError, NotImplementedError):
        return _torchvision_groups(net)
    head = (_as_list(cfg.get("classifier")) or [""])[0].rpartition(".")[0]
    if head and len(groups) > 1 and all(n.startswith(head + ".") for n in groups[-1]):
        last = groups.pop()
        groups[-1] += last
    return groups


# The zoo constructors, for models/__init__.py's NETWORKS (checkpoints rebuild them offline).
ZOO: dict[str, Callable[..., ZooClassifier]] = {
    "torchvision_model": torchvision_model,
    "timm_model": timm_model,
}
