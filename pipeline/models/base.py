"""What every network of the pipeline shares.

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

from torch import Tensor, nn

from pipeline.errors import UserError


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}; fix it in the config")
    return value


def check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}; fix it in the config")
    return float(value)


def linear_drop_probs(p_max: float, n: int) -> list[float]:
    """Stochastic-depth probabilities rising linearly over ``n`` blocks, the last one ``p_max``."""
    return [p_max * (i + 1) / n for i in range(n)]


class Classifier(nn.Module):
    """Shared part: ``forward = head(features(x))`` plus the common attributes."""

    features: nn.Module
    head: nn.Linear

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.in_channels = check_positive_int("in_channels", in_channels)

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def blocks(self) -> list[nn.Module]:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
