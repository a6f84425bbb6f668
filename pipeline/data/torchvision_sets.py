"""The torchvision datasets: official train / test splits, downloaded into `data.root` with
`data.download=true`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.data.arrays import DataBundle, ImageArrays, named
from pipeline.errors import UserError


def _torchvision(cls: Callable[..., Any], cfg: dict[str, Any], **kwargs: Any) -> Any:
    """Instantiate a torchvision dataset, turning "not found" / download failures into UserError."""
    root = cfg.get("root")
    if not root:
        raise UserError(f"data.root is not set; set it to the folder that holds {cfg['name']}")
    root = Path(root).expanduser()
    download = bool(cfg.get("download", False))
    try:
        return cls(root=str(root), download=download, **kwargs)
    except (RuntimeError, OSError) as err:
        if download:
            raise UserError(
                f"could not download {cfg['name']} into data.root={root} ({err}); check the "
                f"network, or put the files there yourself and set data.download=false"
            ) from err
        if "download=True" in str(err):
            raise UserError(
                f"{cfg['name']} was not found under data.root={root}; set data.download=true to "
                f"fetch it there, or point data.root at an existing copy"
            ) from err
        raise


def load_cifar(cfg: dict[str, Any], cls: Callable[..., Any]) -> DataBundle:
    """CIFAR-10/100: .data is NHWC uint8 numpy, .targets a list."""

    def arrays(ds: Any) -> ImageArrays:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        split = "train" if ds.train else "test"
        return ImageArrays(images, torch.as_tensor(ds.targets), named(split, len(images)))

    train = _torchvision(cls, cfg, train=True)
    test = _torchvision(cls, cfg, train=False)
    return DataBundle(cfg["name"], list(train.classes), arrays(train), arrays(test), None)


def load_cifar10(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import CIFAR10

    return load_cifar(cfg, CIFAR10)


def load_cifar100(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import CIFAR100

    return load_cifar(cfg, CIFAR100)


def load_svhn(cfg: dict[str, Any]) -> DataBundle:
    """SVHN: .data is NCHW uint8 already, labels in .labels (digit 0 is label 0)."""
    from torchvision.datasets import SVHN

    train = _torchvision(SVHN, cfg, split="train")
    test = _torchvision(SVHN, cfg, split="test")
    classes = [str(i) for i in range(10)]
    return DataBundle("svhn", classes, _split(train, "train"), _split(test, "test"), None)


def _split(ds: Any, name: str) -> ImageArrays:
    """A torchvision set whose .data is NCHW uint8 and .labels its labels (SVHN, STL-10)."""
    return ImageArrays(
        torch.from_numpy(ds.data), torch.from_numpy(ds.labels), named(name, len(ds.data))
    )


def load_stl10(cfg: dict[str, Any]) -> DataBundle:
    """STL-10: labelled train/test plus the 100k-image 'unlabeled' split as extra_unlabelled."""
    from torchvision.datasets import STL10

    train = _torchvision(STL10, cfg, split="train")
    test = _torchvision(STL10, cfg, split="test")
    unlabeled = _torchvision(STL10, cfg, split="unlabeled")
    return DataBundle(
        "stl10",
        list(train.classes),
        _split(train, "train"),
        _split(test, "test"),
        # its .labels are all -1
        ImageArrays(
            torch.from_numpy(unlabeled.data), None, named("unlabeled", len(unlabeled.data))
        ),
    )


def load_mnist_like(cfg: dict[str, Any], cls: Callable[..., Any]) -> DataBundle:
    """MNIST / Fashion-MNIST: .data is a (N, 28, 28) uint8 tensor, .targets int64."""
    train = _torchvision(cls, cfg, train=True)
    test = _torchvision(cls, cfg, train=False)
    return DataBundle(
        cfg["name"],
        list(train.classes),
        ImageArrays(train.data.unsqueeze(1), train.targets, named("train", len(train.data))),
        ImageArrays(test.data.unsqueeze(1), test.targets, named("test", len(test.data))),
        None,
    )


def load_mnist(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import MNIST

    return load_mnist_like(cfg, MNIST)


def load_fashion_mnist(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import FashionMNIST

    return load_mnist_like(cfg, FashionMNIST)
