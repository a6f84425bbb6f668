"""Wide ResNet (WRN-28-2), the usual semi-supervised backbone (FixMatch, USB)."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from pipeline.errors import UserError
from pipeline.models.base import (
    Classifier,
    check_positive_int,
    check_probability,
    linear_drop_probs,
)


def _wrn_bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=momentum, eps=0.001)


class _WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: BN-LReLU-conv3x3-BN-LReLU-(dropout)-conv3x3 + shortcut.

    ``activate_before_residual`` (first block of the network): the shortcut also takes the
    pre-activated input. Otherwise the shortcut takes the raw input (1x1 conv when the shape
    changes). Every parameter takes part in every forward pass.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        dropout: float,
        drop_path: float,
        activate_before_residual: bool,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        self.bn1 = _wrn_bn(c_in, bn_momentum)
        self.act1 = nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _wrn_bn(c_out, bn_momentum)
        self.act2 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            None
            if c_in == c_out and stride == 1
            else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        )
        self.dropout = dropout
        self.drop_path = drop_path
        self.activate_before_residual = activate_before_residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(x))
        if self.activate_before_residual:
            x = out
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = self.act2(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = nn.functional.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        if self.drop_path > 0:
            out = stochastic_depth(out, self.drop_path, "row", self.training)
        return shortcut + out


class _WideResNetFeatures(nn.Module):
    def __init__(self, conv1: nn.Conv2d, stages: list[nn.Sequential], bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1
        self.block1, self.block2, self.block3 = stages
        self.bn = bn
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.flatten(self.pool(self.act(self.bn(x))))


class WideResNet(Classifier):
    """WRN-depth-k as used by FixMatch-style methods.

    Channels ``[16, 16k, 32k, 64k]``, three stages of ``(depth - 4) / 6`` pre-activation wide
    basic blocks (strides 1, 2, 2), BatchNorm momentum ``bn_momentum`` (0.001, i.e. running
    averages over ~1000 steps) and eps 0.001, LeakyReLU(0.1), final BN-LReLU, global average
    pooling. ``dropout`` is applied between the two convs of each block, ``stochastic_depth``
    drops the residual branch of block i (of n) with probability ``stochastic_depth * (i+1)/n``.
    ``blocks()``: stem conv, stage 1, stage 2, stage 3 together with the final BN.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 2,
        dropout: float = 0.0,
        stochastic_depth: float = 0.0,
        bn_momentum: float = 0.001,
    ) -> None:
        super().__init__(num_classes, in_channels)
        depth = check_positive_int("depth", depth)
        k = check_positive_int("widen_factor", widen_factor)
        if depth < 10 or (depth - 4) % 6:
            raise UserError(
                f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
            )
        p_drop = check_probability("dropout", dropout)
        p_max = check_probability("stochastic_depth", stochastic_depth)
        momentum = check_probability("bn_momentum", bn_momentum)
        n = (depth - 4) // 6
        channels = [16, 16 * k, 32 * k, 64 * k]
        probs = iter(linear_drop_probs(p_max, 3 * n))
        stages = []
        for s, stride in enumerate((1, 2, 2)):
            blocks = [
                _WideBasicBlock(
                    channels[s] if i == 0 else channels[s + 1],
                    channels[s + 1],
                    stride if i == 0 else 1,
                    dropout=p_drop,
                    drop_path=next(probs),
                    activate_before_residual=(s == 0 and i == 0),
                    bn_momentum=momentum,
                )
                for i in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
        conv1 = nn.Conv2d(self.in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.features = _WideResNetFeatures(conv1, stages, _wrn_bn(channels[3], momentum))
        self.head = nn.Linear(channels[3], self.num_classes)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def blocks(self) -> list[nn.Module]:
        f = self.features
        return [f.conv1, f.block1, f.block2, nn.Sequential(f.block3, f.bn)]


def wide_resnet28_2(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    stochastic_depth: float = 0.0,
    bn_momentum: float = 0.001,
) -> WideResNet:
    """WRN-28-2 (1.47M parameters), the standard CIFAR-10 semi-supervised backbone."""
    return WideResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        depth=28,
        widen_factor=2,
        dropout=dropout,
        stochastic_depth=stochastic_depth,
        bn_momentum=bn_momentum,
    )
