"""torchvision's ResNet-18, with a small-image stem and stochastic depth (student noise)."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops import StochasticDepth

from pipeline.errors import UserError
from pipeline.models.base import (
    Classifier,
    check_positive_int,
    check_probability,
    linear_drop_probs,
)


class _StochasticDepthBasicBlock(BasicBlock):
    """torchvision's BasicBlock whose residual branch goes through ``self.stochastic_depth``.

    Existing blocks are switched to this class in place (``block.__class__ = ...``) so that the
    parameter names and any loaded weights stay exactly torchvision's.
    """

    stochastic_depth: StochasticDepth

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.stochastic_depth(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class ResNetClassifier(Classifier):
    """Thin wrapper: ``features`` is a torchvision ResNet whose ``fc`` is ``nn.Identity``.

    Parameter names are torchvision's with a ``features.`` prefix; ``fc`` becomes ``head``.
    """

    def __init__(self, net: torchvision.models.ResNet, num_classes: int, in_channels: int) -> None:
        super().__init__(num_classes, in_channels)
        num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.features = net
        self.head = nn.Linear(num_features, self.num_classes)

    def blocks(self) -> list[nn.Module]:
        f = self.features
        stem = nn.Sequential(f.conv1, f.bn1, f.relu, f.maxpool)
        return [stem, f.layer1, f.layer2, f.layer3, f.layer4]


def _resnet18_weights(weights: object) -> torchvision.models.ResNet18_Weights | None:
    enum = torchvision.models.ResNet18_Weights
    if weights is None or isinstance(weights, enum):
        return weights
    valid = ", ".join(enum.__members__)
    if not isinstance(weights, str) or weights not in enum.__members__:
        raise UserError(
            f"unknown resnet18 weights {weights!r}; use one of: {valid} (or null for random init)"
        )
    return enum[weights]


def resnet18(
    num_classes: int,
    in_channels: int = 3,
    small_images: bool = True,
    weights: str | None = None,
    stochastic_depth: float = 0.0,
) -> ResNetClassifier:
    """torchvision ResNet-18 with the stem and head adapted.

    - ``weights``: a ``torchvision.models.ResNet18_Weights`` name such as ``"IMAGENET1K_V1"``
      (fetched by torchvision on first use) or None for random init.
    - ``small_images``: CIFAR-style stem, a 3x3 stride-1 ``conv1`` (freshly initialised, also
      when weights are loaded) and no max-pool.
    - ``in_channels != 3`` replaces ``conv1``; with loaded weights, 7x7 stem and one input
      channel it starts from the pretrained RGB kernels summed over the colour axis, so a gray
      image gives the same activations as the same image repeated on R, G and B.
    - ``stochastic_depth``: the residual branch of block i (of 8) is dropped per sample with
      probability ``stochastic_depth * (i + 1) / 8`` during training; 0 is torchvision exactly.
    """
    check_positive_int("num_classes", num_classes)
    in_channels = check_positive_int("in_channels", in_channels)
    p_max = check_probability("stochastic_depth", stochastic_depth)
    w = _resnet18_weights(weights)
    net = torchvision.models.resnet18(weights=w)
    out_channels = net.conv1.out_channels
    if small_images:
        net.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        if w is not None and in_channels == 1:
            with torch.no_grad():
                net.conv1.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        else:
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    if p_max > 0:
        residual_blocks = [b for b in net.modules() if isinstance(b, BasicBlock)]
        for block, p in zip(
            residual_blocks, linear_drop_probs(p_max, len(residual_blocks)), strict=True
        ):
            block.__class__ = _StochasticDepthBasicBlock
            block.stochastic_depth = StochasticDepth(p, "row")
    return ResNetClassifier(net, num_classes=num_classes, in_channels=in_channels)
