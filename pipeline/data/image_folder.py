"""`data=image_folder`: the user's own images, one subfolder per class (labelled, test and val
trees) and a flat or nested unlabelled tree, decoded in a thread pool and resized as read."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.arrays import DataBundle, ImageArrays, conform, convert_channels
from pipeline.data.bundled import holdout
from pipeline.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


def load_image_folder(cfg: dict[str, Any]) -> DataBundle:
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
        train, test = holdout(labelled, cfg.get("test_fraction", 0.2), hint)
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
        files = image_files(unlabelled_dir)
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


def image_files(root: Path) -> list[Path]:
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
            class_files = image_files(root / name)
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
        with held_native_stderr() as native, ThreadPoolExecutor(max_workers=workers) as pool:
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
            image = decode_file(path, self.channels)
        except Exception as err:  # any decoder failure means a bad file
            return short_error(err)
        return conform(image[None], self.channels, self.size)[0]


def decode_file(path: Path, channels: int) -> torch.Tensor:
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
    return convert_channels(image[None], channels)[0]


@contextlib.contextmanager
def held_native_stderr() -> Iterator[list[str]]:
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


def short_error(err: Exception) -> str:
    # torchvision prefixes messages with "function, /path/to/file.cpp:123, "; keep the rest.
    lines = str(err).strip().splitlines() or [type(err).__name__]
    message = re.sub(r"^\w+, \S+:\d+, ", "", lines[0])
    if message.startswith(("Unsupported image file", "Internal error")):  # garbage bytes
        return "not a valid image (corrupt, or its content is not the format its name says)"
    return message
