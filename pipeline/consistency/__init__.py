"""Online pseudo-label (consistency) losses for the unlabelled pool: one small module per method,
pure torch. `build(spec, num_classes, num_unlabelled)` gives the method (an nn.Module whose
buffers hold all its state) or None for `consistency=none`.
"""

from __future__ import annotations

from pipeline.consistency.align import Debias, DistAlign
from pipeline.consistency.base import (
    ConsistencyMethod,
    ConsistencyOutput,
    ConsistencySpec,
    Sync,
    check_spec,
)
from pipeline.consistency.fixmatch import FixMatch
from pipeline.consistency.flexmatch import FlexMatch
from pipeline.consistency.freematch import FreeMatch
from pipeline.consistency.softmatch import SoftMatch

REGISTRY: dict[str, type[ConsistencyMethod]] = {
    "fixmatch": FixMatch,
    "flexmatch": FlexMatch,
    "freematch": FreeMatch,
    "softmatch": SoftMatch,
}
METHODS = ("none", *REGISTRY)


def build(spec: ConsistencySpec, num_classes: int, num_unlabelled: int) -> ConsistencyMethod | None:
    """The method `spec.method` names, with fresh state; None for "none". ValueError (naming
    the known methods, or the bad setting) otherwise."""
    if spec.method == "none":
        return None
    if spec.method not in REGISTRY:
        raise ValueError(
            f"unknown consistency method {spec.method!r}: use one of {', '.join(METHODS)}"
        )
    return REGISTRY[spec.method](spec, num_classes, num_unlabelled)


__all__ = [
    "METHODS",
    "ConsistencyMethod",
    "ConsistencyOutput",
    "ConsistencySpec",
    "Debias",
    "DistAlign",
    "FixMatch",
    "FlexMatch",
    "FreeMatch",
    "SoftMatch",
    "Sync",
    "build",
    "check_spec",
]
