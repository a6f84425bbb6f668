"""Images in memory: a uint8 (N, C, H, W) tensor with labels, one dataset's sets, and the
resizing / channel conversion that makes every set match `data.image_size` and `data.channels`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R 601-2 luma weights, the same ones PIL and torchvision use for RGB -> grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Resizing converts to float; doing it in chunks keeps the float copy small for big sets
# (the STL-10 unlabelled split alone is 100k images).
_CHUNK = 4096


class ImageSet:
    """A set of images addressable by row: the pipeline's data interface. `load(rows)` gives
    the images of a batch of rows, decoded and shaped (uint8 (B, C, S, S)); `keys(rows)` their
    stable names; `labels` the known labels (int64, -1 unknown) or None. `ImageArrays` holds
    its images in memory; `StreamedImages` (streamed.py) decodes them from disk on demand."""

    labels: torch.Tensor | None
    in_memory = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, rows: np.ndarray) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """uint8 images of `rows`, and [(position in rows, "key: why")] of those that could not
        be read (their images are zeros)."""
        raise NotImplementedError

    def keys(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def subset(self, rows: np.ndarray) -> ImageSet:
        raise NotImplementedError


@dataclass
class ImageArrays(ImageSet):
    """Images as a uint8 (N, C, H, W) tensor with optional int64 labels (None = unknown) and
    optional keys (default: the row number)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    names: np.ndarray | None = None  # a key per image (str), when the images have names
    in_memory = True

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
        if self.names is not None and len(self.names) != len(self.images):
            raise ValueError(f"{len(self.names)} names for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, rows: np.ndarray) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        return self.images[torch.as_tensor(rows, dtype=torch.long)], []

    def keys(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return self.names[rows] if self.names is not None else rows.astype(str)

    def subset(self, rows: np.ndarray) -> ImageArrays:
        """The images (and labels, names) at `rows`, as a new contiguous ImageArrays."""
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        labels = self.labels[idx] if self.labels is not None else None
        names = self.names[idx.numpy()] if self.names is not None else None
        return ImageArrays(self.images[idx], labels, names)


def named(prefix: str, n: int) -> np.ndarray:
    """Keys for images that have no file names: `PREFIX/ROW`."""
    return np.char.add(f"{prefix}/", np.arange(n).astype(str))


@dataclass
class DataBundle:
    """Everything one dataset provides; see ``unlabelled_pool`` for how the pool is built."""

    name: str
    classes: list[str]  # class names, index = label
    train: ImageSet  # the pool the labelled / val / unlabelled splits are carved from
    test: ImageSet  # held-out test set (labels known)
    extra_unlabelled: ImageSet | None  # unlabelled images that are not in `train`
    val: ImageSet | None = None  # an explicit val set (image_folder's val_dir), else None
    num_bad_images: int = 0  # corrupt / unreadable files skipped (image_folder)


def subset(images: ImageSet, index: np.ndarray) -> ImageSet:
    """The images (and labels, keys) at ``index``."""
    return images.subset(index)


def conform_arrays(arrays: ImageSet, channels: int | None, size: int | None) -> ImageSet:
    """Chunked ``conform`` of an in-memory set; returns ``arrays`` itself when nothing changes
    (a streamed set is shaped as it is read)."""
    if not isinstance(arrays, ImageArrays):
        return arrays
    _, have_channels, height, width = arrays.images.shape
    channels_ok = channels is None or channels == have_channels
    size_ok = size is None or height == width == size
    if channels_ok and size_ok:
        return arrays
    chunks = [
        conform(arrays.images[i : i + _CHUNK], channels, size)
        for i in range(0, len(arrays), _CHUNK)
    ]
    images = torch.cat(chunks) if chunks else conform(arrays.images, channels, size)
    return ImageArrays(images, arrays.labels, arrays.names)


def conform(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, size, size); None keeps that dimension."""
    # Drop to one channel before resizing and add channels after, so the resize does least work.
    if channels == 1:
        images = convert_channels(images, 1)
    if size is not None:
        images = resize(images, size)
    if channels == 3:
        images = convert_channels(images, 3)
    return images.contiguous()


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
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


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
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
