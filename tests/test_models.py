"""Tests for pipeline.models: shapes, block structure, fine-tuning helpers, a training sanity check.

CPU only, no downloads (the pretrained-weights path is exercised with a fake state dict).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.config.schema import FINETUNE_MODES
from pipeline.errors import UserError
from pipeline.models import (
    SmallCNN,
    WideResNet,
    count_parameters,
    freeze_for_finetune,
    load_pretrained,
    reset_head,
    resnet18,
    wide_resnet28_2,
)

BUILDERS = {
    "small_cnn": lambda c, k: SmallCNN(num_classes=k, in_channels=c),
    "small_cnn_w8": lambda c, k: SmallCNN(num_classes=k, in_channels=c, width=8, dropout=0.0),
    "resnet18": lambda c, k: resnet18(num_classes=k, in_channels=c),
    "resnet18_imagenet_stem": lambda c, k: resnet18(
        num_classes=k, in_channels=c, small_images=False
    ),
    "resnet18_sd": lambda c, k: resnet18(num_classes=k, in_channels=c, stochastic_depth=0.2),
    "wrn28_2": lambda c, k: wide_resnet28_2(num_classes=k, in_channels=c, stochastic_depth=0.1),
    "wrn10_1": lambda c, k: WideResNet(num_classes=k, in_channels=c, depth=10, widen_factor=1),
}
FEATURE_DIMS = {
    "small_cnn": 128,
    "small_cnn_w8": 32,
    "resnet18": 512,
    "resnet18_imagenet_stem": 512,
    "resnet18_sd": 512,
    "wrn28_2": 128,
    "wrn10_1": 64,
}
# models cheap enough to build many times in the fine-tuning tests
FAST = ["small_cnn", "resnet18", "wrn10_1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, in_channels: int = 3, num_classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name](in_channels, num_classes)


def _param_names(net: nn.Module, modules: list[nn.Module]) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in net.named_parameters() if id(p) in ids}


def _bn_ids(modules: list[nn.Module]) -> set[int]:
    return {id(m) for mod in modules for m in mod.modules() if isinstance(m, _BatchNorm)}


# ---------------------------------------------------------------------------------------------
# shapes and structure


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_shapes_for_all_image_sizes(name: str, in_channels: int) -> None:
    net = _build(name, in_channels, num_classes=7)
    assert net.num_classes == 7 and net.in_channels == in_channels
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 7
    d = FEATURE_DIMS[name]
    assert net.head.in_features == d == net.num_features
    for size in (8, 16, 28, 32):
        x = torch.rand(2, in_channels, size, size)
        net.train()
        out = net(x)
        assert out.shape == (2, 7)
        net.eval()
        with torch.no_grad():
            feats = net.features(x)
            assert feats.shape == (2, d)
            torch.testing.assert_close(net(x), net.head(feats))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_blocks_partition_feature_parameters(name: str) -> None:
    net = _build(name)
    blocks = net.blocks()
    assert len(blocks) >= 3
    feature_ids = [id(p) for p in net.features.parameters()]
    in_blocks = [id(p) for b in blocks for p in b.parameters()]
    # every features parameter in exactly one block, nothing else in any block
    assert sorted(in_blocks) == sorted(feature_ids)
    assert all(any(True for _ in b.parameters()) for b in blocks)
    head_ids = {id(p) for p in net.head.parameters()}
    assert not head_ids & set(in_blocks)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    # DDP without find_unused_parameters needs every parameter in the graph
    net = _build(name)
    net(torch.rand(4, 3, 16, 16)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


def test_bad_constructor_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="6n\\+4"):
        WideResNet(num_classes=10, depth=27)
    with pytest.raises(UserError, match="dropout"):
        SmallCNN(num_classes=10, dropout=1.5)
    with pytest.raises(UserError, match="num_classes"):
        SmallCNN(num_classes=0)
    with pytest.raises(UserError, match="stochastic_depth"):
        resnet18(num_classes=10, stochastic_depth=-0.1)


# ---------------------------------------------------------------------------------------------
# resnet18 is torchvision's


def _tv_name(name: str) -> str:
    if name.startswith("head."):
        return "fc." + name.removeprefix("head.")
    assert name.startswith("features.")
    return name.removeprefix("features.")


@pytest.mark.parametrize("small_images", [True, False])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("sd", [0.0, 0.3])
def test_resnet18_names_match_torchvision(small_images: bool, in_channels: int, sd: float) -> None:
    net = resnet18(
        num_classes=10, in_channels=in_channels, small_images=small_images, stochastic_depth=sd
    )
    ref = torchvision.models.resnet18(num_classes=10)
    ours = {_tv_name(k): v.shape for k, v in net.state_dict().items()}
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.keys() == theirs.keys()
    differ = {k for k in ours if ours[k] != theirs[k]}
    expected = set()
    if small_images:
        expected = {"conv1.weight"}
        assert ours["conv1.weight"] == (64, in_channels, 3, 3)
        assert isinstance(net.features.maxpool, nn.Identity)
    elif in_channels != 3:
        expected = {"conv1.weight"}
        assert ours["conv1.weight"] == (64, in_channels, 7, 7)
    assert differ == expected


def test_resnet18_without_stochastic_depth_computes_exactly_torchvision() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    net = resnet18(num_classes=10, small_images=False).eval()
    net.load_state_dict({k: ref.state_dict()[_tv_name(k)] for k in net.state_dict()})
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


def test_resnet18_stochastic_depth_is_linear_and_train_only() -> None:
    net = resnet18(num_classes=10, stochastic_depth=0.4)
    ps = [m.p for m in net.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert ps == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    plain = resnet18(num_classes=10)
    plain.load_state_dict(net.state_dict())
    x = torch.rand(4, 3, 16, 16)
    net.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))
    torch.manual_seed(1)
    net.train(), plain.train()
    with torch.no_grad():
        assert not torch.allclose(net(x), plain(x))


def test_resnet18_unknown_weights_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        resnet18(num_classes=10, weights="IMAGENET_V9")


def test_resnet18_pretrained_gray_stem(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    fake = torchvision.models.resnet18().state_dict()  # stands in for the ImageNet file
    enum = torchvision.models.ResNet18_Weights
    monkeypatch.setattr(enum, "get_state_dict", lambda self, *a, **k: fake)
    net = resnet18(num_classes=10, in_channels=1, small_images=False, weights="IMAGENET1K_V1")
    state = net.state_dict()
    torch.testing.assert_close(state["features.conv1.weight"], fake["conv1.weight"].sum(1, True))
    for key, value in state.items():
        if not key.startswith(("head.", "features.conv1.")):
            torch.testing.assert_close(value, fake[_tv_name(key)])
    # a gray image gives the activations of the same image repeated on R, G, B
    x = torch.rand(2, 1, 32, 32)
    rgb = torchvision.models.resnet18()
    rgb.load_state_dict(fake)
    with torch.no_grad():
        torch.testing.assert_close(net.features.conv1(x), rgb.conv1(x.expand(-1, 3, -1, -1)))


# ---------------------------------------------------------------------------------------------
# wide resnet


def test_wrn28_2_size_and_stochastic_depth() -> None:
    net = wide_resnet28_2(num_classes=10)
    assert count_parameters(net) == (1_467_610, 1_467_610)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.001 for m in bns)
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in net.modules())
    assert [b.conv1.out_channels for b in net.features.block1] == [32] * 4
    assert net.features.block3[0].conv1.out_channels == 128
    sd = wide_resnet28_2(num_classes=10, stochastic_depth=0.6)
    f = sd.features
    ps = [b.drop_path for stage in (f.block1, f.block2, f.block3) for b in stage]
    assert ps == pytest.approx([0.6 * (i + 1) / 12 for i in range(12)])


# ---------------------------------------------------------------------------------------------
# fine-tuning modes


def _trainable(net: nn.Module) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", FAST)
def test_finetune_full_and_linear(name: str) -> None:
    net = _build(name)
    all_names = {n for n, _ in net.named_parameters()}
    head = {n for n in all_names if n.startswith("head.")}
    assert head == {"head.weight", "head.bias"}

    frozen_bn = freeze_for_finetune(net, "linear")
    assert _trainable(net) == head
    assert {id(m) for m in frozen_bn} == _bn_ids([net.features])
    assert len(frozen_bn) == len({id(m) for m in frozen_bn}) > 0
    total, trainable = count_parameters(net)
    assert trainable == net.head.weight.numel() + net.head.bias.numel() < total

    assert freeze_for_finetune(net, "full") == []
    assert _trainable(net) == all_names
    assert count_parameters(net)[0] == count_parameters(net)[1]


@pytest.mark.parametrize("name", FAST)
def test_finetune_last_layers(name: str) -> None:
    net = _build(name)
    n = len(net.blocks())
    for k in range(n + 1):
        frozen_bn = freeze_for_finetune(net, "last_layers", trainable_blocks=k)
        blocks = net.blocks()
        expected = _param_names(net, blocks[n - k :]) | {"head.weight", "head.bias"}
        assert _trainable(net) == expected
        assert {id(m) for m in frozen_bn} == _bn_ids(blocks[: n - k])
        assert len(frozen_bn) == len({id(m) for m in frozen_bn})
    # only the head and the last block train with the default trainable_blocks=1
    freeze_for_finetune(net, "last_layers")
    assert _trainable(net) == _param_names(net, net.blocks()[-1:]) | {"head.weight", "head.bias"}


@pytest.mark.parametrize("name", FAST)
def test_finetune_bad_arguments(name: str) -> None:
    net = _build(name)
    n = len(net.blocks())
    for k in (-1, n + 1):
        with pytest.raises(UserError, match=rf"\[0, {n}\]"):
            freeze_for_finetune(net, "last_layers", trainable_blocks=k)
    with pytest.raises(UserError, match="full.*linear.*last_layers"):
        freeze_for_finetune(net, "frozen")
    # Every mode the config accepts is one freeze_for_finetune knows (one list for both).
    for mode in FINETUNE_MODES:
        assert isinstance(freeze_for_finetune(net, mode, trainable_blocks=1), list)


def test_reset_head_reinitialises_in_place() -> None:
    net = _build("small_cnn")
    weight, bias = net.head.weight, net.head.bias
    before = weight.detach().clone()
    reset_head(net)
    assert net.head.weight is weight and net.head.bias is bias
    assert net.head.weight.shape == before.shape
    assert not torch.equal(net.head.weight, before)


# ---------------------------------------------------------------------------------------------
# load_pretrained


def _trained_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict whose BN running stats differ from a fresh model's."""
    net.train()
    with torch.no_grad():
        net(torch.rand(8, net.in_channels, 16, 16) * 3)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_load_pretrained_other_number_of_classes() -> None:
    torch.manual_seed(0)
    source = _trained_state(SmallCNN(num_classes=10, in_channels=1))
    torch.manual_seed(1)
    target = SmallCNN(num_classes=5, in_channels=1)
    head_before = {k: v.clone() for k, v in target.head.state_dict().items()}
    recreated = load_pretrained(target, source)
    assert sorted(recreated) == ["head.bias", "head.weight"]
    state = target.state_dict()
    for key, value in source.items():
        if key.startswith("head."):
            torch.testing.assert_close(state[key], head_before[key.removeprefix("head.")])
        else:
            assert torch.equal(state[key], value), key
    # same number of classes: everything, head included, is loaded
    same = SmallCNN(num_classes=10, in_channels=1)
    assert load_pretrained(same, source) == []
    assert all(torch.equal(same.state_dict()[k], v) for k, v in source.items())


def test_load_pretrained_backbone_only_checkpoint() -> None:
    source = {k: v for k, v in SmallCNN(num_classes=10).state_dict().items() if "head" not in k}
    assert sorted(load_pretrained(SmallCNN(num_classes=3), source)) == ["head.bias", "head.weight"]


def test_load_pretrained_other_architecture_is_a_user_error() -> None:
    net = SmallCNN(num_classes=10, in_channels=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_pretrained(net, resnet18(num_classes=10).state_dict(), name="small_cnn")
    message = str(err.value)
    assert "\n" not in message
    assert "model=small_cnn" in message and "features.0.weight" in message
    assert "use a checkpoint trained with the same model=" in message
    assert message.count("features.") <= 5 + 1  # at most five layers named
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_load_pretrained_shape_mismatch_and_extra_keys() -> None:
    source = SmallCNN(num_classes=10, in_channels=3).state_dict()
    with pytest.raises(
        UserError, match=r"features\.0\.weight checkpoint \(32,3,3,3\) vs model \(32,1,3,3\)"
    ):
        load_pretrained(SmallCNN(num_classes=10, in_channels=1), source)
    extra = dict(source, **{"features.99.weight": torch.zeros(3)})
    with pytest.raises(UserError, match=r"features\.99\.weight not in the model"):
        load_pretrained(SmallCNN(num_classes=10, in_channels=3), extra)


# ---------------------------------------------------------------------------------------------
# training sanity check


def test_small_cnn_learns_digits() -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target)
    assert x.shape == (1797, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    net = SmallCNN(num_classes=10, in_channels=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        net.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, accuracy


@pytest.mark.parametrize("name", ["small_cnn_w8", "resnet18"])
def test_channels_last_converts_the_network_and_keeps_its_function(name: str) -> None:
    """trainer.channels_last (the default) puts the conv weights in NHWC, with which oneDNN
    picks its NHWC kernels even for grayscale input; the function and the state dict's values
    stay those of the NCHW network."""
    from functools import partial

    from pipeline.engine.module import LitClassifier

    torch.manual_seed(0)
    net = BUILDERS[name](1, 10).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        before = net(x)
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    LitClassifier(net, 10, optimizer=partial(torch.optim.SGD, lr=0.1), channels_last=True)
    convs = [  # (a one-channel or 1x1 kernel is the same tensor in both layouts)
        m.weight
        for m in net.modules()
        if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)
    ]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(w.is_contiguous() for w in convs)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-4)
    fresh = BUILDERS[name](1, 10)
    fresh.load_state_dict(net.state_dict())  # into an NCHW network: the same values
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, plain[k]), k
