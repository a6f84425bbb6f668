"""The standard SSL protocols as presets (experiment=cifar10_40 ...): each composes to the
benchmark's setting (WRN-28-2, SGD, 2^20 steps of 64 labelled + 448 unlabelled images, EMA,
threshold 0.95, its dataset and label count) and runs a few steps on generated images of its
dataset's shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from torchvision.io import encode_jpeg

from pipeline import config
from pipeline.cli import CONF_DIR, resolve

config.register()

# preset -> (dataset, labels per class, image size)
PRESETS = {
    "cifar10_40": ("cifar10", 4, 32),
    "cifar10_250": ("cifar10", 25, 32),
    "cifar10_4000": ("cifar10", 400, 32),
    "svhn_40": ("svhn", 4, 32),
    "svhn_250": ("svhn", 25, 32),
    "svhn_1000": ("svhn", 100, 32),
    "stl10_1000": ("stl10", 100, 96),
}


def test_every_preset_is_listed():
    presets = {p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")}
    assert set(PRESETS) <= presets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_to_the_protocol(preset):
    dataset, per_class, size = PRESETS[preset]
    cfg = resolve(compose_cfg(f"experiment={preset}"))
    assert cfg.data.name == dataset and cfg.data.labels_per_class == per_class
    assert cfg.data.image_size == size and cfg.data.channels == 3
    assert cfg.model.name == "wide_resnet28_2" and cfg.student_model.name == "wide_resnet28_2"
    assert cfg.train.min_steps == 2**20 and cfg.train.batch_size == 512
    assert cfg.pseudo_label.labelled_fraction * cfg.train.batch_size == 64  # B = 64, mu = 7
    assert cfg.train.ema_decay == 0.999 and cfg.pseudo_label.threshold == 0.95
    net = instantiate(cfg.model.net)
    opt = instantiate(cfg.optimizer)(net.parameters())
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == 0.03 and group["momentum"] == 0.9 and group["nesterov"]
    assert group["weight_decay"] == 5e-4
    assert cfg.scheduler._target_.endswith("CosineAnnealingLR")
    assert net(torch.zeros(2, 3, size, size)).shape == (2, 10)


def _write_folder(root: Path, size: int, per_class: int, seed: int) -> None:
    """10 classes of RGB JPEGs, class c a bright square at its own place on noise."""
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            x = rng.integers(0, 60, (3, size, size)).astype(np.uint8)
            r, q = divmod(c, 5)
            s = size // 5
            x[:, q * s : (q + 1) * s, r * s : (r + 2) * s] = 220
            data = encode_jpeg(torch.from_numpy(x), quality=90).numpy().tobytes()
            (root / f"class{c}" / f"{i}.jpg").write_bytes(data)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cifar10_40", "svhn_40", "stl10_1000"])
def test_preset_runs_a_few_steps_on_images_of_its_shape(preset, tmp_path):
    from conftest import run_cli

    _, per_class, size = PRESETS[preset]
    labelled_per_class = min(per_class, 4)
    _write_folder(tmp_path / "lab", size, labelled_per_class + 2, 0)
    _write_folder(tmp_path / "test", size, 1, 1)
    run_dir = tmp_path / "run"
    proc = run_cli(
        f"experiment={preset}",
        "data=image_folder",  # the command line wins over the preset's dataset
        "data.num_classes=10",
        f"data.labelled_dir={tmp_path / 'lab'}",
        f"data.test_dir={tmp_path / 'test'}",
        f"data.labels_per_class={labelled_per_class}",
        f"data.image_size={size}",
        "train.epochs=1",
        "train.min_steps=2",
        "train.batch_size=16",
        "train.eval_batch_size=64",
        "selftrain.rounds=1",
        "pseudo_label.threshold=0.0",  # a 2-step teacher is not confident: keep every label
        "pseudo_label.tta_views=1",
        "progress=false",
        "trainer.accelerator=cpu",
        f"run_dir={run_dir}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["model"] for r in summary["rounds"]] == ["wide_resnet28_2"] * 2
    assert summary["rounds"][1]["num_pseudo"] == summary["num_unlabelled"] == 20
    ckpt = torch.load(run_dir / "round_1" / "model.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["image_size"] == size
    assert ckpt["pipeline"] is not None
    saved = (run_dir / "config.yaml").read_text()
    assert "ema_decay: 0.999" in saved and "min_steps: 2" in saved


@pytest.mark.parametrize("method", ["fixmatch", "flexmatch", "freematch", "softmatch"])
def test_preset_with_an_online_method_composes_to_usbs_protocol(method):
    """experiment=cifar10_40 consistency=METHOD: one training (no student rounds) of 2^20 steps,
    each of 64 labelled and 7 x 64 pool images, SGD 0.03 with cosine decay, EMA 0.999."""
    cfg = resolve(compose_cfg("experiment=cifar10_40", f"consistency={method}"))
    assert cfg.consistency.method == method
    assert cfg.train.batch_size == 64 and cfg.consistency.mu == 7
    assert cfg.selftrain.rounds == 0 and cfg.train.min_steps == 2**20
    assert cfg.train.ema_decay == 0.999 and cfg.consistency.threshold == 0.95
    assert cfg.optimizer.lr == 0.03 and cfg.scheduler._target_.endswith("CosineAnnealingLR")
    assert cfg.model.name == "wide_resnet28_2"
    # the command line still wins over the preset
    cfg = resolve(compose_cfg("experiment=cifar10_40", f"consistency={method}", "consistency.mu=3"))
    assert cfg.consistency.mu == 3


@pytest.mark.slow
def test_preset_with_freematch_runs_a_few_steps(tmp_path):
    from conftest import run_cli

    _write_folder(tmp_path / "lab", 32, 6, 0)
    _write_folder(tmp_path / "test", 32, 1, 1)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=cifar10_40",
        "consistency=freematch",
        "consistency.mu=2",
        "data=image_folder",
        "data.num_classes=10",
        f"data.labelled_dir={tmp_path / 'lab'}",
        f"data.test_dir={tmp_path / 'test'}",
        "data.labels_per_class=4",
        "data.image_size=32",
        "train.epochs=1",
        "train.min_steps=3",
        "train.batch_size=8",
        "train.eval_batch_size=64",
        "progress=false",
        "trainer.accelerator=cpu",
        f"run_dir={run_dir}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0]  # USB's protocol: one training
    metrics = json.loads((run_dir / "round_0" / "metrics.json").read_text())
    (epoch,) = metrics["epochs"]
    assert len(epoch["class_thresholds"]) == 10 and 0.0 <= epoch["mask_rate"] <= 1.0
    assert metrics["train_steps"] == 5  # ceil(40 labelled / 8) batches, more than min_steps
