"""Small real image sets the streaming tests write themselves: JPEG folders and WebDataset tar
shards of three learnable classes (a horizontal bar, a vertical bar, a diagonal)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

CLASSES = ["bar", "column", "diagonal"]
SIZE = 16


def image(label: int, rng: np.random.Generator) -> torch.Tensor:
    """A 3 x 16 x 16 uint8 image of class `label` with noise and a random offset."""
    x = rng.integers(0, 60, (SIZE, SIZE)).astype(np.float32)
    k = int(rng.integers(3, SIZE - 3))
    if label == 0:
        x[k - 1 : k + 2, :] += 180
    elif label == 1:
        x[:, k - 1 : k + 2] += 180
    else:
        i = np.arange(SIZE)
        for d in (-1, 0, 1):
            x[i, np.clip(i + d + k - SIZE // 2, 0, SIZE - 1)] += 180
    x = np.clip(x, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.repeat(x[None], 3, axis=0))


def jpeg(label: int, rng: np.random.Generator) -> bytes:
    return bytes(encode_jpeg(image(label, rng), quality=95).numpy())


def class_tree(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:04d}.jpg").write_bytes(jpeg(c, rng))


def flat_folder(root: Path, n: int, seed: int, nested: bool = True) -> list[int]:
    """n unlabelled JPEGs (in two sub-folders when nested); returns their true classes."""
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, 3, n)]
    for i, c in enumerate(labels):
        folder = root / (f"part{i % 2}" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:05d}.jpg").write_bytes(jpeg(c, rng))
    return labels


def shards(root: Path, n: int, per_shard: int, seed: int, labelled: bool) -> list[Path]:
    """WebDataset shards (KEY.jpg, and KEY.cls when labelled) holding n images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        path = root / f"pool-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                c = int(rng.integers(0, 3))
                members = [(f"{i:06d}.jpg", jpeg(c, rng))]
                if labelled:
                    members.append((f"{i:06d}.cls", str(c).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
