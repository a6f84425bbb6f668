"""Decoding image bytes to uint8 tensors of the configured shape, and keeping what C decoders
print to stderr out of the one-line error contract."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.arrays import conform, convert_channels

# What a decoded image is made by: part of the key of a decoded-image cache (data.cache=decoded),
# so that a change here never serves images decoded the old way. Bump it with any change to
# decode_bytes / decode_to_shape (or to the resize they call) that can change a pixel.
DECODER_VERSION = 1


def decode_bytes(data: bytes, ext: str, channels: int) -> torch.Tensor:
    """Decode one image file's bytes (`ext`: its extension, "jpg", ".png", ...) to uint8
    (C, H, W) with C == channels."""
    from torchvision.io import ImageReadMode, decode_image

    if ext.lower().lstrip(".") == "bmp":
        # torchvision's decoder does not read BMP; PIL (a torchvision dependency) does.
        from PIL import Image

        with Image.open(io.BytesIO(data)) as pil:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
        image = torch.from_numpy(array.copy())
        return image[None] if image.ndim == 2 else image.permute(2, 0, 1)

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    if image.ndim == 4:  # an animated GIF: keep the first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.to(torch.float32) * (255.0 / 65535.0)).round().to(torch.uint8)
    # GIF and WebP decoders ignore the GRAY mode, so convert here.
    return convert_channels(image[None], channels)[0]


def decode_to_shape(data: bytes, ext: str, channels: int, size: int | None) -> torch.Tensor | str:
    """One image as uint8 (channels, size, size), or an error message saying why not."""
    try:
        image = decode_bytes(data, ext, channels)
    except Exception as err:  # any decoder failure means a bad file
        return short_error(err)
    return conform(image[None], channels, size)[0]


@contextlib.contextmanager
def held_native_stderr(hold: bool = True) -> Iterator[list[str]]:
    """Hold back what C decoders print straight to the process's stderr (libpng prints its own
    complaint about a corrupt file): bad input must give one line, ours, naming the file.
    Yields a list that holds the text afterwards. (The process's stderr is one: hold it in one
    thread at a time.)"""
    held: list[str] = []
    if not hold:
        yield held
        return
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
    if message.startswith(("Unsupported image file", "Internal error", "Empty")):
        return "not a valid image (corrupt, or its content is not the format its name says)"
    return message


def decode_batch(
    encoded: list[torch.Tensor],
    exts: list[str],
    channels: int,
    size: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """A batch of encoded images decoded on `device` (`data.decode_on=device`): the JPEGs in one
    call of torchvision.io.decode_jpeg (nvJPEG on a GPU), the other formats on the CPU; each
    resized to (channels, size, size). Returns the uint8 batch and [(position, why)] of the
    images that could not be decoded (zeros in the batch)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out = torch.zeros((len(encoded), channels, size, size), dtype=torch.uint8, device=device)
    bad: list[tuple[int, str]] = []
    jpegs = [i for i, e in enumerate(exts) if e.lower().lstrip(".") in ("jpg", "jpeg")]
    try:
        decoded = dict(zip(jpegs, decode_jpeg([encoded[i] for i in jpegs], mode=mode,
                                              device=device), strict=True))  # fmt: skip
    except RuntimeError:  # a corrupt one fails the call: decode them one by one to find it
        decoded = {}
        for i in jpegs:
            try:
                decoded[i] = decode_jpeg(encoded[i], mode=mode, device=device)
            except RuntimeError as err:
                bad.append((i, short_error(err)))
    for i, data in enumerate(encoded):
        if i in decoded:
            image = convert_channels(decoded[i][None], channels)[0]
            out[i] = conform(image[None], channels, size)[0]
        elif i not in jpegs:
            image = decode_to_shape(bytes(data.numpy()), exts[i], channels, size)
            if isinstance(image, str):
                bad.append((i, image))
            else:
                out[i] = image.to(device)
    return out, sorted(bad)
