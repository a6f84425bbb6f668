"""What a training step minimises: the soft cross-entropy on the training batch (logit-adjusted
with `train.logit_adjust`) and, with `consistency=`, the weighted online pseudo-label loss on
the pool batch. `PoolLoss` is the part of LitClassifier (engine/module.py) that computes both,
runs the pool's step, syncs the method's statistics over the DDP ranks (`RankSync`) and keeps
the epoch's diagnostics.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.consistency import ConsistencyMethod, Sync


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Weighted cross-entropy against target distributions (one-hot rows for hard labels)."""
    if smoothing:
        target = target * (1 - smoothing) + smoothing / target.shape[1]
    loss = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return (weight * loss).mean()


def logit_offset(prior: np.ndarray, tau: float) -> torch.Tensor:
    """tau * log(prior), what the logit-adjusted loss (Menon et al. 2021, eq. 10) adds to the
    logits in training only: a class the training batches over-represent must win by that
    much more, so the network's plain logits fit the classes as if balanced. A class absent
    from the batches gets log(1e-12), which only makes it easier to predict."""
    return torch.from_numpy(tau * np.log(np.clip(prior, 1e-12, None))).float()


class RankSync(Sync):
    """How an online pseudo-labelling method combines its per-step statistics across the DDP
    ranks: means all-reduced, per-sample records all-gathered in rank order (padded with -1
    where the ranks' batches differ in size: images left out as unreadable)."""

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module

    def _world(self) -> int:
        try:
            return self.module.trainer.world_size
        except RuntimeError:  # not attached to a Trainer (a module used on its own)
            return 1

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self._world() == 1:
            return t
        return self.module.trainer.strategy.reduce(t, reduce_op="mean")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        world = self._world()
        if world == 1:
            return t
        sizes = self.module.all_gather(torch.tensor([len(t)], device=t.device)).view(-1)
        padded = t.new_full((int(sizes.max()), *t.shape[1:]), -1)
        padded[: len(t)] = t
        gathered = self.module.all_gather(padded)  # (world, size, ...)
        return torch.cat([gathered[r, : int(sizes[r])] for r in range(world)])


class PoolLoss:
    """LitClassifier's losses: the supervised one, and online pseudo-labelling on the pool
    (consistency=...). The module sets `consistency`, `consistency_weight`, `label_smoothing`,
    `_logit_offset` (a buffer, or None), `_sync` (a RankSync of itself) and `_pool_stats` (0.0)
    in its __init__."""

    consistency: ConsistencyMethod | None
    consistency_weight: float
    label_smoothing: float
    _logit_offset: torch.Tensor | None
    _sync: RankSync
    _pool_stats: torch.Tensor | float

    def _supervised_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The weighted soft cross-entropy on the training batch, on logits + the offset of
        train.logit_adjust where it is set."""
        if self._logit_offset is not None:
            logits = logits + self._logit_offset
        return soft_cross_entropy(logits, batch["target"], batch["weight"], self.label_smoothing)

    def _step_with_pool(self, batch: dict) -> torch.Tensor:
        """The supervised loss plus the weighted online pseudo-label loss: one forward pass over
        the training batch and the weak and strong views of the pool batch (as FixMatch does:
        BatchNorm sees all three), the weak logits becoming the strong view's targets."""
        x, weak, strong = batch["image"], batch["u_weak"], batch["u_strong"]
        n, m = len(x), len(weak)
        logits = self(torch.cat([x, weak, strong]))
        loss = self._supervised_loss(logits[:n], batch)
        out = self.consistency(logits[n : n + m], logits[n + m :], batch["u_index"], self._sync)
        with torch.no_grad():  # diagnostics only: the truth never reaches a loss
            mask = out.mask.float()
            stats = [float(m), mask.sum()]
            truth = batch.get("u_truth")
            if truth is not None:
                known = (truth >= 0).float() * mask
                right = (out.pseudo_label == truth).float() * known
                stats += [known.sum(), right.sum()]
            else:
                stats += [0.0, 0.0]
            self._pool_stats = self._pool_stats + torch.tensor(stats, device=mask.device)
        return loss + self.consistency_weight * out.loss

    def _pool_record(self) -> dict[str, Any]:
        """The epoch's online pseudo-labelling diagnostics (summed over the ranks)."""
        record: dict[str, Any] = {}
        if isinstance(self._pool_stats, torch.Tensor):
            seen, kept, known, right = (
                float(v) for v in self.trainer.strategy.reduce(self._pool_stats, reduce_op="sum")
            )
            record["mask_rate"] = round(kept / max(seen, 1.0), 6)
            if known > 0:
                record["masked_pseudo_accuracy"] = round(right / known, 6)
        record["class_thresholds"] = [
            round(float(t), 6) for t in self.consistency.class_thresholds()
        ]
        if self.consistency.debias is not None:  # DebiasPL's running mean of the predictions
            record["pool_prior"] = [round(float(p), 6) for p in self.consistency.debias.p_hat]
        self._pool_stats = 0.0
        return record
