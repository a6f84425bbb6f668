"""FixMatch (Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency
and Confidence", NeurIPS; arXiv:2001.07685), Eq. 4:

    l_u = 1/(mu B) * sum_b 1(max(q_b) >= tau) * H(argmax(q_b), softmax(strong_b))

a fixed confidence threshold tau on the weak view's prediction q_b. No state (but the optional
distribution alignment's running mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.consistency.base import ConsistencyMethod, ConsistencySpec, Sync


class FixMatch(ConsistencyMethod):
    """Keep a sample when its weak-view confidence reaches the fixed threshold tau."""

    def __init__(self, spec: ConsistencySpec, num_classes: int, num_unlabelled: int) -> None:
        super().__init__(spec, num_classes, num_unlabelled)
        # A constant, not state (the spec sets it): a buffer only so it follows the device.
        thresholds = torch.full((num_classes,), spec.threshold)
        self.register_buffer("thresholds", thresholds, persistent=False)

    def weight(self, probs: Tensor, index: Tensor, sync: Sync) -> Tensor:
        """mask_b = 1(max(q_b) >= tau); USB's `max_probs.ge(p_cutoff)`."""
        return (probs.max(dim=-1).values >= self.spec.threshold).float()

    def class_thresholds(self) -> Tensor:
        """tau for every class."""
        return self.thresholds.clone()
