"""Fitting a zoo network to the pipeline's data and fine-tuning: its input stem and its blocks.

The input is adapted to the data: grayscale data goes into a 3-channel stem as timm's
``adapt_input_conv`` does it (pretrained kernels summed over the colour axis), and
``small_images`` swaps a ResNet-like stem for a 3x3 stride-1 conv without max-pool. The blocks
are views of the network's own stages (parameter-name groups), for ``finetune.mode=last_layers``
and ``finetune.layer_decay``. Plain ``nn.Module`` surgery: no weights files, no zoo library.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import UserError

# torchvision's containers of stages, in the order they are looked for (see `_torchvision_groups`)
TORCHVISION_STAGES = ("features", "encoder.layers", "trunk_output", "blocks", "layers")


class _Block(nn.Module):
    """A view of some modules and loose parameters of a network, for freezing and lr groups.

    Built on demand by `ZooClassifier.blocks`; never part of the network's module tree, so it
    changes no state_dict key."""

    def __init__(self, modules: list[nn.Module], params: list[nn.Parameter]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.loose = nn.ParameterList(params)


def _block(body: nn.Module, names: list[str]) -> _Block:
    """The smallest set of whole modules (plus loose parameters) holding exactly `names`."""
    wanted = set(names)
    params = dict(body.named_parameters())
    modules: list[nn.Module] = []
    covered: set[str] = set()
    taken: list[str] = []
    for path, module in body.named_modules():
        if not path or any(path.startswith(t + ".") for t in taken):
            continue
        own = [f"{path}.{n}" for n, _ in module.named_parameters()]
        if own and all(n in wanted for n in own):
            modules.append(module)
            covered.update(own)
            taken.append(path)
    loose = [params[n] for n in names if n not in covered]
    return _Block(modules, loose)


# ---------------------------------------------------------------------------------------------
# the input stem


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """A 3-channel first-conv kernel for `in_chans` input channels, exactly as timm's
    ``adapt_input_conv``: one channel sums the RGB kernels (a gray image then gives the
    activations of the same image repeated on R, G and B); other counts repeat the RGB kernels
    cyclically, scaled by 3 / in_chans. (Written out here: torchvision must work without timm.)"""
    dtype = conv_weight.dtype
    weight = conv_weight.float()
    out, channels, kh, kw = weight.shape
    if in_chans == 1:
        if channels > 3:
            if channels % 3:
                raise UserError(f"cannot adapt a {channels}-channel first conv to 1 channel")
            weight = weight.reshape(out, channels // 3, 3, kh, kw).sum(dim=2)
        else:
            weight = weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        if channels != 3:
            raise UserError(f"cannot adapt a {channels}-channel first conv to {in_chans} channels")
        repeat = math.ceil(in_chans / 3)
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3 / float(in_chans))
    return weight.to(dtype)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    """Replace the first conv (the stem) by one taking `in_channels`, adapting its kernels."""
    path, conv = next(
        ((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None)
    )
    if conv is None or conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_channels, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_module(net, path, new)


def _small_image_stem(net: nn.Module, in_channels: int, name: str) -> None:
    """ResNet-like stem (``conv1`` ... ``maxpool``) -> a 3x3 stride-1 conv, no max-pool (freshly
    initialised, as pipeline/models/resnet.py does for resnet18)."""
    bn = getattr(net, "bn1", None)
    if not hasattr(net, "conv1") or not hasattr(net, "maxpool") or bn is None:
        raise UserError(
            f"model.name={name} has no small-image stem option (only ResNet-like networks, with "
            "conv1 and maxpool, have one); set model.small_images=false and use a larger "
            "data.image_size (e.g. 32 or more)"
        )
    net.conv1 = nn.Conv2d(in_channels, bn.num_features, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()


def _has_children(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def _torchvision_groups(net: nn.Module) -> list[list[str]]:
    """The stages of a torchvision network (its classifier already removed), as parameter
    names: the children of its stage container (``features`` for VGG, MobileNet, EfficientNet,
    ConvNeXt, DenseNet, Swin; ``encoder.layers`` for ViT; ``trunk_output`` for RegNet;
    ``blocks`` for MaxViT; ``layers`` for MNASNet), what comes before it as one stem block and
    what comes after it joined to the last stage. Without a container (ResNet, GoogLeNet,
    ShuffleNet...) the top-level children are the stages, leading plain layers (conv1, bn1)
    forming the stem."""
    names = [n for n, _ in net.named_parameters()]

    def under(prefix: str) -> list[str]:
        return [n for n in names if n.startswith(prefix + ".")]

    container = None
    for path in TORCHVISION_STAGES:
        try:
            module = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Sequential | nn.ModuleList) and len(under(path)):
            container = path
            break
    if container is not None:
        children = [f"{container}.{c}" for c, _ in net.get_submodule(container).named_children()]
        stages = [g for g in (under(c) for c in children) if g]
        inside = {n for g in stages for n in g}
        first = names.index(stages[0][0])
        before = [n for n in names[:first] if n not in inside]
        after = [n for n in names[first:] if n not in inside]
        stages[-1] = stages[-1] + after
        return ([before] if before else []) + stages
    groups: list[list[str]] = [[n for n in names if "." not in n]]  # root-level parameters
    stem_open = True
    for child, module in net.named_children():
        params = under(child)
        if not params:
            continue
        if not _has_children(module):  # a plain layer: the stem's, or the stage's before it
            groups[0 if stem_open else -1] += params
        else:
            stem_open = False
            groups.append(params)
    return [g for g in groups if g]
