"""Test-time augmentation of pseudo-labels: the mean over the clean image and fixed views, the
same whatever the batch an image lands in."""

from __future__ import annotations

import dataclasses

import torch
from test_config import compose_cfg

from pipeline.cli import resolve
from pipeline.config.specs import run_spec
from pipeline.data import ImageArrays
from pipeline.engine.augment import BatchAugment, fixed_views
from pipeline.engine.batches import Batches
from pipeline.engine.predict import predict
from pipeline.models.checkpoint import build_net
from pipeline.selftrain.label import teacher_views


def label(cfg, net, images, tmp_path):
    """The teacher's probabilities as pseudo-labelling computes them (with its views)."""
    views = teacher_views(cfg, cfg.data)
    return predict(cfg, cfg.data, net, Batches(ImageArrays(images, None)), views)


def setup(*overrides: str):
    cfg = run_spec(resolve(compose_cfg("progress=false", "trainer.accelerator=cpu", *overrides)))
    torch.manual_seed(0)
    net = build_net(cfg, 10).eval()
    images = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8)
    return cfg, net, images


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


def test_views_do_not_depend_on_the_batch():
    cfg, _, images = setup()
    augment = BatchAugment(**cfg.data.augment)
    x = images.float() / 255
    whole = fixed_views(x, 5, augment, seed=3)
    part = fixed_views(x[10:14], 5, augment, seed=3)
    assert len(whole) == 5
    for w, p in zip(whole, part, strict=True):
        assert torch.equal(w[10:14], p)
    assert not torch.equal(whole[0], whole[1])  # distinct views
    assert not torch.equal(whole[0], x)


def test_pseudo_label_probs_are_the_mean_over_views(tmp_path):
    cfg, net, images = setup("pseudo_label.tta_views=4")
    index, probs = label(cfg, net, images, tmp_path)
    assert sorted(index.tolist()) == list(range(37))
    probs = probs[index.argsort()]
    augment = BatchAugment(**cfg.data.augment)
    x = images.float() / 255
    with torch.inference_mode():
        views = [x, *fixed_views(x, 4, augment, seed=0)]
        expected = sum(net(normalise(v)).softmax(1) for v in views) / 5
        clean = net(normalise(x)).softmax(1)
    assert torch.allclose(torch.from_numpy(probs), expected, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(probs), clean, atol=1e-3)


def test_no_views_is_the_clean_prediction_and_batching_changes_nothing(tmp_path):
    cfg, net, images = setup("pseudo_label.tta_views=0")
    index, probs = label(cfg, net, images, tmp_path)
    with torch.inference_mode():
        clean = net(normalise(images.float() / 255)).softmax(1)
    assert torch.allclose(torch.from_numpy(probs[index.argsort()]), clean, atol=1e-5)

    cfg, net, images = setup("pseudo_label.tta_views=3")
    big_index, big = label(cfg, net, images, tmp_path)
    small_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batch_size=5))
    small_index, small = label(small_cfg, net, images, tmp_path)
    assert torch.allclose(
        torch.from_numpy(big[big_index.argsort()]),
        torch.from_numpy(small[small_index.argsort()]),
        atol=1e-5,
    )
