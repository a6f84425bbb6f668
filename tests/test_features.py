"""model.cache_features: a frozen body's features computed once, cached on disk and reused; the
heads trained on them through the same engine; the same results as the uncached linear mode
where augmentation is off."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import compose_cfg, compose_spec, run_cli
from omegaconf import OmegaConf

from pipeline.cli import resolve
from pipeline.config.specs import run_spec
from pipeline.data.task import prepare_task
from pipeline.engine import features
from pipeline.engine.features import FeatureSet, HeadOnly, split_features
from pipeline.engine.fit import fit
from pipeline.errors import UserError
from pipeline.models.checkpoint import build_net
from pipeline.models.finetune import check_cache_features, freeze_for_finetune
from pipeline.runtime.rundir import RunDir
from pipeline.selftrain.label import pseudo_label
from pipeline.selftrain.merge import merge_labelled_and_pseudo

pytestmark = pytest.mark.usefixtures("one_thread")

# Digits with SmallCNN without dropout (the uncached linear mode would drop features out).
SMALL = ["model.net.dropout=0", "trainer.accelerator=cpu", "progress=false"]


@pytest.fixture
def setup(tmp_path):
    cfg = compose_spec(*SMALL, "train.epochs=2", "train.min_steps=10")
    run = RunDir(tmp_path / "run")
    task = prepare_task(cfg.data, 0, run)
    torch.manual_seed(0)
    net = build_net(cfg, task.num_classes)
    frozen = freeze_for_finetune(net, "linear")
    return cfg, run, task, net, frozen


def _body_output(cfg, net, images) -> torch.Tensor:
    x = images.images.float() / 255
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)
    body = copy.deepcopy(net.features).eval()
    with torch.no_grad():
        return body((x - mean) / std)


def test_cached_features_are_the_body_output_reused_and_keyed_by_the_body(setup, monkeypatch):
    cfg, run, task, net, _ = setup
    calls = []
    compute = features.compute_parts
    monkeypatch.setattr(
        features, "compute_parts", lambda *a, **k: (calls.append(a[-1]), compute(*a, **k))
    )
    cached = split_features(cfg, cfg.data, net, task.test, "test", run, "small_cnn")
    got, bad = cached.load(np.arange(len(task.test)))
    torch.testing.assert_close(got, _body_output(cfg, net, task.test), atol=1e-6, rtol=0)
    assert bad == [] and len(calls) == 1 and got.shape == (360, 128)
    (folder,) = calls
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rows"] == 360 and meta["dim"] == 128 and meta["parts"] == 1
    assert isinstance(np.load(folder / "part-00000.npy", mmap_mode="r"), np.memmap)
    stamp = (folder / "part-00000.npy").stat().st_mtime_ns
    # the same body again: read back, nothing computed, nothing rewritten
    again = split_features(cfg, cfg.data, net, task.test, "test", run, "small_cnn")
    assert len(calls) == 1 and (folder / "part-00000.npy").stat().st_mtime_ns == stamp
    assert torch.equal(again.load(np.arange(360))[0], got)
    # a changed body (one BatchNorm statistic) gets another folder, computed anew
    with torch.no_grad():
        net.features[1].running_mean += 0.5
    changed = split_features(cfg, cfg.data, net, task.test, "test", run, "small_cnn")
    assert len(calls) == 2 and calls[1] != folder
    assert not torch.equal(changed.load(np.arange(360))[0], got)


def test_feature_sets_keep_keys_labels_and_unreadable_rows():
    parts = [np.arange(12, dtype=np.float32).reshape(4, 3), np.full((2, 3), np.nan, np.float32)]

    class Source:
        labels = torch.tensor([0, 1, 2, 3, 4, 5])

        def keys(self, rows):
            return np.array([f"img{r}" for r in rows])

    fs = FeatureSet.of_parts(parts, Source())
    sub = fs.subset(np.array([5, 1, 2]))
    x, bad = sub.load(np.array([1, 0, 2]))
    assert x[0].tolist() == [3.0, 4.0, 5.0] and x[1].tolist() == [0.0, 0.0, 0.0]
    assert bad == [(1, "img5: unreadable when its features were computed")]
    assert list(sub.keys(np.array([0, 1]))) == ["img5", "img1"]
    assert sub.labels.tolist() == [5, 1, 2] and len(sub) == 3 and sub.dim == 3


def test_heads_trained_on_features_equal_heads_trained_on_images(setup, tmp_path):
    """The linear mode without augmentation, on images vs on cached features: the same head
    (to float tolerance), the body untouched bit for bit in both."""
    cfg, run, task, net, frozen = setup
    body = {k: v.clone() for k, v in net.features.state_dict().items()}
    head0 = net.head.weight.detach().clone()
    train_set = merge_labelled_and_pseudo(task.labelled.labels.numpy(), None, task.num_classes)
    uncached = copy.deepcopy(net)
    frozen_uncached = freeze_for_finetune(uncached, "linear")
    common = (train_set, None, 0, 2, {"num_classes": 10})

    def train(model, images, work, frozen_modules):
        result = fit(cfg, cfg.data, model, images, common[0], work, 7, common[3], common[4],
                     None, 0.1, frozen_modules)  # fmt: skip
        assert result.steps == 10

    train(uncached, task.labelled, tmp_path / "images", frozen_uncached)
    cached = features.feature_task(cfg, cfg.data, net, task, run, "small_cnn", ("labelled",))
    train(HeadOnly(net), cached.labelled, tmp_path / "features", frozen)
    torch.testing.assert_close(net.head.weight, uncached.head.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.head.bias, uncached.head.bias, atol=1e-5, rtol=0)
    assert not torch.equal(net.head.weight, head0)  # (it trained)
    for k, v in net.features.state_dict().items():
        assert torch.equal(v, body[k]) and torch.equal(uncached.features.state_dict()[k], v), k


def test_pseudo_labels_from_cached_features_equal_those_from_images(setup, tmp_path):
    cfg, run, task, net, _ = setup
    cfg = compose_spec(*SMALL, "pseudo_label.tta_views=0", "pseudo_label.threshold=0.0")
    truth = task.unlabelled_truth()
    plain, _ = pseudo_label(cfg, cfg.data, net, task.unlabelled, tmp_path / "a.npz", run, truth)
    cached = features.feature_task(cfg, cfg.data, net, task, run, "small_cnn", ("unlabelled",))
    head = HeadOnly(net)
    fast, _ = pseudo_label(cfg, cfg.data, head, cached.unlabelled, tmp_path / "b.npz", run, truth)
    assert len(plain) == len(task.unlabelled) and np.array_equal(plain.index, fast.index)
    assert np.array_equal(plain.label, fast.label)
    np.testing.assert_allclose(plain.confidence, fast.confidence, atol=1e-5, rtol=0)
    keys = np.load(tmp_path / "b.npz")["key"]  # (the file has them; the loop does not read them)
    assert fast.key is None and list(keys) == list(task.unlabelled.keys(fast.index))


def test_cache_mode_is_on_only_where_asked_for_a_frozen_body_and_refused_elsewhere():
    base = resolve(compose_cfg("model.cache_features=true", "finetune.mode=linear"))

    def variant_cfg(**keys):
        cfg = copy.deepcopy(base)
        for key, value in keys.items():
            OmegaConf.update(cfg, key.replace("__", "."), value)
        return cfg

    def variant(**keys):
        return run_spec(variant_cfg(**keys))

    assert check_cache_features(variant(init="pretrained"))
    assert check_cache_features(variant(stage="baseline"))
    assert not check_cache_features(variant(stage="pretrain"))  # (it trains its body)
    off = {"model__cache_features": False, "student_model__cache_features": False}
    assert not check_cache_features(variant(init="pretrained", **off))
    refused = [
        ({"init": "pretrained", "finetune__mode": "full"}, "finetune.mode=full trains it"),
        ({"init": "scratch"}, "model=small_cnn trains from scratch here"),
        (
            {"init": "pretrained", "consistency__method": "fixmatch"},
            "consistency=fixmatch learns from augmented views",
        ),
    ]
    for keys, message in refused:
        with pytest.raises(UserError, match=message):
            check_cache_features(variant(**keys))
    # a student network asking for it is checked too: from scratch, its body would train
    cfg = variant_cfg(init="scratch", **off)
    cfg.student_model = {**OmegaConf.to_container(cfg.model), "name": "small_cnn_wide",
                         "cache_features": True}  # fmt: skip
    with pytest.raises(UserError, match="model=small_cnn_wide trains from scratch"):
        check_cache_features(run_spec(cfg))


# ---------------------------------------------------------------------------------------------
# through the CLI


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """A torchvision resnet18 state dict, as a user's .pth file (random weights)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


ZOO = [
    "progress=false", "trainer.accelerator=cpu", "trainer.num_threads=1", "train.epochs=1",
    "train.min_steps=4", "model=torchvision", "model.name=resnet18", "data.image_size=32",
    "finetune.mode=linear", "model.cache_features=true",
]  # fmt: skip


@pytest.mark.slow
def test_cached_selftrain_keeps_the_body_reuses_the_cache_and_exports(tmp_path, tv_file):
    from pipeline.deploy.model import load_model
    from pipeline.models.zoo_adapt import adapt_input_conv
    from pipeline.runtime.io import load_checkpoint

    run_dir = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # (log lines unwrapped)
    proc = run_cli(*ZOO, f"model.weights={tv_file}", "selftrain.rounds=2",
                   "pseudo_label.threshold=0.1", f"run_dir={run_dir}", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one line says what the mode turns off; each split's features computed once for 3 rounds
    log = proc.stdout + proc.stderr
    assert log.count("input augmentation (data.augment, pseudo_label.tta_views)") == 1
    computed = sorted(p.name.split("-")[0] for p in (run_dir / "features").iterdir())
    assert computed == ["labelled", "test", "unlabelled"]
    assert log.count("computing the features of the") == 3
    state = torch.load(tv_file, weights_only=True)
    for k in range(3):
        saved = load_checkpoint(run_dir / f"round_{k}" / "model.ckpt")["state_dict"]
        for key, value in saved.items():
            if key.startswith("net.features."):  # the frozen body: the file's, bit for bit
                name = key.removeprefix("net.features.")
                want = adapt_input_conv(1, state[name]) if name == "conv1.weight" else state[name]
                assert torch.equal(value, want), (k, key)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][1]["num_pseudo"] > 0
    # the final checkpoint is a whole network: export and load_model work from it alone
    ckpt = run_dir / "round_2" / "model.ckpt"
    proc = run_cli("progress=false", "trainer.accelerator=cpu", "stage=export", f"ckpt={ckpt}",
                   "format=torchscript", f"run_dir={tmp_path / 'export'}", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripted = torch.jit.load(str(ckpt.with_suffix(".torchscript.pt")))
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(scripted(x), load_model(ckpt)(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cache_features_with_a_trained_body_exits_2(tmp_path, tv_file):
    run_dir = tmp_path / "run"
    proc = run_cli(*ZOO, f"model.weights={tv_file}", "finetune.mode=full", f"run_dir={run_dir}",
                   env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: model.cache_features=true needs a frozen body, and finetune.mode=full")
    )
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "round_0").exists() and not (run_dir / "features").exists()


@pytest.mark.slow
def test_a_cached_training_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """SIGTERM mid-epoch 2 of a cached stage=train: the re-run resumes from last.ckpt (the
    features read back) and ends with the weights of an uninterrupted run, bit for bit."""
    import signal
    import subprocess
    import sys

    from conftest import REPO, wait_for

    from pipeline.models.checkpoint import hparams_for, model_checkpoint
    from pipeline.runtime.io import load_checkpoint, save_checkpoint

    cfg = compose_spec(*SMALL)
    torch.manual_seed(1)
    pre = tmp_path / "pre.ckpt"
    save_checkpoint(pre, model_checkpoint(build_net(cfg, 10), hparams_for(cfg, cfg.data, 10), {}))
    args = [*SMALL, "stage=train", "train.epochs=2", "train.min_steps=1200",
            "train.checkpoint_every_s=null", "init=pretrained", f"pretrain.ckpt={pre}",
            "finetune.mode=linear", "model.cache_features=true"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"}
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, f"run_dir={stopped}"], cwd=REPO,
        env={**__import__("os").environ, **env}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(stopped / "checkpoints" / "last.ckpt", proc)  # the end of epoch 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=240) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (stopped / "model.ckpt").exists()
    again = run_cli(*args, f"run_dir={stopped}", env=env)
    assert again.returncode == 0 and "resuming training from" in again.stdout + again.stderr
    whole = run_cli(*args, f"run_dir={tmp_path / 'whole'}", env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = load_checkpoint(stopped / "model.ckpt")["state_dict"]
    b = load_checkpoint(tmp_path / "whole" / "model.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
