"""Distribution alignment of the weak-view probabilities, as in ReMixMatch (Berthelot et al.
2020, "ReMixMatch", Sec. 3.2) and AdaMatch (Berthelot et al. 2022): scale each prediction by the
ratio of a target class distribution to the model's running mean prediction and renormalise,

    align(p) = Normalize(p * p_target / p_model),

so a model that over-predicts some classes on the pool is pulled back towards `p_target`.
With a uniform target this is SoftMatch's Uniform Alignment (Chen et al. 2023, Eq. 9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # base.py builds a DistAlign, so the import runs one way only
    from pipeline.consistency.base import Sync

# USB's DistAlignEMAHook adds this to both distributions, so a class the model never predicts
# (p_model == 0) scales by a large finite factor instead of dividing by zero.
EPS = 1e-6


@torch.no_grad()
def ema_(buffer: Tensor, value: Tensor, momentum: float) -> None:
    """In place: buffer = momentum * buffer + (1 - momentum) * value (the papers' EMA)."""
    buffer.mul_(momentum).add_(value.to(buffer.dtype), alpha=1.0 - momentum)


class DistAlign(nn.Module):
    """The running mean `p_model` of the weak probabilities (a buffer, float32) and the alignment.

    `p_model` starts uniform. USB's hook instead starts it at the first batch's mean; a uniform
    start needs no "not yet initialised" state, is the same at every rank and step 0 of a resume,
    and only delays the alignment by the EMA's horizon (1 / (1 - momentum) steps).
    """

    def __init__(self, num_classes: int, momentum: float, p_target: Tensor | None = None) -> None:
        super().__init__()
        self.momentum = momentum
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        target = uniform if p_target is None else torch.as_tensor(p_target, dtype=torch.float32)
        if target.shape != (num_classes,) or bool((target < 0).any()) or float(target.sum()) <= 0:
            raise ValueError(
                f"distribution alignment: p_target must be {num_classes} non-negative numbers "
                f"with a positive sum, got {target.tolist()}"
            )
        self.register_buffer("p_model", uniform.clone())
        self.register_buffer("p_target", target / target.sum())

    @torch.no_grad()
    def forward(self, probs: Tensor, sync: Sync, update: bool = True) -> Tensor:
        """The aligned (B, C) probabilities. With `update`, the running mean first takes this
        batch's mean (averaged over ranks), then aligns: USB's DistAlignEMAHook.dist_align does
        the same (update_p, then align), so the current batch already counts."""
        if update:
            ema_(self.p_model, sync.mean(probs.float().mean(dim=0)), self.momentum)
        aligned = probs * (self.p_target + EPS) / (self.p_model + EPS)
        return aligned / aligned.sum(dim=-1, keepdim=True)


class Debias(nn.Module):
    """DebiasPL (Wang et al. 2022, "Debiased Learning from Naturally Imbalanced Pseudo-Labels",
    CVPR; USB's `debiaspl`): the running mean `p_hat` of the weak probabilities (a buffer,
    float32, starting uniform) gives the offset tau * log(p_hat), which is

    - taken from the weak logits before the pseudo-labels are made (its "counterfactual"
      debiasing: a class the model over-predicts on the pool must win by that much more), and
    - added to the strong logits in the loss (its adaptive marginal loss, a logit-adjusted loss
      with the pool's predicted prior: Menon et al. 2021),

    so a long-tailed pool neither skews the pseudo-labels nor teaches the network its prior.
    """

    def __init__(self, num_classes: int, momentum: float, tau: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.tau = tau
        self.register_buffer("p_hat", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, logits_weak: Tensor, sync: Sync, update: bool = True) -> Tensor:
        """The (C,) offset tau * log(p_hat). With `update`, `p_hat` first takes the mean of
        softmax(logits_weak) over the batch (averaged over ranks), as USB's compute_prob."""
        if update:
            probs = torch.softmax(logits_weak.float(), dim=-1)
            ema_(self.p_hat, sync.mean(probs.mean(dim=0)), self.momentum)
        return self.tau * self.p_hat.clamp_min(EPS).log()
