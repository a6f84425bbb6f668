"""Pre-fetch pretrained weights into the libraries' caches, on a machine with a network (a
cluster's login node), so that training jobs without one find them there.

    python scripts/fetch_weights.py torchvision:resnet50:IMAGENET1K_V2 timm:resnet10t.c3_in1k
    TORCH_HOME=/shared/torch HF_HOME=/shared/hf python scripts/fetch_weights.py torchvision:convnext_tiny

Each argument is `torchvision:NAME[:WEIGHTS]` (WEIGHTS: an enum member of the model, default
DEFAULT; the file goes to TORCH_HOME/hub/checkpoints) or `timm:NAME` (timm's weights for the
name, with or without a pretrained tag; into HF_HOME's hub cache, or TORCH_HOME for weights
timm fetches by URL). Prints each cached file. Exit 2 on an unknown name (with the closest
names) or when a file cannot be downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import UserError


def fetch(spec: str) -> Path:
    """Download (or find in the cache) the weights one argument names; returns the file."""
    from pipeline.models.zoo_weights import fetch_timm, fetch_torchvision

    zoo, _, rest = spec.partition(":")
    if zoo == "torchvision" and rest:
        name, _, weights = rest.partition(":")
        return fetch_torchvision(name, weights or "DEFAULT")
    if zoo == "timm" and rest:
        return fetch_timm(rest)
    raise UserError(f"cannot read {spec!r}: give torchvision:NAME[:WEIGHTS] or timm:NAME")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", metavar="ZOO:NAME[:WEIGHTS]")
    args = parser.parse_args(argv)
    try:
        for spec in args.specs:
            print(f"{spec}: {fetch(spec)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
