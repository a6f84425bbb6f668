"""Zoo backbones (pipeline/models/zoo.py): any torchvision or timm model by name, offline.

Weights come from files the tests write (random weights saved as a state dict): nothing here
downloads. The "no network" paths run with the network switched off in-process (the probe's
socket fails), so they behave the same on a machine that has one.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import compose_cfg, compose_spec, run_cli
from streaming_data import jpeg
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.cli import resolve
from pipeline.deploy.model import load_model
from pipeline.errors import UserError
from pipeline.models import (
    NETWORKS,
    ZooClassifier,
    freeze_for_finetune,
    param_groups,
    timm_model,
    torchvision_model,
)
from pipeline.models.checkpoint import (
    build_recorded_net,
    hparams_for,
    load_net,
    model_checkpoint,
)
from pipeline.models.zoo_adapt import adapt_input_conv
from pipeline.models.zoo_weights import read_state_dict
from pipeline.runtime.io import load_checkpoint, save_checkpoint

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")
HEAD = {"head.weight", "head.bias"}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory) -> Path:
    """A torchvision resnet18 state dict (1000 classes), as a user's .pth file."""
    torch.manual_seed(1)
    return _save(
        torchvision.models.resnet18().state_dict(), tmp_path_factory.mktemp("w") / "r18.pth"
    )


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> Path:
    """A timm resnet10t state dict (1000 classes), as a .safetensors file."""
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("w") / "r10t.safetensors"
    return _save(timm.create_model("resnet10t").state_dict(), path)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: the host probe fails, a library download fails the test."""

    def refuse(*args, **kwargs):
        raise OSError("network is off in this test")

    def never(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", never)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def _body_state(net: ZooClassifier) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("features."): v
        for k, v in net.state_dict().items()
        if k.startswith("features.")
    }


def _trainable(net: nn.Module) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


def _names(net: nn.Module, blocks: list[nn.Module]) -> set[str]:
    ids = {id(p) for b in blocks for p in b.parameters()}
    return {n for n, p in net.named_parameters() if id(p) in ids}


# ---------------------------------------------------------------------------------------------
# weights from a local file, new head, input adapted to the data


def test_torchvision_weights_file_loads_exactly(tv_file):
    net = torchvision_model(num_classes=5, in_channels=3, name="resnet18", weights=str(tv_file))
    state = torch.load(tv_file, weights_only=True)
    body = _body_state(net)
    assert body.keys() == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(body[k], state[k]) for k in body)
    assert isinstance(net.features.fc, nn.Identity)
    assert (net.head.in_features, net.head.out_features) == (512, 5)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    # the parameter names are those of pipeline's own resnet18 (features.<torchvision name>)
    from pipeline.models import resnet18

    assert (
        net.state_dict().keys() == resnet18(num_classes=5, small_images=False).state_dict().keys()
    )


def test_timm_weights_file_loads_exactly(timm_file):
    net = timm_model(num_classes=4, in_channels=3, name="resnet10t", weights=str(timm_file))
    state = read_state_dict(timm_file)
    body = _body_state(net)
    assert body.keys() == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(body[k], state[k]) for k in body)
    assert net.head.out_features == 4 and net(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_a_file_of_another_architecture_is_refused(tv_file):
    with pytest.raises(UserError, match=r"does not fit the network: .*missing"):
        timm_model(num_classes=4, name="resnet10t", weights=str(tv_file))
    with pytest.raises(UserError, match="no such file"):
        torchvision_model(num_classes=4, name="resnet18", weights="/nowhere/w.pth")


def test_gray_input_sums_the_pretrained_rgb_kernels(tv_file, timm_file):
    rgb = torch.load(tv_file, weights_only=True)["conv1.weight"]
    net = torchvision_model(num_classes=3, in_channels=1, name="resnet18", weights=str(tv_file))
    got = net.features.conv1.weight
    assert got.shape == (64, 1, 7, 7)
    torch.testing.assert_close(got, rgb.sum(dim=1, keepdim=True), rtol=0, atol=0)
    from timm.models import adapt_input_conv as timm_adapt

    for c in (1, 2, 4):  # the same rule as timm's, for any channel count
        torch.testing.assert_close(adapt_input_conv(c, rgb), timm_adapt(c, rgb), rtol=0, atol=0)
    # a gray image gives the activations of the same image on R, G and B
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ref = nn.functional.conv2d(x.expand(-1, 3, -1, -1), rgb, stride=2, padding=3)
        torch.testing.assert_close(net.features.conv1(x), ref, atol=1e-5, rtol=1e-5)
    # timm: in_chans=1 with the file's 3-channel stem, adapted the same way
    t_rgb = read_state_dict(timm_file)["conv1.0.weight"]
    gray = timm_model(num_classes=3, in_channels=1, name="resnet10t", weights=str(timm_file))
    torch.testing.assert_close(gray.features.conv1[0].weight, t_rgb.sum(1, keepdim=True))


def test_small_image_stem_for_resnet_like_nets_only():
    for net in (
        torchvision_model(num_classes=3, in_channels=1, name="resnet18", small_images=True),
        timm_model(num_classes=3, in_channels=1, name="resnet10t", small_images=True),
    ):
        conv = net.features.conv1
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        assert conv.in_channels == 1 and isinstance(net.features.maxpool, nn.Identity)
        assert net(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(UserError, match="no small-image stem.*model.small_images=false"):
        torchvision_model(num_classes=3, name="mobilenet_v3_small", small_images=True)


@pytest.mark.parametrize("ctor,name", [(timm_model, "resnet10t"), (torchvision_model, "resnet18")])
def test_our_own_checkpoint_is_a_weights_file_small_stem_included(tmp_path, ctor, name):
    """A model.ckpt of ours (stage=pretrain's, a round's) given as model.weights: the zoo body
    loads bit for bit, its small-image stem too (not replaced by a fresh one); the head is new."""
    source = ctor(num_classes=7, in_channels=1, name=name, small_images=True)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # not a fresh initialisation
    ckpt = tmp_path / "model.ckpt"
    save_checkpoint(ckpt, model_checkpoint(source, {"model": {"name": name}}, {}))
    net = ctor(num_classes=10, in_channels=1, name=name, small_images=True, weights=str(ckpt))
    want, got = _body_state(source), _body_state(net)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert net.head.out_features == 10 and net(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    # gray kernels into 3 channels cannot be made up: refused, naming the tensor
    with pytest.raises(UserError, match=r"does not fit the network: conv1.weight"):
        ctor(num_classes=10, in_channels=3, name=name, small_images=True, weights=str(ckpt))
    # without small_images the file's 3x3 stem does not fit the zoo's own stem: refused too
    with pytest.raises(UserError, match="does not fit the network"):
        ctor(num_classes=10, in_channels=1, name=name, weights=str(ckpt))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(
        UserError, match=r"unknown torchvision model 'resnet19'; did you mean resnet18"
    ):
        torchvision_model(num_classes=3, name="resnet19")
    with pytest.raises(UserError, match=r"unknown timm model 'resnet10tt'; did you mean resnet10t"):
        timm_model(num_classes=3, name="resnet10tt")
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        torchvision_model(num_classes=3, name="resnet18", weights="IMAGENET_V9")


# ---------------------------------------------------------------------------------------------
# offline: missing cached weights fail at once, naming the file and the cache


def test_missing_torchvision_weights_fail_fast_naming_the_file(offline):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        torchvision_model(num_classes=3, name="resnet18", weights="IMAGENET1K_V1")
    message = str(err.value)
    assert time.monotonic() - start < 10
    assert "\n" not in message
    assert "resnet18-f37072fd.pth" in message
    assert str(offline / "torch" / "hub" / "checkpoints") in message
    assert "scripts/fetch_weights.py torchvision:resnet18:IMAGENET1K_V1" in message


def test_missing_timm_weights_fail_fast_naming_the_file(offline):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        timm_model(num_classes=3, name="resnet10t", pretrained=True)
    message = str(err.value)
    assert time.monotonic() - start < 10  # (the hub client alone would retry for about a minute)
    assert "model.safetensors of timm/resnet10t.c3_in1k" in message
    assert str(offline / "hf" / "hub") in message and "\n" not in message


def test_cached_torchvision_weights_load_without_a_network(offline, tv_file):
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = offline / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(tv_file.read_bytes())
    net = torchvision_model(num_classes=3, name="resnet18", weights=w.name)
    state = torch.load(tv_file, weights_only=True)
    assert torch.equal(net.features.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


# ---------------------------------------------------------------------------------------------
# blocks and transfer modes


@pytest.mark.parametrize(
    ("zoo", "name", "size", "n_blocks"),
    [
        ("torchvision", "resnet18", 32, 5),
        ("torchvision", "mobilenet_v3_small", 32, 13),
        ("timm", "resnet10t", 32, 5),
        ("timm", "test_vit", 160, 7),
    ],
)
def test_blocks_partition_the_body(zoo, name, size, n_blocks):
    build = torchvision_model if zoo == "torchvision" else timm_model
    net = build(num_classes=3, in_channels=1, name=name)
    blocks = net.blocks()
    assert len(blocks) == n_blocks
    body = sorted(id(p) for p in net.features.parameters())
    assert sorted(id(p) for b in blocks for p in b.parameters()) == body
    assert not {id(p) for p in net.head.parameters()} & set(body)
    assert net(torch.rand(2, 1, size, size)).shape == (2, 3)


def test_transfer_modes_trainable_sets_and_frozen_batchnorm():
    net = torchvision_model(num_classes=3, name="resnet18")
    bns = lambda mods: {id(m) for mod in mods for m in mod.modules() if isinstance(m, _BatchNorm)}  # noqa: E731
    assert freeze_for_finetune(net, "full") == [] and _trainable(net) == {
        n for n, _ in net.named_parameters()
    }
    frozen = freeze_for_finetune(net, "linear")
    assert _trainable(net) == HEAD and {id(m) for m in frozen} == bns([net.features])
    blocks = net.blocks()
    frozen = freeze_for_finetune(net, "last_layers", trainable_blocks=2)
    expected = {
        n
        for n, _ in net.named_parameters()
        if n.startswith(("features.layer3.", "features.layer4."))
    }
    assert _trainable(net) == expected | HEAD == _names(net, blocks[3:]) | HEAD
    assert {id(m) for m in frozen} == bns(blocks[:3])
    assert all(f"features.{s}" in str(_names(net, blocks[:1])) for s in ("conv1", "bn1"))


def test_param_groups_lr_scale_and_layer_decay_by_hand():
    net = torchvision_model(num_classes=3, name="resnet18")  # blocks: stem, layer1..layer4
    blocks = net.blocks()

    def ids(ps):
        return [id(p) for p in ps]

    head_ids = ids(net.head.parameters())
    # no decay: one group at lr_scale=1, else body at lr_scale and head at 1
    (one,) = param_groups(net, 1.0, None)
    assert one["lr_scale"] == 1.0 and ids(one["params"]) == ids(net.parameters())
    body, head = param_groups(net, 0.1, None)
    assert (body["lr_scale"], head["lr_scale"]) == (0.1, 1.0) and ids(head["params"]) == head_ids
    # decay 0.5, lr_scale 0.5: block i of n=5 at 0.5 * 0.5 ** (5 - i), the head at 1
    groups = param_groups(net, 0.5, 0.5)
    assert [g["lr_scale"] for g in groups] == [0.015625, 0.03125, 0.0625, 0.125, 0.25, 1.0]
    for g, block in zip(groups, blocks, strict=False):
        assert sorted(ids(g["params"])) == sorted(ids(block.parameters()))
    # frozen blocks give no group; the optimizer sees the factors as module.py applies them
    freeze_for_finetune(net, "last_layers", trainable_blocks=2)
    groups = param_groups(net, 1.0, 0.75)
    assert [g["lr_scale"] for g in groups] == [0.75**2, 0.75, 1.0]
    opt = torch.optim.SGD(groups, lr=0.2)
    for group in opt.param_groups:
        group["lr"] = group["lr"] * group.pop("lr_scale", 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 0.5625, 0.15, 0.2])


def test_layer_decay_is_checked():
    cfg = resolve(compose_cfg("finetune.layer_decay=0.75"))
    assert cfg.finetune.layer_decay == 0.75
    assert resolve(compose_cfg()).finetune.layer_decay is None
    for bad in ("0", "1.5"):
        with pytest.raises(UserError, match=r"finetune.layer_decay=.* is outside \(0, 1\]"):
            resolve(compose_cfg(f"finetune.layer_decay={bad}"))


# ---------------------------------------------------------------------------------------------
# config groups and checkpoints that rebuild offline


def test_model_and_student_model_groups():
    cfg = resolve(
        compose_cfg(
            "model=torchvision", "model.name=mobilenet_v3_small", "model.weights=DEFAULT",
            "student_model=timm", "student_model.name=resnet10t", "student_model.pretrained=true",
        )
    )  # fmt: skip
    assert cfg.model.zoo == "torchvision" and cfg.model.net.name == "mobilenet_v3_small"
    assert cfg.model.net.weights == "DEFAULT" and cfg.model.net.in_channels == 1
    assert cfg.student_model.net._target_ == "pipeline.models.timm_model"
    assert cfg.student_model.net.name == "resnet10t" and cfg.student_model.net.pretrained is True
    assert {"torchvision_model", "timm_model"} <= set(NETWORKS)


def _zoo_ckpt(tmp_path: Path, *overrides: str):
    """A checkpoint of a zoo network, written the way the pipeline writes them."""
    cfg = compose_spec("data.num_classes=3", "data.image_size=32", *overrides)
    hparams = hparams_for(cfg, cfg.data, 3, ["a", "b", "c"])
    torch.manual_seed(0)
    net = build_recorded_net(hparams["model"], 3, "test").eval()  # (offline, see below)
    path = tmp_path / "zoo.ckpt"
    save_checkpoint(path, model_checkpoint(net, hparams, {}))
    return path, net, cfg


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=timm", "model.name=resnet10t", "model.pretrained=true"),
        ("model=torchvision", "model.name=resnet18", "model.weights=IMAGENET1K_V1"),
    ],
)
def test_checkpoints_record_the_source_and_rebuild_without_downloading(
    offline, tmp_path, overrides
):
    path, net, cfg = _zoo_ckpt(tmp_path, *overrides)
    model = load_checkpoint(path)["hyper_parameters"]["model"]
    assert model["zoo"] in ("timm", "torchvision") and model["name"] in ("resnet10t", "resnet18")
    assert model["weights"] or model["pretrained"]  # the weights it started from, by name
    loaded = load_net(cfg, path, 3)  # offline: fetching weights would raise
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net(x))
        probs = load_model(path)(x)
        mean, std = cfg.data.mean[0], cfg.data.std[0]
        torch.testing.assert_close(probs, net((x - mean) / std).softmax(1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# through the CLI (slow): a linear fine-tune from a file keeps the body; export; predict


DIGITS_ZOO = [
    "progress=false",
    "trainer.accelerator=cpu",
    "trainer.num_threads=1",
    "train.epochs=1",
    "train.min_steps=4",
]


@pytest.mark.slow
def test_linear_finetune_from_a_timm_file_then_export_and_predict(tmp_path, timm_file):
    run_dir = tmp_path / "run"
    proc = run_cli(
        *DIGITS_ZOO, "stage=train", "data.image_size=32", "model=timm", "model.name=resnet10t",
        f"model.weights={timm_file}",
        "finetune.mode=linear", f"run_dir={run_dir}", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "model.ckpt"
    saved = load_checkpoint(ckpt)
    state = read_state_dict(timm_file)
    conv = state["conv1.0.weight"]
    for key, value in saved["state_dict"].items():
        if key.startswith("net.features."):  # the frozen body (BN statistics too): the file's
            name = key.removeprefix("net.features.")
            want = adapt_input_conv(1, conv) if name == "conv1.0.weight" else state[name]
            assert torch.equal(value, want), key
    assert not torch.equal(saved["state_dict"]["net.head.bias"], torch.zeros(10))
    assert saved["hyper_parameters"]["model"]["weights"] == str(timm_file)
    # export (torchscript) and predict, rebuilt from the checkpoint alone
    env = {"OMP_NUM_THREADS": "1"}
    run = ["progress=false", "trainer.accelerator=cpu", "trainer.num_threads=1"]
    proc = run_cli(*run, "stage=export", f"ckpt={ckpt}", "format=torchscript",
                   f"run_dir={tmp_path / 'export'}", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripted = torch.jit.load(str(ckpt.with_suffix(".torchscript.pt")))
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(scripted(x), load_model(ckpt)(x), atol=1e-4, rtol=0)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(jpeg(i, rng))
    out = tmp_path / "pred.csv"
    proc = run_cli(*run, "stage=predict", f"ckpt={ckpt}", f"input={photos}", f"out={out}",
                   f"run_dir={tmp_path / 'predict'}", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(out)
    assert list(table["path"]) == ["0.jpg", "1.jpg", "2.jpg"]
    expected = load_model(ckpt).predict(sorted(photos.glob("*.jpg")))
    assert list(table["class"].astype(str)) == expected.labels
    summary = json.loads((tmp_path / "predict" / "summary.json").read_text())
    assert summary["num_predicted"] == 3


@pytest.mark.slow
def test_unknown_zoo_name_exits_2_with_a_suggestion(tmp_path):
    proc = run_cli(*DIGITS_ZOO, "stage=train", "model=torchvision", "model.name=resnet19",
                   f"run_dir={tmp_path / 'run'}", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: unknown torchvision model 'resnet19'; did you mean resnet18")


@pytest.mark.slow
def test_baseline_last_layers_keeps_the_pretrained_early_blocks(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        *DIGITS_ZOO, "data.image_size=16", "stage=baseline", "pretrain.epochs=1",
        "pretrain_data.labels_per_class=10",
        "model=timm", "model.name=resnet10t", "model.net.small_images=true",
        "finetune.mode=last_layers", "finetune.trainable_blocks=2", f"run_dir={run_dir}",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pre = load_checkpoint(run_dir / "pretrain" / "model.ckpt")["state_dict"]
    fine = load_checkpoint(run_dir / "finetune" / "model.ckpt")["state_dict"]
    body = [k for k in pre if k.startswith("net.features.")]
    stage = {k: k.split(".")[2] for k in body}  # conv1, bn1, layer1 .. layer4
    kept = {stage[k] for k in body if torch.equal(pre[k], fine[k])}
    changed = {stage[k] for k in body if not torch.equal(pre[k], fine[k])}
    assert kept == {"conv1", "bn1", "layer1", "layer2"} and changed == {"layer3", "layer4"}


def test_the_training_module_builds_its_optimizer_with_layer_decay():
    """finetune.layer_decay reaches the optimizer: block i of n at lr x lr_scale x d^(n - i), the
    head at lr; without it, one group at lr."""
    import functools

    from conftest import compose_spec

    from pipeline.engine.module import LitClassifier
    from pipeline.models.checkpoint import build_net

    net = build_net(compose_spec(), 10)
    n = len(net.blocks())
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    module = LitClassifier(net, 10, optimizer=sgd, backbone_lr_scale=0.5, layer_decay=0.5)
    lrs = [g["lr"] for g in module.configure_optimizers().param_groups]
    assert lrs == [0.1 * 0.5 * 0.5 ** (n - i) for i in range(n)] + [0.1]
    plain = LitClassifier(net, 10, optimizer=sgd).configure_optimizers()
    assert [g["lr"] for g in plain.param_groups] == [0.1]
