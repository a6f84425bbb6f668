"""Real unlabelled pools: long-tailed and open-set splits (data.imbalance, data.open_set), their
handling at selection (distribution alignment, CReST rebalancing, OOD rejection) on hand-made
tensors, and the metrics (balanced accuracy, per-class recall, foreign share, OOD AUROC)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data.splits import (
    PoolSpec,
    Splits,
    check_disjoint,
    long_tail_counts,
    make_splits,
    network_classes,
    pool_spec,
    remap_labels,
)
from pipeline.errors import UserError
from pipeline.selftrain.pool import (
    PoolHandling,
    align_distribution,
    alignment_weights,
    crest_keep_rates,
    em_prior,
    foreign_fraction,
    keep_fraction_per_class,
    ood_auroc,
    ood_score,
    ood_threshold,
)
from pipeline.selftrain.select import select_from_shards, select_pseudo_labels

# 5 classes of 100 images each, interleaved.
LABELS = np.tile(np.arange(5), 100)


def class_counts(index: np.ndarray) -> list[int]:
    return np.bincount(LABELS[index], minlength=5).tolist()


# ---------------------------------------------------------------------------------------------
# Splits


def test_defaults_leave_the_splits_as_they_were():
    # Pinned from the balanced splits before the pool options existed (seed 0, 2 labels per
    # class, 1 of them val): a default PoolSpec, or the digits config's defaults, change nothing.
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    plain = make_splits(labels, 2, 1, seed=0, num_classes=3)
    assert plain.labelled.tolist() == [5, 6, 10]
    assert plain.val.tolist() == [0, 7, 11]
    assert plain.unlabelled.tolist() == [1, 2, 3, 4, 8, 9]
    from test_config import compose_cfg

    spec = pool_spec(compose_cfg().data, 10)
    assert spec == PoolSpec() and spec.is_default
    same = make_splits(labels, 2, 1, seed=0, num_classes=3, pool=spec)
    assert list(same.arrays()) == ["labelled", "val", "unlabelled"]  # splits.npz as before
    for a, b in zip(plain.arrays().values(), same.arrays().values(), strict=True):
        assert a.tolist() == b.tolist()


def test_every_data_option_inherits_the_pool_defaults():
    from test_config import compose_cfg

    for name in ("digits", "mnist5k", "cifar10", "stl10", "image_folder"):
        data = compose_cfg(f"data={name}").data
        assert dict(data.imbalance) == {
            "labelled_ratio": None,
            "unlabelled_ratio": None,
            "unlabelled_order": "same",
        }, name
        assert dict(data.open_set) == {
            "known_classes": None,
            "extra_pool": None,
            "unknown_in_pool": True,
        }, name


def test_long_tail_profile():
    # N_k = N_1 * ratio^(-(k-1)/(C-1)), rounded down: 20 * 10^(-k/4) for k = 0..4
    assert long_tail_counts(20, 10.0, 5).tolist() == [20, 11, 6, 3, 2]
    assert long_tail_counts(20, None, 5).tolist() == [20] * 5


def test_long_tailed_labelled_set_and_pool_same_order():
    spec = PoolSpec(labelled_ratio=10.0, unlabelled_ratio=10.0, unlabelled_order="same")
    splits = make_splits(LABELS, 20, 0, seed=3, num_classes=5, pool=spec)
    assert class_counts(splits.labelled) == [20, 11, 6, 3, 2]
    # left per class: 80, 89, 94, 97, 98; the head count every class can follow is 80
    assert class_counts(splits.unlabelled) == [80, 44, 25, 14, 8]
    check_disjoint(labelled=splits.labelled, val=splits.val, unlabelled=splits.unlabelled)
    again = make_splits(LABELS, 20, 0, seed=3, num_classes=5, pool=spec)
    assert splits.unlabelled.tolist() == again.unlabelled.tolist()  # deterministic by seed


def test_reversed_and_uniform_pools():
    reversed_ = PoolSpec(labelled_ratio=10.0, unlabelled_ratio=10.0, unlabelled_order="reversed")
    splits = make_splits(LABELS, 20, 0, seed=3, num_classes=5, pool=reversed_)
    # the rarest labelled class is the pool's head: 98 * 10^(-k/4) = 98, 55, 30, 17, 9
    assert class_counts(splits.unlabelled) == [9, 17, 30, 55, 98]
    uniform = PoolSpec(labelled_ratio=10.0, unlabelled_order="uniform")
    splits = make_splits(LABELS, 20, 2, seed=3, num_classes=5, pool=uniform)
    # 18 train labels at the head, then the val images: every other image stays in the pool
    assert class_counts(splits.labelled) == [18, 10, 5, 3, 1]
    assert class_counts(splits.val) == [2] * 5
    assert class_counts(splits.unlabelled) == [80, 88, 93, 95, 97]


def test_open_set_splits_keep_unknown_classes_in_the_pool(tmp_path):
    spec = PoolSpec(known_classes=(0, 2, 4))
    splits = make_splits(LABELS, 10, 2, seed=1, num_classes=5, pool=spec)
    assert class_counts(splits.labelled) == [8, 0, 8, 0, 8]
    assert class_counts(splits.val) == [2, 0, 2, 0, 2]
    assert class_counts(splits.unlabelled) == [90, 100, 90, 100, 90]
    assert splits.known_classes.tolist() == [0, 2, 4]
    splits.save(tmp_path / "splits.npz")
    loaded = Splits.load(tmp_path / "splits.npz")
    assert loaded.known_classes.tolist() == [0, 2, 4]
    assert loaded.unlabelled.tolist() == splits.unlabelled.tolist()
    assert remap_labels(np.array([4, 1, 0, 2, -1, 3]), (0, 2, 4)).tolist() == [2, -1, 0, 1, -1, -1]


def test_the_control_pool_leaves_the_unknown_classes_out():
    """unknown_in_pool=False: the same labelled, val and known-class pool images as the open-set
    splits, and no image of an unknown class anywhere."""
    open_set = make_splits(LABELS, 10, 2, 1, 5, PoolSpec(known_classes=(0, 2, 4)))
    control = make_splits(
        LABELS, 10, 2, 1, 5, PoolSpec(known_classes=(0, 2, 4), unknown_in_pool=False)
    )
    assert control.labelled.tolist() == open_set.labelled.tolist()
    assert control.val.tolist() == open_set.val.tolist()
    assert class_counts(control.unlabelled) == [90, 0, 90, 0, 90]
    known_part = open_set.unlabelled[np.isin(LABELS[open_set.unlabelled], (0, 2, 4))]
    assert control.unlabelled.tolist() == known_part.tolist()
    assert pool_spec({"open_set": {"known_classes": 3, "unknown_in_pool": False}}, 10) == PoolSpec(
        known_classes=(0, 1, 2), unknown_in_pool=False
    )
    with pytest.raises(UserError, match="known_classes too"):
        pool_spec({"open_set": {"unknown_in_pool": False}}, 10)
    with pytest.raises(UserError, match="drop one"):
        pool_spec(
            {"open_set": {"known_classes": 3, "unknown_in_pool": False, "extra_pool": "digits"}}, 10
        )
    with pytest.raises(UserError, match="true or false"):
        pool_spec({"open_set": {"known_classes": 3, "unknown_in_pool": "no"}}, 10)


def test_pool_options_are_checked():
    with pytest.raises(UserError, match="known_classes"):
        pool_spec({"open_set": {"known_classes": 10}}, 10)  # no unknown class left
    with pytest.raises(UserError, match="known_classes"):
        pool_spec({"open_set": {"known_classes": [0, 12]}}, 10)
    with pytest.raises(UserError, match="labelled_ratio"):
        pool_spec({"imbalance": {"labelled_ratio": 0.5}}, 10)
    with pytest.raises(UserError, match="uniform"):
        pool_spec({"imbalance": {"unlabelled_ratio": 10, "unlabelled_order": "uniform"}}, 10)
    assert pool_spec({"open_set": {"known_classes": 3}}, 10).known_classes == (0, 1, 2)
    assert network_classes({"num_classes": 10, "open_set": {"known_classes": [1, 5, 7]}}) == 3
    assert network_classes({"num_classes": 10}) == 10


def test_config_checks_of_the_new_keys():
    from test_config import compose_cfg

    from pipeline.config.checks import validate

    bad = {
        "pseudo_label.dist_align=bogus": "dist_align",
        "pseudo_label.prior=[1,2]": "dist_align=given",
        "pseudo_label.ood_score=maha": "ood_score",
        "pseudo_label.ood_quantile=1.0": "ood_quantile",
        "pseudo_label.rebalance_alpha=-1": "rebalance_alpha",
        "data.imbalance.unlabelled_order=sideways": "unlabelled_order",
        "data.open_set.extra_pool=mnist5k": "known_classes",
        "pseudo_label.dist_align=given pseudo_label.prior=[1,2,3]": "3 weights for the network's 10",
    }
    for override, message in bad.items():
        with pytest.raises(UserError, match=message):
            validate(compose_cfg(*override.split()))
    validate(
        compose_cfg("pseudo_label.dist_align=given", "pseudo_label.prior=[1,1,1,1,1,1,1,1,1,1]")
    )
    known = ("data.open_set.known_classes=[1,3,5]", "pseudo_label.dist_align=given")
    validate(compose_cfg(*known, "pseudo_label.prior=[0.5,0.25,0.25]"))  # K = 3 weights


@pytest.fixture(scope="module")
def open_task():
    """digits with the even classes known and mnist5k's train images as foreign pool images."""
    from conftest import compose_spec

    from pipeline.data.task import prepare_task

    data = compose_spec(
        "data.open_set.known_classes=[0,2,4,6,8]", "data.open_set.extra_pool=mnist5k"
    ).data
    return prepare_task(data, 0, None), data.node


def test_open_set_task(open_task):
    task, data = open_task
    assert task.num_classes == 5 and task.bundle.classes == ["0", "2", "4", "6", "8"]
    assert network_classes(data) == 5
    assert np.bincount(task.labelled.labels.numpy()).tolist() == [4] * 5
    assert set(task.test.labels.tolist()) == {0, 1, 2, 3, 4}  # the known classes only
    # the pool: digits' train images of every class but the 20 labelled, then mnist5k's 4000
    digits_train = len(task.bundle.train)
    assert len(task.unlabelled) == digits_train - 20 + 4000
    truth, foreign = task.unlabelled_truth(), task.pool_foreign
    assert foreign.tolist().count(1) == (truth == -1).sum()
    assert foreign[-4000:].tolist() == [1] * 4000 and (truth[-4000:] == -1).all()
    assert ((truth >= 0) == (foreign == 0)).all()
    assert tuple(task.unlabelled.load(np.arange(2))[0].shape) == (2, 1, 8, 8)  # shaped like digits


def test_an_online_method_on_an_open_set_pool_is_said_in_one_line(open_task, caplog):
    """An online method trains on the foreign pool images as if they were known (mnist5k's
    FixMatch teacher put 14% foreign images into the merge): a warning names the fix."""
    from conftest import compose_spec

    from pipeline.consistency import ConsistencySpec
    from pipeline.data.task import prepare_task
    from pipeline.engine.train import online_pool

    spec, digits = ConsistencySpec(method="fixmatch"), compose_spec().data
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.train"):
        assert online_pool(spec, digits, open_task[0], "teacher") is not None
        (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "consistency=fixmatch" in line and "add consistency=none" in line
        caplog.clear()
        assert online_pool(spec, digits, open_task[0], "students") is not None  # said once a run
        assert online_pool(spec, digits, prepare_task(digits, 0, None), "teacher") is not None
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # a closed pool


# ---------------------------------------------------------------------------------------------
# Handling at selection


def test_alignment_formula():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    # p'(c) = p(c) w(c) / sum_j p(j) w(j): [0.1, 0.3, 0.2] / 0.6
    out = align_distribution(probs, np.array([0.2, 1.0, 1.0]))
    np.testing.assert_allclose(out.numpy(), [[1 / 6, 1 / 2, 1 / 3]], rtol=1e-6)
    # labelled / given: target prior over the pool's mean prediction
    w = alignment_weights(
        "labelled", pool_mean=np.array([0.5, 0.5]), labelled_prior=np.array([0.75, 0.25])
    )
    np.testing.assert_allclose(w, [1.5, 0.5])
    w = alignment_weights("given", pool_mean=np.array([0.5, 0.5]), given=np.array([3.0, 1.0]))
    np.testing.assert_allclose(w, [1.5, 0.5])
    w = alignment_weights(
        "estimated", labelled_prior=np.array([0.5, 0.5]), estimated=np.array([0.6, 0.4])
    )
    np.testing.assert_allclose(w, [1.2, 0.8])
    assert alignment_weights("none") is None


def test_em_prior_by_hand():
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    train = np.array([0.5, 0.5])
    # step 1: the mean prediction [0.6, 0.4]; step 2: rows [6/7, 1/7] and [1/2, 1/2] -> 19/28
    np.testing.assert_allclose(em_prior(lambda: [probs], train, iterations=1), [0.6, 0.4])
    np.testing.assert_allclose(em_prior(lambda: [probs], train, iterations=2), [19 / 28, 9 / 28])
    # converged: a fixed point of the update, also when the pool comes in chunks
    prior = em_prior(lambda: [probs[:1], probs[1:]], train, iterations=500, tol=1e-12)
    again = align_distribution(torch.from_numpy(probs), prior / train).mean(0).numpy()
    np.testing.assert_allclose(again, prior, atol=1e-9)


def test_crest_keep_rates_and_fraction():
    # by labelled count: class 0 (100), class 2 (50), class 1 (10): keep N_3/N_1, N_2/N_1, 1
    np.testing.assert_allclose(crest_keep_rates(np.array([100, 10, 50]), 1.0), [0.1, 1.0, 0.5])
    np.testing.assert_allclose(
        crest_keep_rates(np.array([100, 10, 50]), 0.5), [0.1**0.5, 1.0, 0.5**0.5]
    )
    label = torch.tensor([0] * 10 + [2] * 4)
    conf = torch.tensor([0.5, 0.9, 0.6, 0.7, 0.8, 0.55, 0.65, 0.75, 0.85, 0.95, 0.9, 0.8, 0.7, 0.6])
    keep = keep_fraction_per_class(
        label, conf, torch.ones(14, dtype=torch.bool), np.array([0.1, 1.0, 0.5])
    )
    assert torch.nonzero(keep).flatten().tolist() == [9, 10, 11]  # 1 of class 0, 2 of class 2


def test_ood_scores_threshold_and_auroc():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    energy = torch.logsumexp(logits, 1).numpy()
    np.testing.assert_allclose(
        ood_score("energy", np.zeros(2), energy), [2.126928, 0.693147], rtol=1e-5
    )
    assert ood_score("msp", np.array([0.7, 0.4]), None).tolist() == [0.7, 0.4]
    assert ood_threshold(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 0.25) == 2.0
    assert ood_auroc(np.array([0.9, 0.8, 0.3, 0.6]), np.array([0, 0, 1, 1])) == 1.0
    assert ood_auroc(np.array([0.5, 0.8, 0.3, 0.6, 0.1]), np.array([0, 0, 1, 1, -1])) == 0.75
    assert ood_auroc(np.array([0.5, 0.8]), np.array([0, 0])) is None
    assert foreign_fraction(np.array([0, 1, 2, 4]), np.array([1, 0, -1, 0, 1])) == 2 / 3


PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],
        [0.50, 0.30, 0.20],
        [0.05, 0.95, 0.00],
        [0.10, 0.80, 0.10],
        [0.01, 0.01, 0.98],
        [0.85, 0.10, 0.05],
    ]
)
INDEX = torch.tensor([10, 11, 12, 13, 14, 15])


def test_select_with_alignment_ood_and_rebalance():
    # Alignment first: w halves class 0, so row 11 becomes [0.25, 0.3, 0.2]/0.75 -> class 1
    w = np.array([0.5, 1.0, 1.0])
    pl = select_pseudo_labels(INDEX, PROBS, 0.0, handling=PoolHandling(align_weights=w))
    assert pl.label.tolist() == [0, 1, 1, 1, 2, 0]
    np.testing.assert_allclose(pl.confidence[1], 0.4, rtol=1e-6)
    # OOD on the teacher's own max probability (msp): below 0.85 is rejected
    ood = PoolHandling(ood_score="msp", ood_threshold=0.85)
    assert select_pseudo_labels(INDEX, PROBS, 0.0, handling=ood).index.tolist() == [10, 12, 14, 15]
    energy = torch.tensor([1.0, 5.0, 0.0, 5.0, 5.0, 0.5])
    ood = PoolHandling(ood_score="energy", ood_threshold=0.9)
    kept = select_pseudo_labels(INDEX, PROBS, 0.0, handling=ood, energy=energy)
    assert kept.index.tolist() == [10, 11, 13, 14]
    # CReST: class 0 keeps half of its 3 (one: the most confident), classes 1, 2 all
    crest = PoolHandling(keep_rates=np.array([0.5, 1.0, 1.0]))
    assert select_pseudo_labels(INDEX, PROBS, 0.0, handling=crest).index.tolist() == [
        10,
        12,
        13,
        14,
    ]


def test_select_from_shards_with_handling(tmp_path):
    from pipeline.engine.predict import ShardPlan
    from pipeline.runtime.io import write_npz

    plan = ShardPlan(6, 2)
    files = []
    energy = np.array([1.0, 5.0, 0.0, 5.0, 5.0, 0.5], np.float32)
    for shard in range(2):
        rows = plan.rows(shard)
        probs = PROBS[rows].numpy()
        path = tmp_path / f"shard-{shard}.npz"
        write_npz(
            path,
            {
                "index": rows.astype(np.int64),
                "key": np.array([f"k{r}" for r in rows]),
                "label": probs.argmax(1).astype(np.int64),
                "confidence": probs.max(1).astype(np.float32),
                "probs": probs,
                "energy": energy[rows],
                "num_bad": np.array(0, np.int64),
            },
        )
        files.append(path)
    foreign = np.array([0, 1, 0, 1, 0, 1], np.int8)
    handling = PoolHandling(
        align_weights=np.array([0.5, 1.0, 1.0]), ood_score="energy", ood_threshold=0.9
    )
    kept, stats = select_from_shards(
        files, plan, 0.3, None, False, 1.0, None, "none", handling, foreign
    )
    # energy keeps rows 0, 1, 3, 4; aligned row 1 is class 1 at 0.4 (>= 0.3)
    assert kept.index.tolist() == [0, 1, 3, 4]
    assert kept.label.tolist() == [0, 1, 1, 2]
    assert stats["num_ood_rejected"] == 2 and stats["ood_threshold"] == 0.9
    assert stats["merged_foreign_fraction"] == 0.5
    # energy of known rows [1, 0, 5] vs foreign [5, 5, 0.5]: 2 wins + 2 ties (1/2 each) of 9
    assert stats["ood_auroc"] == pytest.approx(3 / 9)


# ---------------------------------------------------------------------------------------------
# Handling in training: the logit-adjusted loss (train.logit_adjust)


def hand_made_set():
    """4 labelled rows (classes 0, 0, 1, 1) and 3 pseudo-labelled ones (0, 0, 2; the last at
    weight 0.5), 3 classes."""
    from pipeline.engine.training_set import TrainingSet

    return TrainingSet(
        source=np.array([0, 0, 0, 0, 1, 1, 1], np.int8),
        position=np.array([0, 1, 2, 3, 0, 1, 2]),
        label=np.array([0, 0, 1, 1, 0, 0, 2]),
        weight=np.array([1, 1, 1, 1, 1, 1, 0.5], np.float32),
        num_classes=3,
    )


def test_class_prior_is_what_the_batches_hold():
    from pipeline.engine.losses import logit_offset
    from pipeline.engine.training_set import mixed_batches

    ts = hand_made_set()
    # Batches of 8 with a quarter labelled: 2 labelled rows and 6 pseudo-labelled ones each.
    # Weighted mass per row: labelled [2, 2, 0] / 4, pseudo-labelled [2, 0, 0.5] / 3; a batch
    # holds 2 x [0.5, 0.5, 0] + 6 x [2/3, 0, 1/6] = [5, 1, 1].
    prior = ts.class_prior(8, 0.25)
    assert prior == pytest.approx([5 / 7, 1 / 7, 1 / 7])
    # Two batches of mixed_batches: every labelled row once, every pseudo-labelled one 4 times.
    rows = np.concatenate(mixed_batches(4, 3, 8, 0.25, np.random.default_rng(0), min_batches=2))
    mass = (ts.target_rows(rows).numpy() * ts.weight[rows, None]).sum(0)
    assert prior == pytest.approx(mass / mass.sum())
    assert ts.class_prior(8, 1.0) == pytest.approx(np.array([4, 2, 0.5]) / 6.5)  # plain shuffle
    assert logit_offset(prior, 1.0).tolist() == pytest.approx(np.log(prior).tolist())
    assert logit_offset(np.array([0.5, 0.5, 0.0]), 2.0).tolist() == pytest.approx(
        [2 * np.log(0.5), 2 * np.log(0.5), 2 * np.log(1e-12)]
    )


def test_logit_adjusted_loss_by_hand():
    """The training loss is the cross-entropy of logits + tau log(prior) (Menon et al. 2021);
    predictions and the checkpoint do not see the offset."""
    from pipeline.engine.losses import logit_offset
    from pipeline.engine.module import LitClassifier

    prior = np.array([0.7, 0.2, 0.1])
    net = nn.Linear(2, 3)
    module = LitClassifier(net, 3, torch.optim.SGD, logit_offset=logit_offset(prior, 1.0))
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    batch = {"target": torch.eye(3)[[1, 2]], "weight": torch.ones(2)}
    adjusted = logits + torch.log(torch.tensor(prior, dtype=torch.float32))
    # -log softmax(adjusted)[target], by hand, for the two rows.
    expected = -(adjusted[[0, 1], [1, 2]] - torch.logsumexp(adjusted, dim=1)).mean()
    assert module._supervised_loss(logits, batch).item() == pytest.approx(expected.item())
    plain = LitClassifier(net, 3, torch.optim.SGD)._supervised_loss(logits, batch)
    assert plain.item() < expected.item()  # the rare classes' targets cost more to reach
    assert set(module.state_dict()) == set(net.state_dict(prefix="net."))
    x = torch.randn(4, 2)
    assert torch.equal(module(x), net(x))


def test_logit_adjustment_evens_out_what_a_long_tailed_training_predicts(tmp_path):
    """A training set with class 0 over-represented 10:1 (random images: the network can only
    learn the prior): on unseen images the plain loss predicts class 0 most of the time, the
    logit-adjusted one about as often as the others."""
    from conftest import fit_small

    labels = np.array([0] * 60 + [1] * 6 + [2] * 6)
    g = torch.Generator().manual_seed(1)
    unseen = torch.randint(0, 256, (300, 1, 8, 8), generator=g, dtype=torch.uint8).float() / 255
    share = {}
    for tau in (0.0, 1.0):
        _, net, *_ = fit_small(
            tmp_path, str(tau), "train.min_steps=60", "train.batch_size=12",
            f"train.logit_adjust={tau}", epochs=6, labels=labels,
        )  # fmt: skip
        with torch.no_grad():
            share[tau] = (net.eval()(unseen).argmax(1) == 0).float().mean().item()
    assert share[0.0] > 0.8 and share[1.0] < 0.6, share


def test_class_mass_of_soft_targets_is_the_sum_of_their_rows():
    """Soft pseudo-labels (every class, or the top k) spread their weight over the classes
    they name: the prior's mass is the weighted sum of the target rows."""
    rng = np.random.default_rng(0)
    for topk in (None, 2):
        ts = hand_made_set()
        width = 3 if topk is None else topk
        probs = rng.random((3, width)).astype(np.float32)
        ts.soft_probs = probs / probs.sum(1, keepdims=True)
        ts.soft_classes = None if topk is None else np.array([[0, 1], [2, 0], [1, 2]])
        rows = np.arange(len(ts))
        expected = (ts.target_rows(rows).numpy() * ts.weight[:, None]).sum(0)
        assert ts.class_prior(8, 1.0) == pytest.approx(expected / expected.sum())


# ---------------------------------------------------------------------------------------------
# Metrics


class ConstantNet(nn.Module):
    """Predicts class 0 for every image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(1, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.num_classes)
        out[:, 0] = 1.0
        return out


def test_evaluate_reports_per_class_recall_and_balanced_accuracy():
    from conftest import compose_spec

    from pipeline.data import load_data
    from pipeline.engine.fit import evaluate

    cfg = compose_spec("progress=false", "trainer.accelerator=cpu")
    test = load_data(cfg.data.node).test
    metrics = evaluate(cfg, cfg.data, ConstantNet(10), test)
    share = float((test.labels == 0).float().mean())
    assert metrics["test_accuracy"] == pytest.approx(share)
    assert metrics["per_class_recall"] == [1.0] + [0.0] * 9
    assert metrics["balanced_accuracy"] == pytest.approx(0.1)
    assert "balanced_accuracy" not in evaluate(cfg, cfg.data, ConstantNet(10), test, split="val")


def test_predict_step_gives_the_clean_views_energy():
    from pipeline.engine.module import LitClassifier

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    module = LitClassifier(net, num_classes=3, optimizer=torch.optim.SGD)
    x = torch.randn(2, 1, 2, 2)
    views = [x, x.flip(-1)]
    out = module.predict_step({"image": x, "views": views, "index": torch.arange(2)}, 0)
    with torch.no_grad():
        expected = (net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2
        assert torch.allclose(out["probs"], expected)
        assert torch.allclose(out["energy"], torch.logsumexp(net(x), 1))


@pytest.mark.slow
def test_open_set_selftrain_through_the_cli(tmp_path):
    from conftest import FAST, run_cli

    run_dir = tmp_path / "run"
    proc = run_cli(
        *FAST,
        "train.epochs=2",
        "train.min_steps=20",
        "pseudo_label.tta_views=1",
        "data.open_set.known_classes=6",
        "data.imbalance.labelled_ratio=4",
        "pseudo_label.ood_score=energy",
        "pseudo_label.dist_align=labelled",
        "pseudo_label.rebalance_alpha=0.5",
        "train.logit_adjust=1.0",
        f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(run_dir / "splits.npz") as z:
        assert z["known_classes"].tolist() == [0, 1, 2, 3, 4, 5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_labelled"] == 4 + 3 + 2 + 1 + 1 + 1  # 4 * 4^(-k/5), rounded down
    teacher, student = summary["rounds"]
    for r in (teacher, student):
        assert len(r["per_class_recall"]) == 6
        held = [x for x in r["per_class_recall"] if x is not None]
        assert r["balanced_accuracy"] == pytest.approx(sum(held) / len(held))
        assert r["known_class_accuracy"] == r["test_accuracy"]
    assert teacher["merged_foreign_fraction"] is None and teacher["ood_auroc"] is None
    assert 0.0 <= student["merged_foreign_fraction"] <= 1.0
    assert 0.0 <= student["ood_auroc"] <= 1.0
    diagnostics = json.loads((run_dir / "round_1" / "pseudo_diagnostics.json").read_text())
    assert len(diagnostics["dist_align_weights"]) == 6
    assert len(diagnostics["rebalance_keep_rates"]) == 6
    assert diagnostics["num_ood_rejected"] >= 0
    assert "bal acc" in proc.stdout
    line = f"round 1: foreign images {100 * student['merged_foreign_fraction']:.2f}% of the merged"
    assert line in proc.stdout and f"OOD AUROC {student['ood_auroc']:.3f}" in proc.stdout


# ---------------------------------------------------------------------------------------------
# The ceiling: scripts/ceiling_labels.py writes the pool's true labels as pseudo-labels


def ceiling_script():
    import importlib
    import sys

    from conftest import REPO

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("ceiling_labels")


def test_ceiling_labels_are_the_pools_known_truth(tmp_path, capsys):
    from conftest import compose_spec

    from pipeline.data.task import prepare_task
    from pipeline.selftrain.label import read_pseudo_labels

    overrides = ["data=digits", "data.open_set.known_classes=6", "seed=1"]
    out = tmp_path / "truth.npz"
    assert ceiling_script().main(["--out", str(out), *overrides]) == 0
    task = prepare_task(compose_spec(*overrides).data, 1, None)
    truth = task.unlabelled.labels.numpy()
    with np.load(out) as z:
        assert sorted(z) == ["confidence", "index", "label"]
        known = np.flatnonzero(truth >= 0)
        # Every known-class pool image once, with its true label; the 4 unknown classes' left out.
        assert z["index"].tolist() == known.tolist()
        assert z["label"].tolist() == truth[known].tolist()
        assert (z["confidence"] == 1).all()
        assert 0 < len(known) < len(truth) and z["label"].max() == 5
    pseudo = read_pseudo_labels(out, len(task.unlabelled), task.num_classes)  # what pseudo_in reads
    assert pseudo.index.tolist() == known.tolist()
    printed = capsys.readouterr().out
    assert f"wrote the true labels of {len(known)} of the {len(truth)} pool images" in printed
    assert f"stage=train pseudo_in={out} {' '.join(overrides)}" in printed


def test_ceiling_labels_refuse_what_has_no_ceiling(tmp_path, capsys):
    from streaming_data import class_tree, flat_folder

    script = ceiling_script()
    assert script.main(["--out", str(tmp_path / "truth.txt"), "data=digits"]) == 2
    assert "must end in .npz" in capsys.readouterr().err
    assert script.main(["--out", str(tmp_path / "t.npz"), "pseudo_label.threshold=1.5"]) == 2
    assert "pseudo_label.threshold=1.5 is outside [0, 1]" in capsys.readouterr().err
    class_tree(tmp_path / "labelled", per_class=10, seed=0)
    flat_folder(tmp_path / "pool", 6, seed=1)
    folder = [
        "data=image_folder",
        f"data.labelled_dir={tmp_path / 'labelled'}",
        f"data.unlabelled_dir={tmp_path / 'pool'}",
        f"data.num_classes={len(list((tmp_path / 'labelled').iterdir()))}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    out = tmp_path / "truth.npz"
    assert script.main(["--out", str(out), *folder]) == 2
    assert "the pool's true labels are unknown here" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_a_student_trains_on_the_ceiling_labels_through_the_cli(tmp_path):
    from conftest import FAST, run_cli

    pool = ["data=digits", "data.imbalance.unlabelled_ratio=10", "seed=2"]
    out = tmp_path / "truth.npz"
    assert ceiling_script().main(["--out", str(out), *pool]) == 0
    run_dir = tmp_path / "ceiling"
    proc = run_cli(
        *FAST, *pool, "stage=train", f"pseudo_in={out}", "train.logit_adjust=1.0",
        f"run_dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (student,) = json.loads((run_dir / "summary.json").read_text())["rounds"]
    with np.load(out) as z, np.load(run_dir / "splits.npz") as splits:
        assert student["num_pseudo"] == len(z["index"]) == len(splits["unlabelled"])
    assert student["balanced_accuracy"] > 0.5  # 10 classes: chance is 0.1
