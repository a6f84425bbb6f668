"""FlexMatch (Zhang et al. 2021, "FlexMatch: Boosting Semi-Supervised Learning with Curriculum
Pseudo Labeling", NeurIPS; arXiv:2110.08263), Eqs. 6-11: Curriculum Pseudo Labelling.

Each pool image remembers the class it was last confidently predicted as (max(q) >= tau). The
learning effect of class c is the number of images selected as c,

    sigma_c = sum_n 1(selected_n == c),
    beta_c  = sigma_c / max(max_c' sigma_c', N_unused)   with warm-up (Eq. 11)
    beta_c  = sigma_c / max_c' sigma_c'                   without,

where N_unused counts the images never selected, and the threshold of class c is

    T_c = M(beta_c) * tau,   M(x) = x / (2 - x) (convex, the paper's choice) or x (linear).

A sample is kept when max(q_b) >= T_{argmax(q_b)}. At the start beta = 0, so every threshold is 0
and every sample is kept: the curriculum starts permissive and tightens as classes are learnt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.consistency.base import ConsistencyMethod, ConsistencySpec, Sync


class FlexMatch(ConsistencyMethod):
    """Per-class thresholds that scale tau by how far each class has been learnt."""

    def __init__(self, spec: ConsistencySpec, num_classes: int, num_unlabelled: int) -> None:
        super().__init__(spec, num_classes, num_unlabelled)
        # The per-image record is the method's only O(pool) state: 2 bytes an image as int16
        # (2 MB per million images), int32 only when the class ids do not fit. -1: never selected.
        small = num_classes <= torch.iinfo(torch.int16).max
        dtype = torch.int16 if small else torch.int32
        self.register_buffer("selected_label", torch.full((num_unlabelled,), -1, dtype=dtype))
        self.register_buffer("learning_effect", torch.zeros(num_classes))  # beta_c, float32

    def mapping(self, beta: Tensor) -> Tensor:
        """M(beta): convex beta / (2 - beta) (the paper's Eq. 7) or linear beta."""
        return beta / (2.0 - beta) if self.spec.mapping == "convex" else beta

    def class_thresholds(self) -> Tensor:
        """T_c = M(beta_c) * tau with the learning effects recorded so far."""
        return self.mapping(self.learning_effect) * self.spec.threshold

    def weight(self, probs: Tensor, index: Tensor, sync: Sync) -> Tensor:
        """mask_b = 1(max(q_b) >= T_{argmax q_b}).

        Order, as USB's FlexMatchThresholdingHook.masking (and TorchSSL) do it: the mask uses
        the learning effects of the record up to the previous batch; then this batch's
        confident images are recorded and beta recomputed, for the next batch.
        """
        max_probs, labels = probs.max(dim=-1)
        mask = (max_probs >= self.class_thresholds()[labels]).float()
        if self.training:
            # ">=" as USB's `max_probs.ge(p_cutoff)`
            chosen = torch.where(max_probs >= self.spec.threshold, labels, -1)
            self.record(index, chosen, sync)
        return mask

    @torch.no_grad()
    def record(self, index: Tensor, chosen: Tensor, sync: Sync) -> None:
        """Write each image's selected class (-1: not selected this time, keep the old one),
        from every rank's batch so that all ranks hold the same record, then recompute beta."""
        index, chosen = sync.gather(index), sync.gather(chosen)
        # Fixed-shape update (no boolean indexing, so no host sync): indices are distinct.
        old = self.selected_label[index]
        self.selected_label[index] = torch.where(chosen >= 0, chosen.to(old.dtype), old)
        # Shift by one so that bin 0 counts the unused images (-1) and bin c+1 counts class c.
        # scatter_add_ rather than bincount: CUDA's bincount reads its max back to the host.
        bins = self.selected_label.long() + 1
        counts = torch.zeros(self.num_classes + 1, dtype=torch.long, device=bins.device)
        counts.scatter_add_(
            0, bins, torch.ones(1, dtype=torch.long, device=bins.device).expand_as(bins)
        )
        unused, sigma = counts[0].float(), counts[1:].float()
        most = torch.maximum(sigma.max(), unused) if self.spec.warmup else sigma.max()
        # Deviation: USB skips the update while one key (-1, or a single class) holds the whole
        # pool; the formula gives the same beta = 0 when nothing is selected, and the paper's
        # beta = 1 for the one class when it holds all images.
        self.learning_effect.copy_(sigma / most.clamp_min(1.0))
