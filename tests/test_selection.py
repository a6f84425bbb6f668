"""Pseudo-label selection, balancing and merging on hand-made tensors (no Lightning)."""

import numpy as np
import pytest
import torch

from pipeline.engine.training_set import mixed_batches
from pipeline.selftrain.merge import merge_labelled_and_pseudo
from pipeline.selftrain.select import (
    PseudoLabels,
    cap_per_class,
    per_class_stats,
    select_confident,
    select_pseudo_labels,
    sharpen,
)

PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],  # index 10 -> class 0, conf 0.90
        [0.50, 0.30, 0.20],  # index 11 -> class 0, conf 0.50 (below 0.8)
        [0.05, 0.95, 0.00],  # index 12 -> class 1, conf 0.95
        [0.10, 0.80, 0.10],  # index 13 -> class 1, conf 0.80 (exactly the threshold)
        [0.01, 0.01, 0.98],  # index 14 -> class 2, conf 0.98
        [0.85, 0.10, 0.05],  # index 15 -> class 0, conf 0.85
    ]
)
INDEX = torch.tensor([10, 11, 12, 13, 14, 15])


def test_threshold_is_inclusive():
    mask = select_confident(torch.tensor([0.79, 0.8, 0.81]), 0.8)
    assert mask.tolist() == [False, True, True]


def test_select_by_threshold():
    pl = select_pseudo_labels(INDEX, PROBS, threshold=0.8)
    assert pl.index.tolist() == [10, 12, 13, 14, 15]
    assert pl.label.tolist() == [0, 1, 1, 2, 0]
    np.testing.assert_allclose(pl.confidence, [0.90, 0.95, 0.80, 0.98, 0.85], rtol=1e-6)
    assert pl.index.dtype == np.int64 and pl.label.dtype == np.int64
    assert pl.confidence.dtype == np.float32 and pl.probs is None


def test_order_of_predictions_does_not_matter():
    perm = torch.tensor([5, 3, 0, 4, 1, 2])
    a = select_pseudo_labels(INDEX, PROBS, threshold=0.8, max_per_class=1)
    b = select_pseudo_labels(INDEX[perm], PROBS[perm], threshold=0.8, max_per_class=1)
    assert a.index.tolist() == b.index.tolist() and a.label.tolist() == b.label.tolist()


def test_cap_per_class_keeps_most_confident():
    pl = select_pseudo_labels(INDEX, PROBS, threshold=0.8, max_per_class=1)
    # class 0: 0.90 (10) beats 0.85 (15); class 1: 0.95 (12) beats 0.80 (13)
    assert pl.index.tolist() == [10, 12, 14]


def test_cap_ties_broken_by_position():
    label = torch.tensor([0, 0, 0])
    conf = torch.tensor([0.9, 0.9, 0.9])
    keep = cap_per_class(label, conf, torch.ones(3, dtype=torch.bool), 2)
    assert keep.tolist() == [True, True, False]


def test_soft_targets_and_sharpening():
    pl = select_pseudo_labels(INDEX, PROBS, threshold=0.0, soft=True, temperature=0.5)
    assert pl.probs.shape == (6, 3)
    np.testing.assert_allclose(pl.probs.sum(1), 1.0, rtol=1e-5)
    # T=0.5 squares then renormalises: row [0.5, 0.3, 0.2] -> [.25, .09, .04] / .38
    np.testing.assert_allclose(pl.probs[1], np.array([0.25, 0.09, 0.04]) / 0.38, rtol=1e-5)
    assert torch.equal(sharpen(PROBS, 1.0), PROBS)


def test_duplicate_index_is_refused():
    with pytest.raises(ValueError, match="duplicate"):
        select_pseudo_labels(torch.tensor([1, 1]), PROBS[:2], threshold=0.5)


def test_merge_hard_labels():
    pl = PseudoLabels(
        index=np.array([3, 7]),
        label=np.array([2, 0]),
        confidence=np.array([0.9, 0.8], np.float32),
    )
    ts = merge_labelled_and_pseudo(np.array([1, 0]), pl, num_classes=3, pseudo_weight=0.5)
    assert ts.source.tolist() == [0, 0, 1, 1]
    assert ts.position.tolist() == [0, 1, 3, 7]
    assert ts.arrays()["targets"].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert ts.weight.tolist() == [1.0, 1.0, 0.5, 0.5]
    assert ts.num_labelled == 2


def test_merge_soft_labels_uses_teacher_probs():
    probs = np.array([[0.2, 0.7, 0.1]], np.float32)
    pl = PseudoLabels(np.array([4]), np.array([1]), np.array([0.7], np.float32), probs)
    ts = merge_labelled_and_pseudo(np.array([0]), pl, num_classes=3)
    np.testing.assert_allclose(ts.target_rows(np.array([1])).numpy()[0], probs[0])


def test_merge_without_pseudo_is_labelled_only():
    ts = merge_labelled_and_pseudo(np.array([2, 1, 0]), None, num_classes=3)
    assert len(ts) == 3 and ts.num_labelled == 3


def test_mixed_batches_keep_labelled_fraction():
    rng = np.random.default_rng(0)
    batches = mixed_batches(10, 100, 20, 0.25, rng)
    # each batch: 5 labelled rows (< 10) and 15 pseudo rows (>= 10)
    assert all(len(b) == 20 and (b < 10).sum() == 5 for b in batches)
    pseudo_seen = np.concatenate([b[b >= 10] for b in batches])
    # every pseudo-labelled row is seen at least once per epoch
    assert set(pseudo_seen.tolist()) == set(range(10, 110))
    assert len(batches) == 7  # ceil(100 / 15)


def test_mixed_batches_plain_epoch_and_min_batches():
    rng = np.random.default_rng(0)
    batches = mixed_batches(40, 0, 64, 0.25, rng)
    assert len(batches) == 1 and sorted(batches[0].tolist()) == list(range(40))
    batches = mixed_batches(40, 0, 64, 0.25, rng, min_batches=5)
    assert len(batches) == 5 and all(len(b) == 64 for b in batches)
    counts = np.bincount(np.concatenate(batches), minlength=40)
    assert counts.min() >= 7 and counts.max() <= 9  # cycled evenly: 320 rows over 40 samples


def test_mixed_batches_deterministic_per_seed():
    a = mixed_batches(10, 50, 16, 0.25, np.random.default_rng(3))
    b = mixed_batches(10, 50, 16, 0.25, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_per_class_stats_with_truth():
    pl = PseudoLabels(np.array([0, 1, 2]), np.array([0, 1, 1]), np.ones(3, np.float32))
    truth = np.array([0, 1, 0, 1])  # index 2 is class 0 but labelled 1
    s = per_class_stats(pl, truth, num_classes=2, num_unlabelled=4)
    assert s["pseudo_accuracy"] == pytest.approx(2 / 3)
    assert s["per_class_precision"] == [1.0, 0.5]
    assert s["per_class_coverage"] == [1.0, 0.5]  # class 0: 2 of 2 kept; class 1: 1 of 2


def test_per_class_stats_without_truth():
    pl = PseudoLabels(np.array([0, 1]), np.array([1, 1]), np.ones(2, np.float32))
    s = per_class_stats(pl, None, num_classes=2, num_unlabelled=4)
    assert s["pseudo_accuracy"] is None and s["per_class_coverage"] == [0.0, 0.5]


# --- selection streamed over shard files ------------------------------------------------------


def write_shards(tmp_path, probs: np.ndarray, num_shards: int, soft: bool, topk: int | None):
    """A labelling pass's shard files for `probs` (rows in shuffled order inside each shard)."""
    from pipeline.data.arrays import ImageArrays
    from pipeline.engine.predict import ShardPlan
    from pipeline.runtime.io import write_npz
    from pipeline.selftrain.label import shard_arrays, shard_file

    pool = ImageArrays(torch.zeros((len(probs), 1, 2, 2), dtype=torch.uint8), None)
    plan = ShardPlan(len(probs), num_shards)
    rng = np.random.default_rng(0)
    for s in range(num_shards):
        rows = rng.permutation(plan.rows(s))
        write_npz(
            shard_file(tmp_path, s, plan), shard_arrays(pool, rows, probs[rows], 0, soft, topk)
        )
    return plan, [shard_file(tmp_path, s, plan) for s in range(num_shards)]


def test_selection_over_shard_files_equals_selection_over_all_predictions(tmp_path):
    from pipeline.selftrain.select import select_from_shards

    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(97, 4, generator=g) * 2, 1).numpy()
    truth = np.random.default_rng(1).integers(0, 4, 97)
    for cap in (None, 5):
        whole = select_pseudo_labels(
            torch.arange(97), torch.from_numpy(probs), 0.5, cap, soft=True, temperature=0.5
        )
        plan, files = write_shards(tmp_path / str(cap), probs, 4, soft=True, topk=None)
        streamed, stats = select_from_shards(files, plan, 0.5, cap, True, 0.5, truth)
        for name in ("index", "label", "confidence", "probs"):
            np.testing.assert_array_equal(getattr(whole, name), getattr(streamed, name))
        assert streamed.key.tolist() == [str(i) for i in whole.index]
        assert sum(stats["confidence_hist"]["counts"]) == 97 and 0 <= stats["teacher_ece"] <= 1


def test_soft_labels_kept_as_top_k(tmp_path):
    from pipeline.selftrain.select import select_from_shards

    probs = np.array([[0.6, 0.3, 0.05, 0.05], [0.1, 0.15, 0.7, 0.05]], np.float32)
    plan, files = write_shards(tmp_path, probs, 1, soft=True, topk=2)
    kept, _ = select_from_shards(files, plan, 0.0, None, True, 1.0, None)
    assert kept.classes.tolist() == [[0, 1], [2, 1]] and kept.probs.shape == (2, 2)
    np.testing.assert_allclose(kept.probs[0], [0.6 / 0.9, 0.3 / 0.9], rtol=1e-6)  # renormalised
    arrays = kept.arrays()
    assert "probs" not in arrays and arrays["topk_classes"].shape == (2, 2)
    ts = merge_labelled_and_pseudo(np.array([3]), kept, 4)
    dense = ts.target_rows(np.array([0, 1, 2])).numpy()
    np.testing.assert_allclose(dense[0], [0, 0, 0, 1])  # the labelled row: one-hot
    np.testing.assert_allclose(dense[1], [0.6 / 0.9, 0.3 / 0.9, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(dense.sum(1), 1.0, rtol=1e-6)


def test_a_shard_missing_rows_is_refused(tmp_path):
    from pipeline.runtime.io import read_npz, write_npz
    from pipeline.selftrain.select import select_from_shards

    probs = np.full((10, 2), 0.5, np.float32)
    plan, files = write_shards(tmp_path, probs, 2, soft=False, topk=None)
    z = read_npz(files[1])
    write_npz(files[1], {k: (v[1:] if v.ndim else v) for k, v in z.items()})
    with pytest.raises(RuntimeError, match="does not hold its shard's rows once each"):
        select_from_shards(files, plan, 0.0, None, False, 1.0, None)


def test_pseudo_labels_read_back_without_their_keys_unless_asked(tmp_path):
    """A student reads pseudo_labels.npz without its keys (text: the file's largest array, 92
    bytes an image for a tar member's name); the file keeps them for its readers."""
    from pipeline.runtime.io import write_npz
    from pipeline.selftrain.label import read_pseudo_labels
    from pipeline.selftrain.select import PseudoLabels

    keys = np.array([f"pool-00000.tar/{i:08d}" for i in (3, 5, 9)])
    kept = PseudoLabels(
        index=np.array([3, 5, 9]), label=np.array([1, 0, 2]),
        confidence=np.array([0.9, 0.8, 0.99], np.float32), key=keys,
    )  # fmt: skip
    write_npz(tmp_path / "p.npz", kept.arrays())
    lean = read_pseudo_labels(tmp_path / "p.npz", 10, 3)
    assert lean.key is None
    assert lean.index.tolist() == [3, 5, 9] and lean.label.tolist() == [1, 0, 2]
    assert lean.index.dtype == np.int64 and lean.confidence.dtype == np.float32
    assert np.load(tmp_path / "p.npz")["key"].tolist() == keys.tolist()
