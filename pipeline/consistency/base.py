"""What every consistency (online pseudo-label) method shares: its settings, the DDP hook, its
output and the base class, whose forward is FixMatch's unlabelled loss (Sohn et al. 2020, Eq. 2)

    l_u = 1/B * sum_b w_b * H(target(q_b), softmax(strong_b)),   q_b = softmax(weak_b)

with the per-sample weight w_b (a 0/1 confidence mask, or SoftMatch's Gaussian weight) left to
each method; with `debias` > 0 (DebiasPL, align.py) weak_b and strong_b are first shifted by the
pool's running predicted prior. Pure torch: no Lightning, no configs, so each method is tested
on hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.consistency.align import Debias, DistAlign

MAPPINGS = ("convex", "linear")


@dataclass(frozen=True)
class ConsistencySpec:
    """The `consistency.*` settings. Defaults are the papers' (CIFAR) ones."""

    method: str = "none"  # none | fixmatch | flexmatch | freematch | softmatch
    mu: int = 7  # unlabelled images per labelled image in a batch (the data module's business)
    weight: float = 1.0  # lambda_u: weight of the unsupervised loss (applied by the caller)
    threshold: float = 0.95  # FixMatch's tau; FlexMatch's upper threshold tau
    # T == 1: hard (argmax) one-hot targets as in FixMatch; otherwise soft targets
    # softmax(logits_w / T) (USB's use_hard_label=False), sharper for T < 1
    temperature: float = 1.0
    dist_align: bool = False  # align the weak probs (align.py) before thresholding
    # DebiasPL's tau (align.py's Debias): the pool's running predicted prior taken from the weak
    # logits and added to the strong ones in the loss; 0 = off (USB's debiaspl_tau: 0.4)
    debias: float = 0.0
    ema_momentum: float = 0.999  # lambda of the FreeMatch / SoftMatch / dist_align / debias EMAs
    warmup: bool = True  # FlexMatch threshold warm-up (unused images count as a class)
    mapping: str = "convex"  # FlexMatch's mapping M(x): convex x/(2-x) | linear x
    fairness_weight: float = 0.0  # FreeMatch's lambda_f (self-adaptive fairness); 0 = off
    n_sigma: float = 2.0  # SoftMatch: the Gaussian's width multiplier (USB default 2)
    # the strong view (the data module's augmentation, not used here)
    randaugment_ops: int = 2
    randaugment_magnitude: int = 10
    cutout: float = 0.5
    # False: in stage=selftrain only the teacher trains online; the students learn from the
    # round's offline pseudo-labels alone (the engine's business, not the method's)
    students: bool = True


class Sync:
    """How per-step statistics are combined across DDP ranks. The default is one process."""

    def mean(self, t: Tensor) -> Tensor:
        """All-reduce mean over ranks."""
        return t

    def gather(self, t: Tensor) -> Tensor:
        """All-gather along dim 0, concatenated in rank order."""
        return t


SINGLE_PROCESS = Sync()


@dataclass
class ConsistencyOutput:
    """One step's unlabelled loss and what it was made of (for logging)."""

    loss: Tensor  # scalar, unweighted: the caller multiplies it by spec.weight
    mask: Tensor  # float (B,) per-sample weight in [0, 1]
    pseudo_label: Tensor  # long (B,) the class each sample is trained towards


def check_spec(spec: ConsistencySpec, num_classes: int, num_unlabelled: int) -> None:
    """Raise ValueError (one line: what is wrong, how to fix it) on settings no method can use."""
    problems = {
        "consistency.threshold must be in [0, 1]": not 0.0 <= spec.threshold <= 1.0,
        "consistency.temperature must be > 0 (1 for hard labels)": not spec.temperature > 0,
        "consistency.ema_momentum must be in [0, 1)": not 0.0 <= spec.ema_momentum < 1.0,
        f"consistency.mapping must be one of {', '.join(MAPPINGS)}": spec.mapping not in MAPPINGS,
        "consistency.fairness_weight must be >= 0": not spec.fairness_weight >= 0,
        "consistency.debias must be >= 0 (0: off)": not spec.debias >= 0,
        "consistency.n_sigma must be > 0": not spec.n_sigma > 0,
        "the model needs at least 2 classes for a consistency loss": num_classes < 2,
        "consistency needs a non-empty unlabelled pool": num_unlabelled < 1,
    }
    for message, wrong in problems.items():
        if wrong:
            raise ValueError(f"{message} (method {spec.method!r})")


def pseudo_targets(log_probs: Tensor, temperature: float) -> Tensor:
    """Hard labels, long (B,), when T == 1 (FixMatch's argmax); else (B, C) soft targets, the
    sharpened softmax(log q / T), which equals softmax(logits_w / T) for unaligned q."""
    if temperature == 1.0:
        return log_probs.argmax(dim=-1)
    return torch.softmax(log_probs / temperature, dim=-1)


def masked_cross_entropy(logits_strong: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """FixMatch's l_u: per-sample H(target, softmax(strong)) times the mask, averaged over the
    whole batch (B, not the masked count, as FixMatch and USB do). float32 for AMP safety.
    Hard targets pick their log-probability (USB's ce_loss), soft ones sum over classes."""
    log_q = F.log_softmax(logits_strong.float(), dim=-1)
    if targets.dim() == 1:
        per_sample = -log_q.gather(1, targets[:, None]).squeeze(1)
    else:
        per_sample = -(targets * log_q).sum(dim=-1)
    return (per_sample * mask).mean()


class ConsistencyMethod(nn.Module):
    """A consistency method: its state lives in persistent buffers only, so `state_dict()`
    carries it and a resumed run continues bit for bit. Subclasses give `weight` (the mask,
    updating their state when training) and `class_thresholds`."""

    # Whether the loss targets come from the aligned probabilities (ReMixMatch / AdaMatch);
    # SoftMatch's uniform alignment only reweights, its targets use the raw weak logits (USB).
    targets_from_aligned: bool = True

    def __init__(self, spec: ConsistencySpec, num_classes: int, num_unlabelled: int) -> None:
        super().__init__()
        check_spec(spec, num_classes, num_unlabelled)
        self.spec = spec
        self.num_classes = num_classes
        self.num_unlabelled = num_unlabelled
        self.align = DistAlign(num_classes, spec.ema_momentum) if spec.dist_align else None
        self.debias = (
            Debias(num_classes, spec.ema_momentum, spec.debias) if spec.debias > 0 else None
        )

    def forward(
        self,
        logits_weak: Tensor,
        logits_strong: Tensor,
        index: Tensor,
        sync: Sync = SINGLE_PROCESS,
    ) -> ConsistencyOutput:
        """The unweighted unlabelled loss of one batch; updates the state when training.
        `index`: each image's position in the unlabelled pool (distinct within a batch)."""
        logits_weak = logits_weak.detach().float()
        if self.debias is not None:
            offset = self.debias(logits_weak, sync, update=self.training)
            logits_weak = logits_weak - offset
            logits_strong = logits_strong.float() + offset
        log_probs = F.log_softmax(logits_weak, dim=-1)
        probs = log_probs.exp()
        if self.align is not None:
            probs = self.align(probs, sync, update=self.training)
            if self.targets_from_aligned:
                log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        mask = self.weight(probs, index, sync)
        targets = pseudo_targets(log_probs, self.spec.temperature)
        loss = masked_cross_entropy(logits_strong, targets, mask)
        return ConsistencyOutput(loss=loss, mask=mask, pseudo_label=log_probs.argmax(dim=-1))

    def weight(self, probs: Tensor, index: Tensor, sync: Sync) -> Tensor:
        """Float (B,) per-sample weight in [0, 1] from the (aligned) weak probabilities;
        updates the method's state first or after, as its paper does, only when training."""
        raise NotImplementedError

    def class_thresholds(self) -> Tensor:
        """(C,) float: the per-class confidence thresholds in force now (diagnostics)."""
        raise NotImplementedError
