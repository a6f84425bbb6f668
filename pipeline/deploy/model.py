"""What a checkpoint says about itself (`ModelCard`: class names, input shape, normalisation,
architecture), the network it rebuilds, and `load_model`: the trained model with its
preprocessing, for a notebook or a script.

Checkpoints written before they described themselves (only `model`, `dataset`, `num_classes`,
`in_channels`, `image_size` in their hyper_parameters) still load: what they lack (mean, std,
class names, augmentation ranges) comes from a data config given by the caller.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.arrays import LUMA_WEIGHTS, conform
from pipeline.errors import UserError
from pipeline.runtime.io import load_checkpoint

log = logging.getLogger("pipeline")

# The only callables a checkpoint's architecture may name: the pipeline's own networks (a
# checkpoint is data; building it must not call arbitrary code it names).
ARCHITECTURES = "pipeline.models."


@dataclass
class ModelCard:
    """A checkpoint's description of itself, and its weights."""

    path: Path
    classes: list[str]  # index = label
    channels: int  # 1 (grayscale) or 3 (RGB)
    image_size: int  # images are resized to image_size x image_size
    mean: list[float]  # per channel, of pixels / 255
    std: list[float]
    model: dict[str, Any]  # the model config: name, net (with _target_)
    augment: dict[str, Any] | None  # data.augment of the training: ranges of test-time views
    dataset: str | None = None
    pipeline_version: str | None = None  # None: written before checkpoints recorded it
    config: dict[str, Any] | None = None  # the training config, resolved
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self) -> dict[str, Any]:
        """How an image becomes the network's input, as plain values (the exports' JSON)."""
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "color": "grayscale (ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B)"
            if self.channels == 1
            else "RGB",
            "resize": f"bilinear to {self.image_size}x{self.image_size} (antialiased when "
            "shrinking); no crop, the aspect ratio is not kept",
            "layout": "NCHW",
            "dtype": "float32",
            "scale": "pixel values / 255, in [0, 1]",
            "mean": self.mean,
            "std": self.std,
            "normalize": "(x - mean) / std per channel",
            "classes": self.classes,
        }

    def build_net(self) -> torch.nn.Module:
        """The network with the checkpoint's weights, in eval mode."""
        net_cfg = copy.deepcopy(dict(self.model.get("net") or {}))
        _check_targets(net_cfg, self.path)
        from pipeline.models import OFFLINE_REBUILD

        # Never fetch pretrained weights (torchvision's, timm's): the checkpoint's own replace them.
        net_cfg.update({k: v for k, v in OFFLINE_REBUILD.items() if k in net_cfg})
        net_cfg["num_classes"] = self.num_classes
        if "in_channels" in net_cfg:
            net_cfg["in_channels"] = self.channels
        from hydra.utils import instantiate

        net = instantiate(net_cfg)
        state = self.state_dict
        if any(k.startswith("net.") for k in state):
            state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else "mismatch"
            raise UserError(
                f"checkpoint {self.path} does not fit its recorded architecture "
                f"{net_cfg.get('_target_')} ({first[:150]})"
            ) from None
        return net.eval()


def _check_targets(node: Any, path: Path) -> None:
    """Refuse a checkpoint whose architecture names a callable other than the networks of
    pipeline.models (its allow-list, `pipeline.models.NETWORKS`)."""
    from pipeline.models import NETWORKS

    if isinstance(node, Mapping):
        target = node.get("_target_")
        name = str(target).removeprefix(ARCHITECTURES)
        if target is not None and (name == str(target) or name not in NETWORKS):
            raise UserError(
                f"checkpoint {path} names the architecture {target}, which is not a network "
                f"of {ARCHITECTURES.rstrip('.')}; refusing to build it"
            )
        for value in node.values():
            _check_targets(value, path)
    elif isinstance(node, list | tuple):
        for value in node:
            _check_targets(value, path)


def read_card(
    path: str | Path, data: Mapping[str, Any] | None = None, hint: str | None = None
) -> ModelCard:
    """The card of a checkpoint. Fields an older checkpoint lacks come from `data` (a data
    config: its `mean`, `std`, `augment`, class names from `classes` or an image_folder's
    `labelled_dir`), used only when it is the checkpoint's dataset (same `name`, or no name);
    without them: UserError naming what is missing and `hint` (how to pass them)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    dataset = hp.get("dataset")
    if data is not None and data.get("name") not in (None, dataset):
        data = None  # another dataset's config says nothing about this checkpoint
    model = hp.get("model")
    if not isinstance(model, Mapping) or not (model.get("net") or {}).get("_target_"):
        raise UserError(
            f"checkpoint {path} does not record its architecture (hyper_parameters.model); "
            "pass a checkpoint written by this pipeline"
        )
    data = dict(data or {})
    missing = [k for k in ("mean", "std") if hp.get(k) is None and data.get(k) is None]
    if missing:
        raise UserError(
            f"checkpoint {path} does not record {' and '.join(missing)} (it was written before "
            f"checkpoints described themselves, trained on data={dataset}); "
            f"{hint or 'pass the data config it was trained with'}"
        )
    num_classes = hp.get("num_classes") or _head_size(ckpt["state_dict"])
    classes = hp.get("classes") or _class_names(data, num_classes, path)
    channels = hp.get("in_channels") or data.get("channels")
    size = hp.get("image_size") or data.get("image_size")
    if not channels or not size:
        raise UserError(
            f"checkpoint {path} does not record its input's channels and image size; "
            "pass them (data.channels, data.image_size)"
        )
    augment = hp["augment"] if "augment" in hp else data.get("augment")
    refuse_non_finite(ckpt["state_dict"], path)
    return ModelCard(
        path=path,
        classes=[str(c) for c in classes],
        channels=int(channels),
        image_size=int(size),
        mean=[float(m) for m in (hp.get("mean") or data["mean"])],
        std=[float(s) for s in (hp.get("std") or data["std"])],
        model=dict(model),
        augment=dict(augment) if augment else None,
        dataset=dataset,
        pipeline_version=hp.get("pipeline_version"),
        config=hp.get("config"),
        state_dict=ckpt["state_dict"],
    )


def refuse_non_finite(state: Mapping[str, Any], path: Path) -> None:
    """A checkpoint with NaN or infinite weights (a training that diverged) predicts one class
    for every image: refuse it, naming the first such tensor."""
    for name, value in state.items():
        if (
            isinstance(value, torch.Tensor)
            and torch.is_floating_point(value)
            and not bool(torch.isfinite(value).all())
        ):
            raise UserError(
                f"checkpoint {path} has NaN or infinite weights ({name}): the training that "
                "wrote it diverged; retrain it with a smaller optimizer.lr"
            )


def _head_size(state: Mapping[str, torch.Tensor]) -> int:
    heads = [v for k, v in state.items() if k.endswith("head.weight")]
    if not heads:
        raise UserError("the checkpoint records no class count and has no head layer")
    return int(heads[0].shape[0])


def _class_names(data: Mapping[str, Any], num_classes: int, path: Path) -> list[str]:
    """Class names for a checkpoint that does not record them: `data`'s `classes`, or the class
    folders of its `labelled_dir`, or the class indices."""
    names = data.get("classes")
    root = data.get("labelled_dir")
    if not names and root and Path(str(root)).is_dir():
        folders = sorted(p.name for p in Path(str(root)).iterdir() if p.is_dir())
        names = [n for n in folders if not n.startswith(".")]
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    log.warning("checkpoint %s does not record class names: the classes are named 0..%d",
                path, num_classes - 1)  # fmt: skip
    return [str(i) for i in range(num_classes)]


class Prediction(NamedTuple):
    """What `LoadedModel.predict` returns, one entry per image in input order."""

    labels: list[str]  # the predicted class name of each image
    confidence: np.ndarray  # (N,) float32: the predicted class's probability
    probs: np.ndarray  # (N, num_classes) float32: every class's, columns in `classes` order


class LoadedModel:
    """A trained network in eval mode with its preprocessing. `model(images)` gives the
    probabilities (a float tensor (N, num_classes)); `model.predict(images)` the class names
    too. `images`: a path or a list of paths (decoded and resized like the pipeline does), or a
    tensor (C, H, W) or (N, C, H, W), uint8 in 0..255 or float in [0, 1] (resized and converted
    to the model's channels when they differ)."""

    def __init__(self, card: ModelCard, device: str | torch.device = "cpu") -> None:
        self.card, self.device = card, torch.device(device)
        self.net = card.build_net().to(self.device)
        self.classes = list(card.classes)
        self.preprocess = card.preprocess()
        self._mean = torch.tensor(card.mean).view(1, -1, 1, 1).to(self.device)
        self._std = torch.tensor(card.std).view(1, -1, 1, 1).to(self.device)

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.card.path}, {self.card.model.get('name')}, "
            f"{len(self.classes)} classes, input {self.card.channels}x{self.card.image_size}"
            f"x{self.card.image_size})"
        )

    def __call__(self, images: Any, tta_views: int = 0, batch_size: int = 256) -> torch.Tensor:
        """Probabilities (N, num_classes) on the CPU; with `tta_views`, the mean over the clean
        image and that many fixed views (as stage=predict's predict.tta_views)."""
        from pipeline.engine.augment import views_fn

        views = views_fn(tta_views, self.card.augment)
        if tta_views and views is None:
            raise ValueError(f"{self.card.path} was trained without data.augment: no views")
        out = []
        for chunk in _chunks(images, batch_size):
            x = self.pixels(chunk).to(self.device)
            with torch.inference_mode():
                xs = [x, *(views(x) if views else [])]
                probs = sum(self.net((v - self._mean) / self._std).float().softmax(1) for v in xs)
                out.append((probs / len(xs)).cpu())
        return torch.cat(out) if out else torch.zeros((0, len(self.classes)))

    def predict(self, images: Any, tta_views: int = 0, batch_size: int = 256) -> Prediction:
        """(labels, confidence, probs) of `images`, see `Prediction`."""
        probs = self(images, tta_views, batch_size)
        confidence, label = probs.max(dim=1)
        return Prediction(
            [self.classes[i] for i in label.tolist()],
            confidence.numpy().astype(np.float32),
            probs.numpy().astype(np.float32),
        )

    def pixels(self, images: Any) -> torch.Tensor:
        """Images as the network's float (N, C, S, S) input in [0, 1], before normalisation."""
        c, s = self.card.channels, self.card.image_size
        if isinstance(images, str | Path):
            images = [images]
        if isinstance(images, torch.Tensor):
            x = images if images.ndim == 4 else images[None]
            if x.ndim != 4 or x.shape[1] not in (1, 3):
                raise ValueError(
                    f"expected images (C, H, W) or (N, C, H, W), got {tuple(images.shape)}"
                )
            if x.dtype == torch.uint8:
                return conform(x.cpu(), c, s).float().div_(255)
            return _conform_float(x.float(), c, s)
        return torch.stack([read_image(p, c, s) for p in images]).float().div_(255)


def read_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """One image file as uint8 (channels, size, size), decoded like the pipeline's sets."""
    from pipeline.data.decode import decode_to_shape

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot open image {path} ({e.strerror or type(e).__name__})") from None
    image = decode_to_shape(data, path.suffix, channels, size)
    if isinstance(image, str):
        raise ValueError(f"cannot read image {path}: {image}")
    return image


def _chunks(images: Any, size: int) -> list[Any]:
    if isinstance(images, str | Path):
        return [[images]]
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        return [images]
    return [images[i : i + size] for i in range(0, len(images), size)]


def _conform_float(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """A float batch in [0, 1] with the model's channels and size (as `conform`, no rounding)."""
    if x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor(LUMA_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        down = size < x.shape[-2] or size < x.shape[-1]
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=down
        )
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    data: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """The model of a pipeline checkpoint, in eval mode with its preprocessing.

    `data`: for a checkpoint written before checkpoints described themselves, what it lacks,
    e.g. ``{"mean": [0.5], "std": [0.5], "classes": ["cat", "dog"]}`` (or the data config it was
    trained with)."""
    hint = "pass them: load_model(path, data={'mean': [...], 'std': [...], 'classes': [...]})"
    return LoadedModel(read_card(path, data, hint), device)
