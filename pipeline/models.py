"""Image-classification networks and the helpers that fine-tuning uses on them.

Every network built here has the same shape, so the rest of the pipeline never needs to know
which one it holds:

- ``net.features``: ``(N, C, H, W)`` float -> ``(N, D)`` embedding (pooling and flatten included)
- ``net.head``: ``nn.Linear(D, num_classes)``
- ``net.blocks()``: the backbone's stages from input to output; every parameter of
  ``net.features`` lies in exactly one of them (fine-tuning freezes the first ones)
- ``net(x) == net.head(net.features(x))``
- attributes ``num_classes``, ``in_channels`` and ``num_features`` (= D)

The constructors take keyword arguments only through Hydra's ``instantiate`` (``num_classes`` and
``in_channels`` are filled in by the pipeline, the rest comes from the model config).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock
from torchvision.ops import StochasticDepth, stochastic_depth

from pipeline.errors import UserError

__all__ = [
    "SmallCNN",
    "ResNetClassifier",
    "resnet18",
    "WideResNet",
    "wide_resnet28_2",
    "load_pretrained",
    "freeze_for_finetune",
    "reset_head",
    "count_parameters",
    "FINETUNE_MODES",
]

FINETUNE_MODES = ("full", "linear", "last_layers")


# --------------------------------------------------------------------------------------------
# argument checks (bad config values are user errors, not tracebacks)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}; fix it in the config")
    return value


def _check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}; fix it in the config")
    return float(value)


def _linear_drop_probs(p_max: float, n: int) -> list[float]:
    """Stochastic-depth probabilities rising linearly over ``n`` blocks, the last one ``p_max``."""
    return [p_max * (i + 1) / n for i in range(n)]


class _Classifier(nn.Module):
    """Shared part: ``forward = head(features(x))`` plus the common attributes."""

    features: nn.Module
    head: nn.Linear

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.in_channels = _check_positive_int("in_channels", in_channels)

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def blocks(self) -> list[nn.Module]:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------
# SmallCNN


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(_Classifier):
    """Five 3x3 conv layers with BatchNorm, two max-pools, global average pooling, dropout.

    Sized for 8x8 .. 28x28 grayscale digits; works for any image size >= 4 (each max-pool halves
    the size, global pooling removes it). ``features`` is one flat ``nn.Sequential`` and
    ``blocks()`` returns its three stages (slices sharing the same modules)::

        stage 1: conv(w)-BN-ReLU, conv(w)-BN-ReLU, maxpool
        stage 2: conv(2w)-BN-ReLU, conv(2w)-BN-ReLU, maxpool
        stage 3: conv(4w)-BN-ReLU, global avg pool, flatten, dropout  -> D = 4w
    """

    def __init__(
        self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.25
    ) -> None:
        super().__init__(num_classes, in_channels)
        w = _check_positive_int("width", width)
        p = _check_probability("dropout", dropout)
        layers = [
            *_conv_bn_relu(self.in_channels, w),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(p),
        ]
        self._stage_ends = (7, 14, len(layers))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(4 * w, self.num_classes)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def blocks(self) -> list[nn.Module]:
        starts = (0, *self._stage_ends[:-1])
        return [self.features[a:b] for a, b in zip(starts, self._stage_ends, strict=True)]


# --------------------------------------------------------------------------------------------
# ResNet-18 (torchvision)


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


class ResNetClassifier(_Classifier):
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
    _check_positive_int("num_classes", num_classes)
    in_channels = _check_positive_int("in_channels", in_channels)
    p_max = _check_probability("stochastic_depth", stochastic_depth)
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
            residual_blocks, _linear_drop_probs(p_max, len(residual_blocks)), strict=True
        ):
            block.__class__ = _StochasticDepthBasicBlock
            block.stochastic_depth = StochasticDepth(p, "row")
    return ResNetClassifier(net, num_classes=num_classes, in_channels=in_channels)


# --------------------------------------------------------------------------------------------
# Wide ResNet (the usual semi-supervised backbone)


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


class WideResNet(_Classifier):
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
        depth = _check_positive_int("depth", depth)
        k = _check_positive_int("widen_factor", widen_factor)
        if depth < 10 or (depth - 4) % 6:
            raise UserError(
                f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
            )
        p_drop = _check_probability("dropout", dropout)
        p_max = _check_probability("stochastic_depth", stochastic_depth)
        momentum = _check_probability("bn_momentum", bn_momentum)
        n = (depth - 4) // 6
        channels = [16, 16 * k, 32 * k, 64 * k]
        probs = iter(_linear_drop_probs(p_max, 3 * n))
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


# --------------------------------------------------------------------------------------------
# fine-tuning helpers


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
