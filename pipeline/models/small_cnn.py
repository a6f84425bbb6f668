"""SmallCNN: the default network for the bundled 8x8..28x28 digit sets."""

from __future__ import annotations

from torch import nn

from pipeline.models.base import Classifier, check_positive_int, check_probability


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(Classifier):
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
        w = check_positive_int("width", width)
        p = check_probability("dropout", dropout)
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
