"""FreeMatch (Wang et al. 2023, "FreeMatch: Self-adaptive Thresholding for Semi-supervised
Learning", ICLR; arXiv:2205.07246), Sec. 3.2-3.3: self-adaptive thresholding (SAT) and the
self-adaptive fairness term.

Global threshold, the EMA of the batch's mean confidence (Eq. 6), and local class model (Eq. 7):

    tau_t  = lambda tau_{t-1}  + (1 - lambda) mean_b max(q_b),        tau_0 = 1/C
    p_t(c) = lambda p_{t-1}(c) + (1 - lambda) mean_b q_b(c),          p_0(c) = 1/C

per-class thresholds (Eq. 8) tau_t(c) = MaxNorm(p_t)(c) * tau_t = p_t(c) / max_c' p_t(c') * tau_t,
and mask_b = 1(max(q_b) >= tau_t(argmax q_b)) with the state already updated by this batch.

Fairness (Eq. 12): L_f = -H(SumNorm(p_t / h_t), SumNorm(p_bar / h_bar)), with h_t the EMA of the
histogram of the weak pseudo-labels, and p_bar, h_bar the mean strong-view probability and the
histogram of its argmax over the kept samples. `loss + fairness_weight * L_f` is returned; the
caller multiplies the whole by consistency.weight, so lambda_f is relative to lambda_u (USB adds
lambda_e * L_f beside lambda_u * l_u: the same for the default lambda_u = 1).

Deviation from USB's FreeMatchThresholingHook: USB starts p_t and h_t at ones and tau at 1
(a threshold of 1 that decays over ~1/(1 - lambda) steps); we start them at 1/C as the paper
does (Sec. 3.2), so h_t and p_t stay distributions. USB's quantile and clipping options are off
by default there and left out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.consistency.align import ema_
from pipeline.consistency.base import (
    SINGLE_PROCESS,
    ConsistencyMethod,
    ConsistencyOutput,
    ConsistencySpec,
    Sync,
)

# USB's entropy_loss: log(SumNorm(...) + 1e-12), so a class absent from the kept samples adds 0.
LOG_EPS = 1e-12


def sum_norm(x: Tensor) -> Tensor:
    """x / sum(x) along the last dim (a zero row stays zero)."""
    return x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def inverse_or_zero(x: Tensor) -> Tensor:
    """1 / x, with 0 where x == 0 (USB's replace_inf_to_zero(1 / x))."""
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def fairness_loss(
    logits_strong: Tensor, mask: Tensor, p_model: Tensor, label_hist: Tensor
) -> Tensor:
    """L_f = -H(SumNorm(p_t / h_t), SumNorm(p_bar / h_bar)) = sum_c a_c log b_c over the kept
    samples (mask 0/1); 0 when none is kept (USB skips the term then). No host sync."""
    probs_s = torch.softmax(logits_strong.float(), dim=-1)
    num_classes = probs_s.shape[-1]
    kept = mask[:, None]
    hist_s = sum_norm((F.one_hot(probs_s.argmax(dim=-1), num_classes) * kept).sum(dim=0))
    mean_prob_s = (probs_s * kept).sum(dim=0) / mask.sum().clamp_min(1.0)
    target = sum_norm(p_model * inverse_or_zero(label_hist)).detach()
    model = sum_norm(mean_prob_s * inverse_or_zero(hist_s).detach())
    loss = (target * torch.log(model + LOG_EPS)).sum()
    return loss * (mask.sum() > 0).float()


class FreeMatch(ConsistencyMethod):
    """Thresholds that follow the model's own confidence, globally and per class."""

    def __init__(self, spec: ConsistencySpec, num_classes: int, num_unlabelled: int) -> None:
        super().__init__(spec, num_classes, num_unlabelled)
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("time_p", torch.tensor(1.0 / num_classes))  # tau_t
        self.register_buffer("p_model", uniform.clone())  # p_t
        self.register_buffer("label_hist", uniform.clone())  # h_t

    def class_thresholds(self) -> Tensor:
        """tau_t(c) = p_t(c) / max(p_t) * tau_t."""
        return self.p_model / self.p_model.max() * self.time_p

    def weight(self, probs: Tensor, index: Tensor, sync: Sync) -> Tensor:
        """mask_b = 1(max(q_b) >= tau_t(argmax q_b)), after this batch updated the EMAs (USB's
        order: update, then mask)."""
        max_probs, labels = probs.max(dim=-1)
        if self.training:
            self.update(probs, max_probs, labels, sync)
        return (max_probs >= self.class_thresholds()[labels]).float()

    @torch.no_grad()
    def update(self, probs: Tensor, max_probs: Tensor, labels: Tensor, sync: Sync) -> None:
        """The EMAs of tau_t, p_t and h_t from this step's batch over all ranks (one all-reduce:
        the three statistics travel together)."""
        hist = F.one_hot(labels, self.num_classes).float().mean(dim=0)
        stats = sync.mean(torch.cat([max_probs.mean()[None], probs.mean(dim=0), hist]))
        batch_tau, batch_p, batch_hist = stats.split([1, self.num_classes, self.num_classes])
        m = self.spec.ema_momentum
        ema_(self.time_p, batch_tau[0], m)
        ema_(self.p_model, batch_p, m)
        ema_(self.label_hist, batch_hist, m)

    def forward(
        self,
        logits_weak: Tensor,
        logits_strong: Tensor,
        index: Tensor,
        sync: Sync = SINGLE_PROCESS,
    ) -> ConsistencyOutput:
        """l_u, plus fairness_weight * L_f when the fairness term is on. L_f is per rank, on its
        own batch, as in USB; it updates no state."""
        out = super().forward(logits_weak, logits_strong, index, sync)
        if self.spec.fairness_weight > 0:
            l_f = fairness_loss(logits_strong, out.mask, self.p_model, self.label_hist)
            out.loss = out.loss + self.spec.fairness_weight * l_f
        return out
