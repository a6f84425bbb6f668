"""A folder of "new photos" for the README's worked example (`Use the trained model`): the last
N images of scikit-learn's bundled digits as 32x32 grayscale PNG files in two sub-folders, their
true classes in truth.csv beside the folder, and with --corrupt one file that is not an image.

    python scripts/example_photos.py new_photos --n 200 --corrupt
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torchvision.io import write_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--n", type=int, default=200, help="how many images")
    parser.add_argument("--corrupt", action="store_true", help="add one file that is no image")
    args = parser.parse_args()
    digits = load_digits()
    rows = []
    for i in range(args.n):
        k = len(digits.images) - 1 - i
        pixels = (digits.images[k] * (255 / 16)).round().astype(np.uint8)
        big = torch.from_numpy(pixels).repeat_interleave(4, 0).repeat_interleave(4, 1)
        rel = Path(f"batch{i % 2}") / f"photo{i:04d}.png"
        (args.folder / rel.parent).mkdir(parents=True, exist_ok=True)
        write_png(big[None], str(args.folder / rel))
        rows.append((rel.as_posix(), str(digits.target[k])))
    if args.corrupt:
        (args.folder / "batch0" / "broken.png").write_bytes(b"this is not a PNG")
    with open(args.folder.parent / "truth.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    print(f"wrote {args.n} images to {args.folder} and their classes to truth.csv")


if __name__ == "__main__":
    main()
