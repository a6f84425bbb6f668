"""Step 3a on real pools (long-tailed, open-set): what selection does beyond the threshold and
the cap. Distribution alignment (pseudo_label.dist_align), CReST's per-class keep rates
(pseudo_label.rebalance_alpha) and out-of-distribution rejection (pseudo_label.ood_score; their
values: config/checks.py), bundled as a `PoolHandling` that pipeline/selftrain/select.py applies.

Pure functions on tensors and arrays, like select.py: each is tested on hand-made arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch


def align_distribution(probs: torch.Tensor, weights: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Re-weighted probabilities p'(c|x) = p(c|x) w(c) / sum_j p(j|x) w(j) (rows of `probs`)."""
    w = torch.as_tensor(np.asarray(weights), dtype=probs.dtype)
    p = probs * w
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def em_prior(
    chunks: Callable[[], Iterable[np.ndarray]],
    train_prior: np.ndarray,
    iterations: int = 100,
    tol: float = 1e-6,
) -> np.ndarray:
    """The pool's class prior by Saerens et al. (2002)'s EM: from prior_0 = prior_train,
    p_t(c|x) = p(c|x) prior_t(c) / prior_train(c) (renormalised over c) and
    prior_{t+1}(c) = mean_i p_t(c|x_i), until the prior moves less than `tol`.

    `chunks()` yields the teacher's probabilities on the pool, a chunk at a time (each call a
    new pass), so the pool never has to fit in memory."""
    train = np.clip(np.asarray(train_prior, np.float64), 1e-12, None)
    train = train / train.sum()
    prior = train.copy()
    for _ in range(iterations):
        total, n = np.zeros_like(prior), 0
        for p in chunks():
            adapted = align_distribution(torch.from_numpy(np.asarray(p, np.float64)), prior / train)
            total += adapted.sum(dim=0).numpy()
            n += len(p)
        new = total / max(1, n)
        done = np.abs(new - prior).max() < tol
        prior = new
        if done:
            break
    return prior


def alignment_weights(
    mode: str,
    pool_mean: np.ndarray | None = None,
    labelled_prior: np.ndarray | None = None,
    given: np.ndarray | None = None,
    estimated: np.ndarray | None = None,
) -> np.ndarray | None:
    """w(c) of p'(c|x) ∝ p(c|x) w(c) for pseudo_label.dist_align (None: none):

    - labelled: w = prior_labelled / mean_pool_p (distribution alignment, ReMixMatch, toward
      the labelled set's class distribution);
    - given: w = prior_given / mean_pool_p (pseudo_label.prior, renormalised);
    - estimated: w = prior_EM / prior_labelled (Saerens et al. 2002, em_prior: the teacher was
      trained on the labelled distribution; the pool's is estimated by EM).
    """
    if mode == "none":
        return None
    if mode == "estimated":
        assert estimated is not None and labelled_prior is not None
        return estimated / np.clip(labelled_prior, 1e-12, None)
    target = labelled_prior if mode == "labelled" else given
    assert target is not None and pool_mean is not None
    target = np.asarray(target, np.float64) / np.sum(target)
    return target / np.clip(pool_mean, 1e-12, None)


def crest_keep_rates(labelled_counts: np.ndarray, alpha: float) -> np.ndarray:
    """CReST's per-class keep rate (Wei et al. 2021): with the classes sorted by labelled count,
    most frequent first (k = 1..L, ties by class index), class k keeps (N_{L+1-k} / N_1)^alpha
    of its pseudo-labels: the rarest class keeps all, the most frequent the least."""
    counts = np.asarray(labelled_counts, np.float64)
    order = np.argsort(-counts, kind="stable")
    by_rank = counts[order]
    rates = np.empty_like(counts)
    rates[order] = (by_rank[::-1] / max(by_rank[0], 1e-12)) ** alpha
    return rates


def keep_fraction_per_class(
    label: torch.Tensor, confidence: torch.Tensor, mask: torch.Tensor, rates: np.ndarray
) -> torch.Tensor:
    """Of the selected predictions of each class c, the floor(n_c * rates[c]) most confident
    (ties: lower position first)."""
    keep = torch.zeros_like(mask)
    for c in label[mask].unique().tolist():
        members = torch.nonzero(mask & label.eq(c)).flatten()
        n = int(np.floor(len(members) * float(rates[c]) + 1e-9))
        order = torch.sort(-confidence[members], stable=True).indices
        keep[members[order[:n]]] = True
    return keep


def ood_score(kind: str, confidence: np.ndarray, energy: np.ndarray | None) -> np.ndarray:
    """Per image, higher = more in-distribution: msp, the max softmax probability (the
    teacher's confidence); energy, logsumexp of the logits (the negative free energy, Liu et
    al. 2020)."""
    if kind == "msp":
        return np.asarray(confidence, np.float64)
    if kind == "energy":
        if energy is None:
            raise ValueError("pseudo_label.ood_score=energy needs the energy of each image")
        return np.asarray(energy, np.float64)
    raise ValueError(f"unknown OOD score {kind!r}")


def ood_threshold(reference: np.ndarray, quantile: float) -> float:
    """The `quantile` of the score on the labelled (and val) images: a pool image scoring
    below it is rejected as out-of-distribution."""
    return float(np.quantile(np.asarray(reference, np.float64), quantile))


def ood_auroc(score: np.ndarray, foreign: np.ndarray) -> float | None:
    """AUROC of `score` separating known (positive) from foreign pool images, over the images
    whose status is known (foreign 0 or 1); None without both kinds."""
    from sklearn.metrics import roc_auc_score

    told = np.asarray(foreign) >= 0
    known = np.asarray(foreign)[told] == 0
    if known.all() or not known.any():
        return None
    return float(roc_auc_score(known, np.asarray(score)[told]))


def foreign_fraction(index: np.ndarray, foreign: np.ndarray) -> float | None:
    """Share of the kept pseudo-labels whose image is foreign, over those whose status is
    known; None when none is."""
    status = np.asarray(foreign)[np.asarray(index, np.int64)]
    told = status >= 0
    return float((status[told] == 1).mean()) if told.any() else None


@dataclass(frozen=True)
class PoolHandling:
    """What selection does beyond the threshold and the cap (all off by default):
    `align_weights` w of p'(c|x) ∝ p(c|x) w(c) before thresholding (pseudo_label.dist_align),
    `keep_rates` per class (pseudo_label.rebalance_alpha), and the OOD score whose values
    below `ood_threshold` are rejected (pseudo_label.ood_score; "none": none, but msp still
    gives the AUROC on open-set pools)."""

    align_weights: np.ndarray | None = None
    keep_rates: np.ndarray | None = None
    ood_score: str = "none"
    ood_threshold: float | None = None
