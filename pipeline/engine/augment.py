"""Augmentation on the device: the student's noise (Noisy Student), per-sample and applied to
every training batch; the weak and strong views of the consistency methods; and the fixed
test-time views a teacher labels with and stage=predict averages over.

Model noise (dropout, stochastic depth) is part of the network: `model.net.dropout`,
`model.net.stochastic_depth` in conf/model/. Teachers are trained with the same noise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from pipeline.runtime.seed import seed_global


def affine(
    x: torch.Tensor, angle: torch.Tensor, s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor
) -> torch.Tensor:
    """Rotate (radians), scale by 1/s and shift (tx, ty, in [-1, 1] units) each image of a
    float (B, C, H, W) batch; the parameters are (B,) tensors. Outside the image is 0."""
    theta = torch.stack(
        [
            torch.stack([s * angle.cos(), -s * angle.sin(), tx], 1),
            torch.stack([s * angle.sin(), s * angle.cos(), ty], 1),
        ],
        1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class BatchAugment(nn.Module):
    """Per-sample random affine (shift, rotation, scale), flip and cutout, for a whole batch at
    once, plus torchvision v2 RandAugment on small chunks of the uint8 batch when enabled."""

    def __init__(
        self,
        translate: float = 0.0,
        rotate: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
        flip: bool = False,
        cutout: float = 0.0,
        randaugment_ops: int = 0,
        randaugment_magnitude: int = 9,
        chunk: int = 16,
    ) -> None:
        super().__init__()
        self.translate, self.rotate, self.scale = translate, rotate, tuple(scale)
        self.flip, self.cutout, self.chunk = flip, cutout, chunk
        self.randaugment = (
            v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude)
            if randaugment_ops > 0
            else None
        )

    def forward(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float (B, C, H, W) in [0, 1], augmented."""
        if self.randaugment is not None:
            # v2 transforms draw one set of ops per call: chunks give per-chunk randomness.
            # (RandAugment draws from torch's global generator)
            seed_global(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            images = torch.cat([self.randaugment(c) for c in images.split(self.chunk)])
        x = images.float().div_(255)
        b, _, h, w = x.shape

        def uniform(low: float, high: float, n: int = b) -> torch.Tensor:
            return (torch.rand(n, generator=gen) * (high - low) + low).to(x.device)

        if self.rotate or self.translate or self.scale != (1.0, 1.0):
            angle = uniform(-self.rotate, self.rotate) * math.pi / 180
            s = 1.0 / uniform(*self.scale)
            tx, ty = uniform(-2 * self.translate, 2 * self.translate, 2 * b).view(2, b)
            x = affine(x, angle, s, tx, ty)
        if self.flip:
            flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        if self.cutout > 0:
            half = self.cutout * h / 2
            cy, cx = uniform(0, h), uniform(0, w)
            ys = torch.arange(h, device=x.device).view(1, h, 1)
            xs = torch.arange(w, device=x.device).view(1, 1, w)
            hole = ((ys - cy.view(b, 1, 1)).abs() < half) & ((xs - cx.view(b, 1, 1)).abs() < half)
            x = x.masked_fill(hole.unsqueeze(1), 0.0)
        return x


def fixed_views(
    x: torch.Tensor, views: int, augment: BatchAugment, seed: int = 0
) -> list[torch.Tensor]:
    """`views` augmented copies of a float batch for test-time augmentation: view v is one
    affine transform (and flip) drawn from `augment`'s ranges with seed (seed, v) and applied to
    every image alike, so an image's views do not depend on the batch it is in (the same
    predictions from 1 or N processes)."""
    out = []
    for v in range(views):
        gen = torch.Generator().manual_seed(hash((seed, v)) % 2**62)
        r = torch.rand(5, generator=gen)
        lo, hi = augment.scale
        params = [
            (r[0] * 2 - 1) * augment.rotate * math.pi / 180,  # angle
            1.0 / (lo + (hi - lo) * r[1]),  # inverse scale
            *((r[2:4] * 2 - 1) * 2 * augment.translate),  # tx, ty
        ]
        # The same transform for every image of the batch.
        y = affine(x, *(p.to(x.device).expand(len(x)) for p in params))
        if augment.flip and r[4] < 0.5:
            y = y.flip(3)
        out.append(y)
    return out


def from_config(augment: Mapping[str, Any] | None) -> BatchAugment | None:
    """The noise that `data.augment` describes (None: no augmentation)."""
    return BatchAugment(**augment) if augment else None


def views_fn(
    views: int, augment: Mapping[str, Any] | None
) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
    """The fixed test-time views a teacher (pseudo_label.tta_views) or stage=predict
    (predict.tta_views) averages over: `views` copies drawn from the affine ranges of
    `augment` (a data.augment node); None without views or augmentation."""
    noise = from_config(augment)
    if not views or noise is None:
        return None
    return functools.partial(fixed_views, views=views, augment=noise, seed=0)
