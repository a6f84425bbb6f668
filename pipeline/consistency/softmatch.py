"""SoftMatch (Chen et al. 2023, "SoftMatch: Addressing the Quantity-Quality Trade-off in
Semi-supervised Learning", ICLR; arXiv:2301.10921), Sec. 3.2-3.3.

Instead of a 0/1 mask, each sample is weighted by a truncated Gaussian of its confidence:

    lambda(p) = exp(-(max(p) - mu_t)^2 / (2 sigma_t^2 / n_sigma^2))   if max(p) < mu_t,  else 1

with mu_t, sigma_t^2 the EMAs of the batch mean and unbiased variance of max(p) (Eq. 7; USB's
SoftMatchWeightingHook, started at mu = 1/C, var = 1, updated before the weights are computed,
n_sigma = 2 by default).

Uniform Alignment (Eq. 9, UA) is distribution alignment with a uniform target (align.py). It
follows consistency.dist_align, which the softmatch preset turns on. As in the paper and USB, UA
only feeds the weights: the targets (and pseudo_label) come from the unaligned weak logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.consistency.align import ema_
from pipeline.consistency.base import ConsistencyMethod, ConsistencySpec, Sync


class SoftMatch(ConsistencyMethod):
    """Every sample counts, less the further its confidence falls below the running mean."""

    targets_from_aligned = False

    def __init__(self, spec: ConsistencySpec, num_classes: int, num_unlabelled: int) -> None:
        super().__init__(spec, num_classes, num_unlabelled)
        self.register_buffer("prob_max_mu_t", torch.tensor(1.0 / num_classes))
        self.register_buffer("prob_max_var_t", torch.tensor(1.0))

    def class_thresholds(self) -> Tensor:
        """mu_t for every class: above it a sample has full weight."""
        return self.prob_max_mu_t.expand(self.num_classes).clone()

    def weight(self, probs: Tensor, index: Tensor, sync: Sync) -> Tensor:
        """lambda(max p) in (0, 1], with this batch already in mu_t and sigma_t^2."""
        max_probs = probs.max(dim=-1).values
        if self.training:
            self.update(max_probs, sync)
        below = torch.clamp(max_probs - self.prob_max_mu_t, max=0.0)
        var = self.prob_max_var_t.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.exp(-(below**2) / (2 * var / self.spec.n_sigma**2))

    @torch.no_grad()
    def update(self, max_probs: Tensor, sync: Sync) -> None:
        """EMAs of the mean and the unbiased variance of max(p) over every rank's batch (USB
        gathers the probabilities too: the unbiased variance needs the global count)."""
        everyone = sync.gather(max_probs)
        m = self.spec.ema_momentum
        ema_(self.prob_max_mu_t, everyone.mean(), m)
        # One sample has no unbiased variance (0/0): keep sigma_t^2 then rather than take NaN.
        if everyone.numel() > 1:
            ema_(self.prob_max_var_t, everyone.var(unbiased=True), m)
